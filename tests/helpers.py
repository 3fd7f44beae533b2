"""Shared test helpers: error metrics and packed-batch generators."""
from __future__ import annotations

import numpy as np


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
