"""An autouse fixture that compiles a module's programs without XLA's costly optimisations.

On CPU most of a kernel or model test's time is compiling (the interpreted Pallas kernels
above all: ~35 s of LLVM optimisation for one GDN forward and backward), while the tiny
shapes run in well under a second either way. ``jax_disable_most_optimizations`` keeps
the program the test checks and skips the work that only makes it run faster (LLVM
optimisation, layout trials), about a third of the compile time. A test module opts in with

    from tests.quick_compile import quick_compile  # noqa: F401  (autouse fixture)

Tests that time programs (the benchmarks' smoke runs) do not use it.
"""
from __future__ import annotations

import jax
import pytest

_FLAG = "jax_disable_most_optimizations"


@pytest.fixture(autouse=True)
def quick_compile():
  before = jax.config.read(_FLAG)
  jax.config.update(_FLAG, True)
  yield
  jax.config.update(_FLAG, before)
