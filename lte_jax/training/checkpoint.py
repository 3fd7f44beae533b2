"""Checkpoints with orbax: async saves, keep the last k, resume from the newest readable one.

A checkpoint step directory holds two items: ``state`` (the TrainState pytree:
params, optimizer state, step, LTE controller, RNG, skipped count) and
``data`` (the input iterator's position, one JSON file per process). Orbax writes each save into a
temporary directory and renames it when complete, so a run killed mid-save
leaves no step directory behind; a step directory that exists but cannot be
read (corrupted files) is moved aside to ``corrupt_step_<n>`` with a warning
naming it, and the previous checkpoint is used.
"""
from __future__ import annotations

import logging as std_logging
import os
import signal
import threading
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from jax.experimental import multihost_utils

from lte_jax import data as data_lib

CORRUPT_PREFIX = "corrupt_step_"


class _DropOrbaxInfo(std_logging.Filter):
  def filter(self, record: std_logging.LogRecord) -> bool:
    return record.levelno >= std_logging.WARNING or "/orbax/" not in record.pathname


def quiet_orbax_logs() -> None:
  """Keep orbax's per-save INFO chatter (a dozen lines per save) out of the absl log."""
  logging.get_absl_handler().addFilter(_DropOrbaxInfo())


class Checkpointer:
  """Saves every ``every`` steps (and on demand); restores the newest readable step."""

  def __init__(self, directory: str | os.PathLike, *, every: int, keep: int,
               async_save: bool = True):
    if not isinstance(every, int) or every < 1:
      raise ValueError(f"checkpoint.every must be a positive integer, got {every!r}")
    if not isinstance(keep, int) or keep < 1:
      raise ValueError(f"checkpoint.keep must be a positive integer, got {keep!r}")
    self.directory = epath.Path(directory)
    self.every = every
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, enable_async_checkpointing=async_save, create=True,
        cleanup_tmp_directories=True)
    self._manager = ocp.CheckpointManager(self.directory, options=options,
                                          item_names=("state", "data"))
    self.saved_steps: list[int] = []

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def save(self, step: int, state: Any, data_iterator: Any, *, force: bool = False) -> bool:
    """Start an async save of ``state`` at ``step`` if it is due (or ``force``)."""
    if not force and step % self.every:
      return False
    if step in self.saved_steps or step in self._manager.all_steps():
      return False
    args = ocp.args.Composite(state=ocp.args.StandardSave(state),
                              data=data_lib.iterator_checkpoint_args(data_iterator))
    saved = self._manager.save(step, args=args, force=True)
    if saved:
      self.saved_steps.append(step)
    return saved

  def restore_latest(self, abstract_state: Any, data_iterator: Any) -> Any | None:
    """The newest readable checkpoint's state (data_iterator is set to its position).

    ``abstract_state``: the TrainState as jax.ShapeDtypeStructs carrying the
    target shardings. Returns None when no checkpoint exists.
    """
    for step in reversed(self.all_steps()):
      try:
        restored = self._manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state),
            data=data_lib.iterator_checkpoint_args(data_iterator, restore=True)))
      except Exception as err:  # orbax raises many types for unreadable files
        path = self.directory / str(step)
        logging.warning("checkpoint %s is unreadable (%s: %s); moving it aside and using "
                        "the previous one", path, type(err).__name__, str(err)[:300])
        self._quarantine(step)
        continue
      logging.info("restored checkpoint %s", self.directory / str(step))
      return restored["state"]
    return None

  def _quarantine(self, step: int) -> None:
    # Renamed rather than deleted: a person may want to look at it; renamed at
    # all so a later save of the same step does not collide with it.
    if jax.process_index() == 0:
      src = self.directory / str(step)
      dst = self.directory / f"{CORRUPT_PREFIX}{step}"
      if dst.exists():
        dst.rmtree()
      src.rename(dst)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices(f"quarantine checkpoint {step}")
    self._manager.reload()

  def wait(self) -> None:
    """Block until pending async saves are on disk."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()


class PreemptionGuard:
  """Turns SIGTERM into a flag the train loop polls, so it can save and exit cleanly."""

  def __init__(self):
    self._event = threading.Event()
    self._previous = None

  def install(self) -> "PreemptionGuard":
    self._previous = signal.signal(signal.SIGTERM, self._handle)
    return self

  def uninstall(self) -> None:
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
      self._previous = None

  def _handle(self, signum, frame) -> None:
    del frame
    logging.warning("received signal %d: saving a checkpoint and stopping", signum)
    self._event.set()

  def should_stop(self) -> bool:
    """True once any process got SIGTERM (every process must agree to save together)."""
    stop = self._event.is_set()
    if jax.process_count() > 1:
      flags = multihost_utils.process_allgather(np.asarray(stop))
      stop = bool(np.any(flags))
    return stop
