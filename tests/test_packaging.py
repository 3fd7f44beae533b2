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
