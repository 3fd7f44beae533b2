"""LTE attention in plain JAX on the shared blockwise softmax of ops/attention/xla.py.

Only the mask builder is LTE-specific. Without a budget it needs per-key
vectors alone (retained, position, document). With a budget, each key j gets
``evict_at[j]``: the first prefix end c at which (budget - sink_size) candidates
j' <= c of its document beat it (higher score, or equal score and earlier).
Query i's candidates are exactly the retained tokens j <= i - window_size - 1
of its document, and j's rank among them only grows with i, so query i keeps j
iff i - window_size - 1 < evict_at[j]: the top-k rule, and also the streaming
cache that appends a token leaving the window when there is room and else
replaces the lowest-scored entry only when strictly higher.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from lte_jax.ops.attention.xla import DEFAULT_BLOCK_Q, MaskFn, blockwise_attention, take_time
from lte_jax.ops.lte_attention.reference import straight_through_values, token_positions

DEFAULT_BLOCK_K = 256


def evict_index(scores: jax.Array, positions: jax.Array, segment_ids: jax.Array | None, *,
                sink_size: int, budget: int, block_k: int = DEFAULT_BLOCK_K) -> jax.Array:
  """[B, T, Hkv] int32: for each key j the first prefix end c with
  #{j' <= c of j's document, pos_j' >= sink_size, r_j' > 0, j' beats j} >= budget - sink_size
  (T when never reached).

  Cost: O(T^2) compares and cumulative sums per (batch, KV head); one block of
  ``block_k`` keys at a time, so O(B * Hkv * block_k * T) int32 is alive.
  """
  batch, time, num_kv_heads = scores.shape
  r = jnp.transpose(scores.astype(jnp.float32), (0, 2, 1))  # [B, H, T]
  eligible = (r > 0) & (positions >= sink_size)[:, None, :]
  seg = jnp.zeros((batch, time), jnp.int32) if segment_ids is None else segment_ids
  others = jnp.arange(time)
  slots = budget - sink_size

  def rows(j_idx):  # j_idx [Bj] -> [B, H, Bj]
    j_idx = jnp.clip(j_idx, 0, time - 1)
    r_j = jnp.take(r, j_idx, axis=2)[..., None]
    same_doc = seg[:, None, None, :] == jnp.take(seg, j_idx, axis=1)[:, None, :, None]
    earlier = others[None, :] < j_idx[:, None]
    beats = r[:, :, None, :] > r_j
    beats = beats | ((r[:, :, None, :] == r_j) & earlier)
    beats = beats & eligible[:, :, None, :] & same_doc
    count = jnp.cumsum(beats.astype(jnp.int32), axis=-1)
    # count is nondecreasing in c, so the c with count < slots form the prefix [0, evict_at).
    return jnp.sum(count < slots, axis=-1, dtype=jnp.int32)

  if time <= block_k:
    out = rows(jnp.arange(time))
  else:
    num_blocks = -(-time // block_k)
    starts = jnp.arange(num_blocks) * block_k
    out = jax.lax.map(lambda s: rows(s + jnp.arange(block_k)), starts)  # [nb, B, H, Bj]
    out = jnp.moveaxis(out, 0, 2).reshape(batch, num_kv_heads, num_blocks * block_k)[..., :time]
  return jnp.transpose(out, (0, 2, 1))


def lte_mask_fn(retained: jax.Array, last_query: jax.Array | None, positions: jax.Array,
                segment_ids: jax.Array | None, *, sink_size: int, window_size: int) -> MaskFn:
  """Mask builder: retained [B, T, Hkv] bool; last_query [B, T, Hkv] int32 (the last query
  index that still keeps a retained key) or None for no budget; positions [B, T]."""
  def per_key(x, k_idx):  # [B, T, H] -> [B, H, 1, Sk]
    return jnp.transpose(take_time(x, k_idx), (0, 2, 1))[:, :, None, :]

  def mask_fn(q_idx, k_idx):
    dist = q_idx[:, None] - k_idx[None, :]
    visible = (dist >= 0)[None, None]
    if segment_ids is not None:
      seg_q = take_time(segment_ids, q_idx)
      seg_k = take_time(segment_ids, k_idx)
      visible = visible & (seg_q[:, None, :, None] == seg_k[:, None, None, :])
    sink = (take_time(positions, k_idx) < sink_size)[:, None, None, :]
    near = sink | (dist <= window_size)[None, None]
    keep = per_key(retained, k_idx)
    if last_query is not None:
      keep = keep & (q_idx[None, None, :, None] <= per_key(last_query, k_idx))
    return visible & (near | keep)
  return mask_fn


def lte_attention_xla(q: jax.Array, k: jax.Array, v: jax.Array, scores: jax.Array, *,
                      sink_size: int, window_size: int, budget: int | None,
                      segment_ids: jax.Array | None, scale: float,
                      block_q: int = DEFAULT_BLOCK_Q,
                      block_k: int = DEFAULT_BLOCK_K) -> jax.Array:
  """q [B, T, Hq, D], k [B, T, Hkv, D], v [B, T, Hkv, Dv], scores [B, T, Hkv] -> [B, T, Hq, Dv]."""
  batch, time, _ = scores.shape
  hard = jax.lax.stop_gradient(scores)
  positions = token_positions(segment_ids, batch, time)
  if budget is None:
    retained, last_query = hard > 0, None
  else:
    retained = (hard > 0) & (positions >= sink_size)[..., None]
    evict_at = evict_index(hard, positions, segment_ids, sink_size=sink_size, budget=budget,
                           block_k=block_k)
    last_query = evict_at + window_size
  mask_fn = lte_mask_fn(retained, last_query, positions, segment_ids,
                        sink_size=sink_size, window_size=window_size)
  v = straight_through_values(v, scores)
  o = blockwise_attention(q, k, v, mask_fn, scale=scale, block_q=block_q)
  return o.astype(v.dtype)
