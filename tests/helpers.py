"""Shared test helpers: error metrics, packed-batch generators, simulated-device runs."""
from __future__ import annotations

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_on_simulated_devices(code: str, devices: int = 4) -> None:
  """Run ``code`` in a fresh Python on ``devices`` simulated CPU devices; it must print OK.

  A subprocess because the device count is fixed when JAX starts.
  """
  env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
             JAX_PLATFORMS="cpu")
  result = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
  assert result.returncode == 0 and "OK" in result.stdout, result.stderr[-3000:]


def sds(*shape, dtype=jnp.bfloat16) -> jax.ShapeDtypeStruct:
  """Abstract argument for lowering tests."""
  return jax.ShapeDtypeStruct(shape, dtype)


def rel_rms(got, want, atol=1e-5):
  """RMS error relative to the RMS of ``want``; ``atol`` covers references that are exactly 0."""
  got = np.asarray(got, np.float64)
  want = np.asarray(want, np.float64)
  return float(np.sqrt(np.mean((got - want) ** 2)) / (np.sqrt(np.mean(want ** 2)) + atol))


def packed_segment_ids(rng, batch, time, *, lengths=(1, 1, 2, 5, 17, 40), padding=3,
                       pad_if_longer_than=8):
  """[batch, time] int32 ids of documents with lengths drawn from ``lengths`` (1-token ones
  included) and a padding tail of ``padding`` tokens (id 0) on rows longer than
  ``pad_if_longer_than``."""
  rows = []
  for _ in range(batch):
    ids, doc = [], 1
    while len(ids) < time:
      ids += [doc] * int(rng.choice(lengths))
      doc += 1
    ids = ids[:time]
    if padding and time > pad_if_longer_than:
      ids[-padding:] = [0] * padding
    rows.append(ids)
  return np.asarray(rows, np.int32)


def save_checkpoints(directory, state_at, data, steps=(1, 2), keep=3) -> dict:
  """Save state_at(s) after s batches of a training iterator over `data` (a DataConfig);
  returns the iterator position of each saved step."""
  from lte_jax.data import make_train_iterator  # pylint: disable=g-import-not-at-top
  from lte_jax.training import checkpoint  # pylint: disable=g-import-not-at-top
  ckpt = checkpoint.Checkpointer(directory, every=1, keep=keep)
  it = make_train_iterator(data)
  positions = {}
  for s in range(1, max(steps) + 1):
    next(it)
    if s in steps:
      assert ckpt.save(s, state_at(s), it)
      positions[s] = it.get_state()
  ckpt.close()
  return positions
