"""Checkpointer: round trip with the data iterator, corrupt newest step skipped, SIGTERM flag."""
from __future__ import annotations

import logging
import os
import signal

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lte_jax.data import DataConfig, make_train_iterator
from lte_jax.training import checkpoint
from tests import helpers

DATA = DataConfig(seq_len=16, batch_size=2, model_vocab_size=512)


def state_at(step: int) -> dict:
  return {"params": {"w": jnp.arange(6.0).reshape(2, 3) * step},
          "step": jnp.asarray(step, jnp.int32), "rng": jnp.asarray([step, 7], jnp.uint32)}


def abstract() -> dict:
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state_at(0))


def saved_run(directory, steps=(1, 2), keep=3):
  """Save state_at(s) after consuming s batches; returns the iterator positions."""
  return helpers.save_checkpoints(directory, state_at, DATA, steps, keep)


def test_restore_latest_round_trips_state_and_data_position(tmp_path):
  positions = saved_run(tmp_path / "ck")
  ckpt = checkpoint.Checkpointer(tmp_path / "ck", every=1, keep=3)
  it = make_train_iterator(DATA)
  restored = ckpt.restore_latest(abstract(), it)
  for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(state_at(2))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert it.get_state() == positions[2]
  # The restored iterator yields what the saving one would have yielded next.
  reference = make_train_iterator(DATA)
  for _ in range(2):
    next(reference)
  np.testing.assert_array_equal(next(it)["inputs"], next(reference)["inputs"])
  ckpt.close()


def test_saves_only_when_due_and_keeps_the_last_k(tmp_path):
  ckpt = checkpoint.Checkpointer(tmp_path / "ck", every=2, keep=2)
  it = make_train_iterator(DATA)
  saved = [s for s in range(1, 8) if ckpt.save(s, state_at(s), it)]
  assert saved == [2, 4, 6]
  assert ckpt.save(7, state_at(7), it, force=True)
  assert not ckpt.save(7, state_at(7), it, force=True)  # already saved
  ckpt.wait()
  assert ckpt.all_steps() == [6, 7]
  ckpt.close()


def test_empty_directory_restores_nothing(tmp_path):
  ckpt = checkpoint.Checkpointer(tmp_path / "ck", every=1, keep=1)
  assert ckpt.restore_latest(abstract(), make_train_iterator(DATA)) is None
  ckpt.close()


def test_corrupt_newest_checkpoint_is_skipped_with_a_message(tmp_path, caplog):
  positions = saved_run(tmp_path / "ck")
  newest = tmp_path / "ck" / "2"
  corrupted = 0
  for root, _, files in os.walk(newest / "state"):
    for name in files:
      with open(os.path.join(root, name), "wb") as f:
        f.write(b"\x00garbage" * 3)
      corrupted += 1
  assert corrupted > 0
  ckpt = checkpoint.Checkpointer(tmp_path / "ck", every=1, keep=3)
  it = make_train_iterator(DATA)
  with caplog.at_level(logging.WARNING):
    restored = ckpt.restore_latest(abstract(), it)
  assert int(restored["step"]) == 1
  np.testing.assert_array_equal(np.asarray(restored["params"]["w"]),
                                np.asarray(state_at(1)["params"]["w"]))
  assert it.get_state() == positions[1]
  assert any(str(newest) in r.getMessage() and "unreadable" in r.getMessage()
             for r in caplog.records), [r.getMessage() for r in caplog.records]
  # Moved aside, so the resumed run can save step 2 again.
  assert not newest.exists() and (tmp_path / "ck" / "corrupt_step_2").exists()
  assert ckpt.all_steps() == [1]
  next(it)
  assert ckpt.save(2, state_at(2), it)
  ckpt.wait()
  assert ckpt.all_steps() == [1, 2]
  ckpt.close()


def test_unfinished_save_is_ignored(tmp_path):
  saved_run(tmp_path / "ck", steps=(1,))
  # What a run killed during an async save leaves behind.
  partial = tmp_path / "ck" / "2.orbax-checkpoint-tmp"
  (partial / "state").mkdir(parents=True)
  (partial / "state" / "junk").write_bytes(b"half")
  ckpt = checkpoint.Checkpointer(tmp_path / "ck", every=1, keep=3)
  assert ckpt.all_steps() == [1]
  assert int(ckpt.restore_latest(abstract(), make_train_iterator(DATA))["step"]) == 1
  ckpt.close()


def test_preemption_guard_turns_sigterm_into_a_flag():
  guard = checkpoint.PreemptionGuard().install()
  try:
    assert not guard.should_stop()
    os.kill(os.getpid(), signal.SIGTERM)
    assert guard.should_stop()
  finally:
    guard.uninstall()
  assert signal.getsignal(signal.SIGTERM) is not guard._handle


@pytest.mark.parametrize("kwargs,match", [(dict(every=0, keep=1), "checkpoint.every"),
                                          (dict(every=1, keep=0), "checkpoint.keep")])
def test_checkpointer_validates_its_arguments(tmp_path, kwargs, match):
  with pytest.raises(ValueError, match=match):
    checkpoint.Checkpointer(tmp_path / "ck", **kwargs)
