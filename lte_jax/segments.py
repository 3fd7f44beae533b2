"""Helpers for packed batches described by ``segment_ids`` [B, T].

Convention (everywhere in lte_jax): tokens with the same id in a contiguous run
form one document; recurrent state and attention never cross a change of id.
Id 0 marks padding (still its own document, masked from losses and from the
LTE scorer's input).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from lte_jax import _checks


def document_starts(segment_ids: jax.Array) -> jax.Array:
  """[B, T] bool: True where a new document begins (t == 0 or the id changes)."""
  prev = jnp.concatenate([segment_ids[:, :1], segment_ids[:, :-1]], axis=1)
  first = jnp.zeros_like(segment_ids, dtype=bool).at[:, 0].set(True)
  return first | (segment_ids != prev)


def positions_from_segment_ids(segment_ids: jax.Array) -> jax.Array:
  """[B, T] int32 position of each token inside its document (for RoPE)."""
  t = jnp.arange(segment_ids.shape[1], dtype=jnp.int32)[None, :]
  starts = jnp.where(document_starts(segment_ids), t, 0)
  return t - jax.lax.cummax(starts, axis=1)


def default_positions(batch: int, time: int, offset: int | jax.Array = 0) -> jax.Array:
  return jnp.broadcast_to(jnp.arange(time, dtype=jnp.int32)[None, :] + offset, (batch, time))


def resolve_positions(positions: jax.Array | None, segment_ids: jax.Array | None,
                      batch: int, time: int) -> jax.Array:
  """[B, T] int RoPE positions: ``positions`` checked, else in-document ones, else 0..T-1."""
  if positions is None:
    return (default_positions(batch, time) if segment_ids is None
            else positions_from_segment_ids(segment_ids))
  _checks.check_shape("positions", positions, (batch, time), "[batch, time]")
  _checks.check_int_dtype("positions", positions)
  return positions
