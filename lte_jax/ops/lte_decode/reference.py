"""Plain fp32 definition of attention over the LTE decode cache.

Builds the [B, Hkv, Tq, S] visibility mask from the cache's ring positions and
fill counts, then a dense masked softmax: obviously correct, what the tests
compare the kernel against.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from lte_jax.ops.attention.reference import masked_attention_reference


def ring_positions(pos: jax.Array, ring: int) -> jax.Array:
  """[ring] int32 position held by each ring slot after ``pos`` tokens (-1 = empty).

  Slot i holds the latest position t < pos with t % ring == i.
  """
  last = jnp.asarray(pos, jnp.int32) - 1
  t = last - jnp.mod(last - jnp.arange(ring, dtype=jnp.int32), ring)
  return jnp.where(t >= 0, t, -1).astype(jnp.int32)


def lte_decode_mask(num_tokens: jax.Array, fill: jax.Array, *, ring_size: int, num_slots: int,
                    num_queries: int) -> jax.Array:
  """[B, Hkv, Tq, S] bool: which cache slots each query may read.

  Ring slot j < ring_size holds position ring_positions(num_tokens)[j]; query t,
  at position num_tokens - Tq + t, reads it iff 0 <= that position <= its own.
  Retained slot ring_size + r is read by every query iff r < fill[b, h].
  """
  ring_pos = ring_positions(num_tokens, ring_size)                        # [W1]
  q_pos = jnp.asarray(num_tokens, jnp.int32) - num_queries + jnp.arange(num_queries,
                                                                         dtype=jnp.int32)
  in_ring = (ring_pos >= 0) & (ring_pos <= q_pos[:, None])                 # [Tq, W1]
  in_ring = jnp.pad(in_ring, ((0, 0), (0, num_slots - ring_size)))         # retained: False
  slot = jnp.arange(num_slots, dtype=jnp.int32)
  retained = (slot >= ring_size)[None, None, :] & (
      slot[None, None, :] < ring_size + fill[:, :, None])                  # [B, Hkv, S]
  return in_ring[None, None] | retained[:, :, None, :]


def lte_decode_attention_reference(q: jax.Array, k: jax.Array, v: jax.Array, fill: jax.Array,
                                   num_tokens: jax.Array, *, ring_size: int,
                                   scale: float) -> jax.Array:
  """q [B, Tq, Hq, D], k [B, S, Hkv, D], v [B, S, Hkv, Dv] -> o [B, Tq, Hq, Dv] in v.dtype
  (computed in fp32; a query with no visible slot gets zeros)."""
  mask = lte_decode_mask(num_tokens, fill, ring_size=ring_size, num_slots=k.shape[1],
                         num_queries=q.shape[1])
  return masked_attention_reference(q, k, v, mask, scale=scale).astype(v.dtype)
