"""Checkpoints with orbax: async saves, per-array checksums, resume from the newest good step.

A checkpoint step directory holds two items: ``state`` (the TrainState pytree:
params, optimizer state, step, LTE controller, RNG, skipped count) and
``data`` (the input iterator's position, one JSON file per process). Orbax writes each save into a
temporary directory and renames it when complete, so a run killed mid-save
leaves no step directory behind. Each save also writes ``checksums/<step>.json``
(``integrity``: two sums of every array's bits, taken before the async write).

A restore takes the newest step that parses and matches its checksums. A step
that fails either is moved aside to ``corrupt_step_<n>`` (its checksum file
inside it) with a warning naming it and, for a mismatch, the arrays, and the
previous step is tried. When checkpoints exist but none is good (including ones
moved aside by an earlier run), ``restore_latest`` raises ``UnreadableCheckpoints``
naming them, rather than letting a run start again from step 0.

A step is *verified* once orbax has finished it and its checksum file reads back.
Rotation keeps the newest ``keep`` steps and, in addition, the newest verified
one, so a newer save whose write is still running (or whose checksum file could
not be written) never leaves the run without a known-good checkpoint.

``PreemptionGuard`` turns SIGTERM and SIGINT into a flag the train loop polls
to save and stop between steps.
"""
from __future__ import annotations

import logging as std_logging
import os
import signal
import threading
from typing import Any, Callable

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from jax.experimental import multihost_utils

from lte_jax import data as data_lib
from lte_jax.training import integrity

CORRUPT_PREFIX = "corrupt_step_"


class UnreadableCheckpoints(ValueError):
  """Checkpoints exist under a directory but none can be restored intact."""


class _DropOrbaxInfo(std_logging.Filter):
  def filter(self, record: std_logging.LogRecord) -> bool:
    return record.levelno >= std_logging.WARNING or "/orbax/" not in record.pathname


def quiet_orbax_logs() -> None:
  """Keep orbax's per-save INFO chatter (a dozen lines per save) out of the absl log."""
  logging.get_absl_handler().addFilter(_DropOrbaxInfo())


def _brief(err: BaseException, limit: int = 200) -> str:
  """One line of an exception: orbax / tensorstore messages run over many lines."""
  text = " ".join(str(err).split())
  return f"{type(err).__name__}: {text[:limit]}{'...' if len(text) > limit else ''}"


def newest_good(directory: str | os.PathLike, steps: list[int],
                restore: Callable[[int], Any],
                reject: Callable[[int, str], None]) -> tuple[int, Any] | None:
  """(step, state) of the newest of ``steps`` whose ``restore(step)`` reads and matches
  the checksums saved with it; ``reject(step, why)`` is called for each one that does not.
  None when no step is good."""
  for step in sorted(steps, reverse=True):
    try:
      state = restore(step)
    except Exception as err:  # orbax raises many types for unreadable files
      reject(step, f"is unreadable ({_brief(err)})")
      continue
    recorded = integrity.read(directory, step)
    why = integrity.damage(recorded, state)
    if why:
      reject(step, f"failed its integrity check ({why})")
      continue
    if recorded is None:
      logging.warning("checkpoint %s has no checksum file (saved by an older lte_jax, or the "
                      "file could not be written); its arrays are finite, restoring it "
                      "unverified", epath.Path(directory) / str(step))
    return step, state
  return None


class Checkpointer:
  """Saves every ``every`` steps (and on demand); restores the newest good step."""

  def __init__(self, directory: str | os.PathLike, *, every: int, keep: int,
               async_save: bool = True):
    if not isinstance(every, int) or every < 1:
      raise ValueError(f"checkpoint.every must be a positive integer, got {every!r}")
    if not isinstance(keep, int) or keep < 1:
      raise ValueError(f"checkpoint.keep must be a positive integer, got {keep!r}")
    self.directory = epath.Path(directory)
    self.every = every
    self.keep = keep
    # max_to_keep stays unset: rotation is ours (_rotate), it must spare the newest verified step.
    options = ocp.CheckpointManagerOptions(
        enable_async_checkpointing=async_save, create=True, cleanup_tmp_directories=True)
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
    # Summed now: the train loop donates ``state`` to its next step while orbax still writes.
    sums = integrity.array_sums(state)
    args = ocp.args.Composite(state=ocp.args.StandardSave(state),
                              data=data_lib.iterator_checkpoint_args(data_iterator))
    saved = self._manager.save(step, args=args, force=True)
    if saved:
      self.saved_steps.append(step)
      self._write_checksums(step, sums)
      self._rotate(unfinished=step)
    return saved

  def _write_checksums(self, step: int, sums: dict) -> None:
    if jax.process_index() != 0:
      return
    try:
      integrity.write(self.directory, step, sums)
    except OSError as err:
      logging.warning("could not write the checksums of checkpoint %s (%s): it stays "
                      "unverified, and the newest verified checkpoint is kept beside it",
                      self.directory / str(step), _brief(err))

  def is_verified(self, step: int) -> bool:
    """Finished by orbax (listed) and its checksum file reads back."""
    return step in self._manager.all_steps() and integrity.read(self.directory, step) is not None

  def _rotate(self, unfinished: int | None) -> None:
    """Delete all but the newest ``keep`` steps and the newest verified one (``unfinished``,
    a save still being written, does not count as verified)."""
    steps = self.all_steps()
    kept = set(steps[-self.keep:])
    verified = [s for s in steps if s != unfinished and self.is_verified(s)]
    if verified:
      kept.add(verified[-1])
    for step in steps:
      if step not in kept:
        self._manager.delete(step)
    if jax.process_index() == 0:  # checksum files of deleted or failed saves
      folder = self.directory / integrity.CHECKSUM_DIR
      for path in (folder.iterdir() if folder.exists() else ()):
        name = path.name.split(".")[0]
        if not (name.isdigit() and int(name) in kept):
          path.unlink()

  def restore_latest(self, abstract_state: Any, data_iterator: Any) -> Any | None:
    """The newest good checkpoint's state (data_iterator is set to its position).

    ``abstract_state``: the TrainState as jax.ShapeDtypeStructs carrying the
    target shardings. Returns None when the directory holds no checkpoint; raises
    ``UnreadableCheckpoints`` (the iterator untouched) when it holds some but none
    is good.
    """
    start = data_iterator.get_state()
    rejected: dict[int, str] = {}

    def restore(step: int) -> Any:
      return self._manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract_state),
          data=data_lib.iterator_checkpoint_args(data_iterator, restore=True)))["state"]

    def reject(step: int, why: str) -> None:
      logging.warning("checkpoint %s %s; moving it aside to %s%d and trying the previous one",
                      self.directory / str(step), why, CORRUPT_PREFIX, step)
      self._quarantine(step)
      rejected[step] = why

    found = newest_good(self.directory, self.all_steps(), restore, reject)
    if found is not None:
      logging.info("restored checkpoint %s", self.directory / str(found[0]))
      return found[1]
    moved = {f"{CORRUPT_PREFIX}{step}" for step in rejected}
    earlier = sorted(p.name for p in self.directory.glob(f"{CORRUPT_PREFIX}*")
                     if p.name not in moved)
    if not rejected and not earlier:
      return None
    data_iterator.set_state(start)
    found = [f"step {step} {why}" for step, why in rejected.items()]
    if earlier:
      found.append(f"set aside by an earlier run: {', '.join(earlier)}")
    raise UnreadableCheckpoints(
        f"{self.directory} holds checkpoints but none is readable: {'; '.join(found)} (all "
        f"are kept as {self.directory}/{CORRUPT_PREFIX}<step>)")

  def _quarantine(self, step: int) -> None:
    # Renamed rather than deleted: a person may want to look at it; renamed at
    # all so a later save of the same step does not collide with it.
    if jax.process_index() == 0:
      src = self.directory / str(step)
      dst = self.directory / f"{CORRUPT_PREFIX}{step}"
      if dst.exists():
        dst.rmtree()
      src.rename(dst)
      sums = integrity.path_for(self.directory, step)
      if sums.exists():
        sums.rename(dst / "checksums.json")
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices(f"quarantine checkpoint {step}")
    self._manager.reload()

  def wait(self) -> None:
    """Block until pending async saves are on disk, then rotate with them verified."""
    self._manager.wait_until_finished()
    if self.saved_steps:  # a Checkpointer that only restored deletes nothing
      self._rotate(unfinished=None)

  def close(self) -> None:
    self.wait()
    self._manager.close()


class PreemptionGuard:
  """Turns SIGTERM and SIGINT into a flag the train loop polls, so it can save and exit
  cleanly. A second SIGINT (Ctrl-C again) raises KeyboardInterrupt: stop without saving."""

  SIGNALS = (signal.SIGTERM, signal.SIGINT)

  def __init__(self):
    self._event = threading.Event()
    self._previous: dict[int, Any] = {}
    self.received: str | None = None  # the first signal's name, e.g. 'SIGINT'

  def install(self) -> "PreemptionGuard":
    for signum in self.SIGNALS:
      self._previous[signum] = signal.signal(signum, self._handle)
    return self

  def uninstall(self) -> None:
    for signum, previous in self._previous.items():
      signal.signal(signum, signal.SIG_DFL if previous is None else previous)
    self._previous = {}

  def _handle(self, signum, frame) -> None:
    del frame
    if signum == signal.SIGINT and self._event.is_set():
      raise KeyboardInterrupt
    self.received = self.received or signal.Signals(signum).name
    logging.warning("received %s: saving a checkpoint and stopping (Ctrl-C again stops "
                    "without saving)", signal.Signals(signum).name)
    self._event.set()

  def should_stop(self) -> bool:
    """True once any process got SIGTERM or SIGINT (every process must agree to save together)."""
    stop = self._event.is_set()
    if jax.process_count() > 1:
      flags = multihost_utils.process_allgather(np.asarray(stop))
      stop = bool(np.any(flags))
    return stop
