"""Plain fp32 definition of Native Sparse Attention (PAPER.md section 4), one query at a time.

For query i (in-document position p_i, current block c_i = p_i // block_size) and KV head h:

- compression: block c of i's document is the mean of its block_size keys / values; it is
  visible iff complete by i, (c + 1) * block_size <= p_i + 1. o_cmp = softmax attention over
  the visible compressed blocks (zeros when none is complete yet).
- selection: blocks 0, c_i - 1 and c_i are always taken; the rest of the block_count slots go
  to the blocks c <= c_i with the largest importance, the compression-branch probabilities
  summed over the query heads of the KV group (ties: the earlier block). The importance is
  computed from stop_gradient values: selection carries no gradient. o_slc = attention over
  the tokens j <= i of the selected blocks.
- sliding window: o_swa = attention over j with i - window_size <= j <= i.
- o = g_cmp * o_cmp + g_slc * o_slc + g_swa * o_swa with gates [..., (cmp, slc, swa)].

All of it stays inside one document (``segment_ids``); blocks start at each document's first
token. Every query rebuilds its blocks from the keys it may see: slow and obviously correct.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from lte_jax.ops.attention.reference import compute_dtype
from lte_jax.ops.lte_attention.reference import token_positions

_HI = jax.lax.Precision.HIGHEST


def _attend(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, scale: float) -> jax.Array:
  """q [B, Hkv, G, D], k [B, S, Hkv, D], v [B, S, Hkv, Dv], mask [B, Hkv or 1, S] bool
  -> ([B, Hkv, G, Dv], probabilities [B, Hkv, G, S]); a row with no visible key gives zeros."""
  logits = jnp.einsum("bhgd,bshd->bhgs", q, k, precision=_HI) * scale
  logits = jnp.where(mask[:, :, None, :], logits, -jnp.inf)
  row_max = jnp.max(logits, axis=-1, keepdims=True)
  row_max = jax.lax.stop_gradient(jnp.where(jnp.isneginf(row_max), 0.0, row_max))
  p = jnp.exp(logits - row_max)
  denom = jnp.sum(p, axis=-1, keepdims=True)
  p = p / jnp.where(denom > 0, denom, 1.0)
  return jnp.einsum("bhgs,bshd->bhgd", p, v, precision=_HI), p


def selected_blocks_reference(importance: jax.Array, current: jax.Array, *,
                              block_count: int) -> jax.Array:
  """importance [B, Hkv, C] f32, current [B] int (the query's block) -> [B, Hkv, C] bool.

  Candidates are the blocks c <= current; blocks 0, current - 1 and current come first, then
  the others by decreasing importance, the earlier block first on ties; the first
  block_count candidates in that order are selected.
  """
  c = jnp.arange(importance.shape[-1])[None, None, :]
  cur = current[:, None, None]
  forced = (c == 0) | (c == cur - 1) | (c == cur)
  # Ascending sort key: forced blocks (-inf) first, then by importance, non-candidates last.
  key = jnp.where(c <= cur, -jnp.where(forced, jnp.inf, importance), jnp.inf)
  order = jnp.argsort(key, axis=-1, stable=True)
  rank = jnp.argsort(order, axis=-1, stable=True)
  return (c <= cur) & (rank < block_count)


def nsa_attention_reference(q: jax.Array, k: jax.Array, v: jax.Array, gates: jax.Array, *,
                            block_size: int, block_count: int, window_size: int | None,
                            segment_ids: jax.Array | None, scale: float) -> jax.Array:
  """q [B, T, Hq, D], k [B, T, Hkv, D], v [B, T, Hkv, Dv], gates [B, T, Hq, 3]
  -> o [B, T, Hq, Dv] in v.dtype (fp32 math; float64 for float64 inputs)."""
  batch, time, num_heads, head_dim = q.shape
  num_kv_heads = k.shape[2]
  group = num_heads // num_kv_heads
  f = compute_dtype(q)
  qf, kf, vf = (x.astype(f) for x in (q, k, v))
  gf = gates.astype(f)
  seg = jnp.zeros((batch, time), jnp.int32) if segment_ids is None else segment_ids
  pos = token_positions(segment_ids, batch, time)             # [B, T]
  blk = pos // block_size                                     # block of each token
  num_blocks = -(-time // block_size)
  blocks = jnp.arange(num_blocks)
  t = jnp.arange(time)

  def one_query(i):
    q_i = qf[:, i].reshape(batch, num_kv_heads, group, head_dim)
    seen = (seg == seg[:, i][:, None]) & (t[None, :] <= i)       # [B, T] keys i may read
    p_i = pos[:, i]
    cur = p_i // block_size
    # Compression: the mean of every complete block of i's document.
    member = seen[:, None, :] & (blk[:, None, :] == blocks[None, :, None])    # [B, C, T]
    complete = (blocks[None, :] + 1) * block_size <= p_i[:, None] + 1          # [B, C]
    weights = member.astype(f) / block_size
    k_cmp = jnp.einsum("bct,bthd->bchd", weights, kf, precision=_HI)
    v_cmp = jnp.einsum("bct,bthd->bchd", weights, vf, precision=_HI)
    o_cmp, p_cmp = _attend(q_i, k_cmp, v_cmp, complete[:, None, :], scale)
    # Selection from the compression probabilities, summed over the KV group.
    importance = jnp.sum(jax.lax.stop_gradient(p_cmp), axis=2)               # [B, Hkv, C]
    chosen = selected_blocks_reference(importance, cur, block_count=block_count)
    slc_mask = seen[:, None, :] & jnp.take_along_axis(
        chosen, jnp.broadcast_to(blk[:, None, :], (batch, num_kv_heads, time)), axis=-1)
    o_slc, _ = _attend(q_i, kf, vf, slc_mask, scale)
    g_i = gf[:, i].reshape(batch, num_kv_heads, group, 3)
    o = g_i[..., 0:1] * o_cmp + g_i[..., 1:2] * o_slc
    if window_size is not None:
      swa_mask = seen & (i - t[None, :] <= window_size)
      o_swa, _ = _attend(q_i, kf, vf, swa_mask[:, None, :], scale)
      o = o + g_i[..., 2:3] * o_swa
    return o.reshape(batch, num_heads, -1)

  out = jax.lax.map(one_query, t)                             # [T, B, Hq, Dv]
  return jnp.moveaxis(out, 0, 1).astype(v.dtype)
