"""The study's offline text corpus: the Python standard library that ships with every Python.

Its sources (``.py`` files under ``sysconfig``'s stdlib folder, site-packages and
dist-packages left out) are code, comments and docstrings in English: tens of millions of
byte tokens that need no download. One file is one document; the JSONL written here is
read with ``data.source='jsonl'``. The manifest records which Python and how many tokens,
since another Python install ships another library (a Debian python3.12 leaves out the
``test`` package: about 10.7M tokens there, 31.5M with it). ``site_packages=True`` adds the
installed packages' sources (jax, numpy, ...: as offline, and usually far larger).
"""
from __future__ import annotations

import json
import os
import platform
import sysconfig

_SKIP_DIRS = ("site-packages", "dist-packages", "__pycache__")


def _py_files(root: str, skip: tuple[str, ...]) -> list[str]:
  out = []
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames[:] = sorted(d for d in dirnames if d not in skip)
    out += [os.path.join(dirpath, f) for f in sorted(filenames) if f.endswith(".py")]
  return out


def stdlib_files(root: str | None = None, site_packages: bool = False) -> list[str]:
  """Sorted paths of the library's .py files under ``root`` (default: this Python's), then
  with ``site_packages`` those of the installed packages (sysconfig's purelib / platlib)."""
  root = root or sysconfig.get_paths()["stdlib"]
  if not os.path.isdir(root):
    raise ValueError(f"the standard library folder {root!r} does not exist")
  out = _py_files(root, _SKIP_DIRS)
  if site_packages:
    for lib in sorted({sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}):
      if os.path.isdir(lib):
        out += _py_files(lib, ("__pycache__",))
  return out


def build(path: str, *, root: str | None = None, max_bytes: int | None = None,
          site_packages: bool = False) -> dict:
  """Write the corpus to ``path`` (JSONL, {"text": ...} a file) unless its manifest
  (``path`` + '.json') is there already; returns the manifest.

  ``max_bytes``: stop after the files holding about that many bytes (smoke studies).
  Files that are not UTF-8 are left out and counted.
  """
  manifest_path = path + ".json"
  if os.path.exists(manifest_path) and os.path.exists(path):
    with open(manifest_path) as f:
      return json.load(f)
  files = stdlib_files(root, site_packages)
  docs = total = skipped = 0
  tmp = path + ".tmp"
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(tmp, "w") as out:
    for name in files:
      try:
        with open(name, encoding="utf-8") as f:
          text = f.read()
      except (UnicodeDecodeError, OSError):
        skipped += 1
        continue
      if not text.strip():
        continue
      out.write(json.dumps({"text": text}) + "\n")
      docs += 1
      total += len(text.encode("utf-8"))
      if max_bytes is not None and total >= max_bytes:
        break
  os.replace(tmp, path)
  manifest = {"source": "Python standard library (.py files)" + (
                  " and installed packages" if site_packages else ", site-packages excluded"),
              "root": root or sysconfig.get_paths()["stdlib"],
              "python": platform.python_version(), "documents": docs,
              "bytes": total, "byte_tokens": total + 2 * docs,  # + BOS and end a document
              "skipped_not_utf8": skipped}
  with open(manifest_path, "w") as f:
    json.dump(manifest, f, indent=2)
  return manifest
