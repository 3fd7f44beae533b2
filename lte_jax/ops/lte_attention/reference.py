"""Plain fp32 definition of LTE attention (PAPER.md section 3): the "A-plus-column" pattern.

Query i of KV head h sees key j iff j <= i, same document and
(pos_j < sink_size or i - j <= window_size or scores[j, h] > 0). With a budget,
per query only the (budget - sink_size) best-scored retained tokens outside the
sinks and the window stay, found here by sorting each query's candidates.
Builds [B, Hkv, T, T] masks: for tests, not for long sequences.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from lte_jax import segments
from lte_jax.ops.attention.reference import compute_dtype, masked_attention_reference


def straight_through_values(v: jax.Array, scores: jax.Array) -> jax.Array:
  """v' = v * (1 + r - stop_gradient(r)) with r = scores [B, T, Hkv], v [B, T, Hkv, Dv].

  Written as v + v * (r - sg(r)) so the forward value is v bit for bit; the
  gradient reaching r is sum_d v * dL/dv', accumulated in fp32 (float64 for float64 v).
  """
  f = compute_dtype(v)
  r = scores.astype(f)
  delta = r - jax.lax.stop_gradient(r)
  return v + (v.astype(f) * delta[..., None]).astype(v.dtype)


def token_positions(segment_ids: jax.Array | None, batch: int, time: int) -> jax.Array:
  """[B, T] int32 position of each token inside its document (sinks are pos < sink_size)."""
  if segment_ids is None:
    return segments.default_positions(batch, time)
  return segments.positions_from_segment_ids(segment_ids)


def lte_mask_reference(scores: jax.Array, *, sink_size: int, window_size: int,
                       budget: int | None, segment_ids: jax.Array | None) -> jax.Array:
  """scores [B, T, Hkv] -> [B, Hkv, T, T] bool, True where query i reads key j."""
  batch, time, _ = scores.shape
  r = jnp.transpose(scores.astype(jnp.float32), (0, 2, 1))  # [B, H, T]
  seg = jnp.zeros((batch, time), jnp.int32) if segment_ids is None else segment_ids
  pos = token_positions(segment_ids, batch, time)
  i = jnp.arange(time)[:, None]
  j = jnp.arange(time)[None, :]
  causal = (j <= i)[None, None] & (seg[:, :, None] == seg[:, None, :])[:, None]
  sink = (pos < sink_size)[:, None, None, :]
  window = (i - j <= window_size)[None, None]
  retained = (r > 0)[:, :, None, :]
  if budget is not None:
    candidate = causal & ~sink & ~window & retained
    # Stable sort of -r: among equal scores the earlier token ranks first.
    order = jnp.argsort(jnp.where(candidate, -r[:, :, None, :], jnp.inf), axis=-1, stable=True)
    rank = jnp.argsort(order, axis=-1)
    retained = candidate & (rank < budget - sink_size)
  return causal & (sink | window | retained)


def lte_attention_reference(q: jax.Array, k: jax.Array, v: jax.Array, scores: jax.Array, *,
                            sink_size: int, window_size: int, budget: int | None,
                            segment_ids: jax.Array | None, scale: float) -> jax.Array:
  """q [B, T, Hq, D], k [B, T, Hkv, D], v [B, T, Hkv, Dv], scores [B, T, Hkv] -> [B, T, Hq, Dv]."""
  mask = lte_mask_reference(jax.lax.stop_gradient(scores), sink_size=sink_size,
                            window_size=window_size, budget=budget, segment_ids=segment_ids)
  v = straight_through_values(v, scores)
  return masked_attention_reference(q, k, v, mask, scale=scale).astype(v.dtype)
