"""Suite-wide setup: the entry points' absl flags in one process, and Ctrl-C that stops a run.

- experiments.train, .convert, .eval_retrieval, .eval_ppl and .generate each define flags
  such as --workdir, --checkpoint or --config in absl's one global FLAGS; tests import
  several of them, so a later definition of a name replaces the earlier one (same name, same
  meaning; the earlier module's FlagHolder reads the flag by name) instead of failing
  collection with DuplicateFlagError.
- jaxlib frees the Python objects its threads let go of from a gc callback (a Python
  function in ``gc.callbacks``). A SIGINT that arrives while it runs raises KeyboardInterrupt
  inside the callback, where Python prints "Exception ignored in: <function
  _xla_gc_callback>" with a KeyboardInterrupt traceback and drops the exception: Ctrl-C, or
  a time limit's SIGINT, leaves the suite running. The suite runs that collection after each
  test instead, so a signal's exception always reaches the test.
- One run of the suite shares a JAX persistent compilation cache (a fresh temporary folder,
  removed at the end) between its workers and the entry points its tests start as
  subprocesses: the same tiny models are compiled by many tests, and on two cores compiling
  is most of the suite's time. Compiled programs are keyed by their HLO, flags and versions,
  so a hit runs exactly what a fresh compile would.
"""
from __future__ import annotations

import gc
import logging
import os
import shutil
import tempfile

import pytest
from absl import flags

_ENTRY_POINTS = "experiments."


def _replace_flags_of_other_entry_points() -> None:
  define = flags.FlagValues.__setitem__

  def setitem(self, name, flag):
    if self is flags.FLAGS and name in self._flags():  # pylint: disable=protected-access
      # None: a flag a test set aside and put back by name (test_checkpoint_integrity).
      owner = self.find_module_defining_flag(name)
      if owner is None or owner.startswith(_ENTRY_POINTS):
        flag.allow_override = True
    define(self, name, flag)

  flags.FlagValues.__setitem__ = setitem


def _take_jax_gc_callback():
  """Remove jaxlib's gc callback; returns the collection it ran (None if not found)."""
  from jax._src import lib as jax_lib  # pylint: disable=g-import-not-at-top
  callbacks = [c for c in gc.callbacks if getattr(c, "__name__", "") == "_xla_gc_callback"]
  for callback in callbacks:
    gc.callbacks.remove(callback)
  return jax_lib._jax.collect_garbage if callbacks else None  # pylint: disable=protected-access


_CACHE_ENV = "JAX_COMPILATION_CACHE_DIR"
_OWN_CACHE = None  # the folder this process created (the xdist controller or a lone run)


def _share_compilations() -> None:
  """Point this process, the xdist workers it starts and every subprocess at one cache."""
  global _OWN_CACHE
  if _CACHE_ENV not in os.environ:
    _OWN_CACHE = tempfile.mkdtemp(prefix="lte_jax_test_compile_cache-")
    os.environ[_CACHE_ENV] = _OWN_CACHE
  # Programs compiled in under half a second are cheaper to rebuild than to read back.
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
  import jax  # pylint: disable=g-import-not-at-top
  jax.config.update("jax_compilation_cache_dir", os.environ[_CACHE_ENV])
  jax.config.update("jax_persistent_cache_min_compile_time_secs",
                    float(os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"]))


_replace_flags_of_other_entry_points()
_COLLECT = _take_jax_gc_callback()
_share_compilations()


@pytest.fixture
def parsed_flags():
  """absl's FLAGS marked parsed for a test that calls an entry point's main() directly."""
  was_parsed = flags.FLAGS.is_parsed()
  flags.FLAGS.mark_as_parsed()
  yield
  if not was_parsed:
    flags.FLAGS.unparse_flags()


@pytest.fixture(autouse=True)
def _keep_absl_log_level():
  """A test that changes --verbosity (a flag parse, a flagsaver restore) sets the absl logger's
  own level, which would hide INFO records from every later caplog in this worker."""
  absl_logger = logging.getLogger("absl")
  level = absl_logger.level
  yield
  absl_logger.setLevel(level)


@pytest.fixture(autouse=True)
def _collect_jax_garbage():
  yield
  if _COLLECT is not None:
    _COLLECT()


def pytest_sessionfinish(session, exitstatus):  # pylint: disable=unused-argument
  """Finish queued work and free what jaxlib still holds before the interpreter exits."""
  import jax  # pylint: disable=g-import-not-at-top
  jax.effects_barrier()
  jax.clear_caches()
  gc.collect()
  if _COLLECT is not None:
    _COLLECT()
  if _OWN_CACHE is not None and not hasattr(session.config, "workerinput"):
    shutil.rmtree(_OWN_CACHE, ignore_errors=True)
