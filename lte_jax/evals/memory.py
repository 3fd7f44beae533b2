"""Decode-cache memory, measured on the cache pytree a model really builds.

``jax.eval_shape`` of ``init_cache`` gives every leaf's shape and dtype without
allocating, so the number follows any change to a mixer's cache.
"""
from __future__ import annotations

import jax


def cache_bytes_per_sequence(model, max_len: int, dtype=None) -> int:
  """Bytes of ``model.init_cache(1, max_len, dtype)``: one sequence's decode state."""
  if isinstance(max_len, bool) or not isinstance(max_len, int) or max_len < 1:
    raise ValueError(f"max_len must be a positive integer, got {max_len!r}")
  shapes = jax.eval_shape(lambda: model.init_cache(1, max_len, dtype))
  return sum(int(x.size) * x.dtype.itemsize for x in jax.tree.leaves(shapes))
