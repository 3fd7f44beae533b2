"""lte_jax: hybrid linear/sparse-attention LMs with Learnable Token Eviction."""
__version__ = "0.1.0"


def _bind_source_tree_kernels() -> None:
  """Make ``lte_jax.kernels`` importable from a source checkout that was never installed.

  setup.cfg installs the top-level folder kernels/ as lte_jax.kernels. Running
  ``python -m experiments...`` from the repository root without installing (as
  the GPU benchmarks do) imports lte_jax from the tree, where no lte_jax/kernels
  exists; bind the sibling folder under that name instead.
  """
  import importlib.util
  import os
  import sys
  here = os.path.dirname(os.path.abspath(__file__))
  source = os.path.join(os.path.dirname(here), "kernels")
  if ("lte_jax.kernels" in sys.modules or os.path.isdir(os.path.join(here, "kernels"))
      or not os.path.isfile(os.path.join(source, "__init__.py"))):
    return
  spec = importlib.util.spec_from_file_location(
      "lte_jax.kernels", os.path.join(source, "__init__.py"), submodule_search_locations=[source])
  module = importlib.util.module_from_spec(spec)
  sys.modules["lte_jax.kernels"] = module
  spec.loader.exec_module(module)
  globals()["kernels"] = module   # what the import system sets for installed subpackages


_bind_source_tree_kernels()
