"""Packaging: every package folder is listed in setup.cfg; kernels install as lte_jax.kernels."""
from __future__ import annotations

import configparser
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _listed_packages() -> set[str]:
  cfg = configparser.ConfigParser()
  cfg.read(ROOT / "setup.cfg")
  return {p.strip() for p in cfg["options"]["packages"].split() if p.strip()}


def test_every_package_folder_is_listed():
  found = {".".join(p.parent.relative_to(ROOT).parts)
           for p in (ROOT / "lte_jax").rglob("__init__.py")}
  found |= {"lte_jax.kernels" + "".join("." + part for part in p.parent.relative_to(
      ROOT / "kernels").parts) for p in (ROOT / "kernels").rglob("__init__.py")}
  assert found == _listed_packages()


def test_no_top_level_kernels_package():
  assert "kernels" not in _listed_packages()


def test_kernels_importable_under_lte_jax():
  import lte_jax.kernels  # noqa: F401  (resolved through setup.cfg package_dir)
  assert pathlib.Path(lte_jax.kernels.__file__).resolve().parent == ROOT / "kernels"


def test_kernels_importable_from_an_uninstalled_checkout():
  # As on a GPU machine that only has the source tree on PYTHONPATH: drop the
  # editable-install finder and import from the repository root.
  import subprocess
  import sys
  code = ("import sys; sys.meta_path = [m for m in sys.meta_path if 'ditable' not in repr(m)]; "
          "import lte_jax.kernels.gated_delta_rule as g; print(g.__file__)")
  out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                       check=True).stdout
  assert pathlib.Path(out.strip()).resolve().parent == ROOT / "kernels" / "gated_delta_rule"
