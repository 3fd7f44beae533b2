"""Native Sparse Attention in plain JAX, vectorised over queries.

Blocks restart at every document, so a packed row holds at most T // block_size
COMPLETE blocks whatever its documents: those are compacted, in time order, into
``T // block_size`` slots (``BlockLayout``). Only complete blocks are ever read in
compressed form, so the three branches become:

- compression: masked softmax attention of the queries over the slots' mean-pooled
  keys / values (the shared blockwise softmax of ops/attention/xla.py);
- selection (no gradient): the same probabilities, summed over each KV group, pick
  the free blocks with ``lax.top_k`` per query; the result is a bitmap
  [B, T, Hkv, ceil(T / block_size)] over in-document block indices;
- selected attention: the blockwise softmax over all keys with the mask
  "causal, same document, key's block set in the query's bitmap". This does the
  O(T^2) dense work of full attention (the sparsity saves nothing here); a gather
  kernel that reads only the selected blocks is the place to save it;
- sliding window: the blockwise softmax over the window's keys only.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from lte_jax import segments
from lte_jax.ops.attention.xla import (DEFAULT_BLOCK_Q, MaskFn, blockwise_attention,
                                       causal_mask_fn, take_time)
from lte_jax.ops.lte_attention.reference import token_positions


class BlockLayout(NamedTuple):
  """The complete blocks of every row, one per slot, in time order; [B, S] int32 each.

  end:   last token of the block (-1: empty slot)
  doc:   document index of the block (-1: empty slot)
  index: block index inside its document
  """
  end: jax.Array
  doc: jax.Array
  index: jax.Array


def document_index(segment_ids: jax.Array | None, batch: int, time: int) -> jax.Array:
  """[B, T] int32 running count of documents (0 for the first): equal iff same document."""
  if segment_ids is None:
    return jnp.zeros((batch, time), jnp.int32)
  return jnp.cumsum(segments.document_starts(segment_ids), axis=1, dtype=jnp.int32) - 1


def block_layout(positions: jax.Array, doc: jax.Array, block_size: int) -> BlockLayout:
  """positions, doc [B, T] (in-document position, document index) -> BlockLayout with
  max(1, T // block_size) slots."""
  batch, time = positions.shape
  num_slots = max(1, time // block_size)
  is_end = positions % block_size == block_size - 1
  slot = jnp.where(is_end, jnp.cumsum(is_end, axis=1) - 1, num_slots)  # num_slots: dropped
  rows = jnp.arange(batch)[:, None]
  t = jnp.broadcast_to(jnp.arange(time, dtype=jnp.int32), (batch, time))
  end = jnp.full((batch, num_slots), -1, jnp.int32).at[rows, slot].set(t, mode="drop")
  safe = jnp.clip(end, 0, time - 1)
  block_doc = jnp.where(end >= 0, jnp.take_along_axis(doc, safe, axis=1), -1)
  index = jnp.take_along_axis(positions, safe, axis=1) // block_size
  return BlockLayout(end=end, doc=block_doc, index=index)


def mean_pool(x: jax.Array, layout: BlockLayout, block_size: int) -> jax.Array:
  """x [B, T, H, D] -> [B, S, H, D] in x.dtype: the fp32 mean of each slot's block (0 if empty)."""
  batch, time = x.shape[:2]
  num_slots = layout.end.shape[1]
  start = layout.end - (block_size - 1)
  idx = jnp.clip(start[:, :, None] + jnp.arange(block_size), 0, time - 1)
  idx = idx.reshape(batch, num_slots * block_size)
  tokens = jnp.take_along_axis(x, idx[:, :, None, None], axis=1).astype(jnp.float32)
  pooled = jnp.mean(tokens.reshape(batch, num_slots, block_size, *x.shape[2:]), axis=2)
  return jnp.where((layout.end >= 0)[:, :, None, None], pooled, 0.0).astype(x.dtype)


def compressed_mask_fn(layout: BlockLayout, doc: jax.Array) -> MaskFn:
  """Slot s is visible to query i iff its block is complete by i and in i's document."""
  def mask_fn(q_idx, k_idx):
    end = take_time(layout.end, k_idx)
    block_doc = take_time(layout.doc, k_idx)
    doc_q = take_time(doc, q_idx)
    mask = (end[:, None, :] >= 0) & (end[:, None, :] <= q_idx[None, :, None])
    mask = mask & (block_doc[:, None, :] == doc_q[:, :, None])
    return mask[:, None]
  return mask_fn


def _masked_softmax(logits: jax.Array, mask: jax.Array) -> jax.Array:
  """Softmax over the last axis where mask is True; 0 elsewhere and on rows with no True."""
  logits = jnp.where(mask, logits, -jnp.inf)
  row_max = jnp.max(logits, axis=-1, keepdims=True)
  p = jnp.exp(logits - jnp.where(jnp.isneginf(row_max), 0.0, row_max))
  denom = jnp.sum(p, axis=-1, keepdims=True)
  return p / jnp.where(denom > 0, denom, 1.0)


def select_blocks(q: jax.Array, k_cmp: jax.Array, layout: BlockLayout, positions: jax.Array,
                  doc: jax.Array, *, block_size: int, block_count: int, scale: float,
                  block_q: int = DEFAULT_BLOCK_Q) -> jax.Array:
  """Selected blocks per query: [B, T, Hkv, ceil(T / block_size)] bool over in-document
  block indices. q [B, T, Hq, D], k_cmp [B, S, Hkv, D]; no gradient flows through.

  Blocks 0, c - 1 and c (c = the query's block) always; the other block_count - |forced|
  are the blocks 1 <= b <= c - 2 with the largest compression probability summed over
  the KV group (top_k: the earlier block wins a tie).
  """
  q, k_cmp = jax.lax.stop_gradient(q), jax.lax.stop_gradient(k_cmp)
  batch, time, num_heads, head_dim = q.shape
  num_kv_heads, num_slots = k_cmp.shape[2], k_cmp.shape[1]
  num_blocks = -(-time // block_size)
  top = min(block_count, num_slots)
  mask_fn = compressed_mask_fn(layout, doc)
  k32 = k_cmp.astype(jnp.float32)
  num_q_blocks = -(-time // block_q)
  q_pad = jnp.pad(q, ((0, 0), (0, num_q_blocks * block_q - time), (0, 0), (0, 0)))

  def block(start):
    q_idx = start + jnp.arange(block_q)
    q_blk = jax.lax.dynamic_slice_in_dim(q_pad, start, block_q, axis=1).astype(jnp.float32)
    q_blk = q_blk.reshape(batch, block_q, num_kv_heads, num_heads // num_kv_heads, head_dim)
    logits = jnp.einsum("bqhgd,bshd->bhgqs", q_blk, k32, precision=jax.lax.Precision.HIGHEST)
    visible = mask_fn(q_idx, jnp.arange(num_slots))                     # [B, 1, Bq, S]
    p = _masked_softmax(logits * scale, visible[:, :, None])
    importance = jnp.sum(p, axis=2)                                      # [B, Hkv, Bq, S]
    cur = take_time(positions, q_idx) // block_size                      # [B, Bq]
    index = layout.index[:, None, None, :]
    free = visible & (index >= 1) & (index <= cur[:, None, :, None] - 2)
    values, slots = jax.lax.top_k(jnp.where(free, importance, -jnp.inf), top)
    num_forced = jnp.minimum(cur + 1, 3)[:, None, :, None]
    keep = (jnp.arange(top) < block_count - num_forced) & (values > -jnp.inf)
    chosen = jnp.take_along_axis(jnp.broadcast_to(index, importance.shape), slots, axis=-1)
    chosen = jnp.where(keep, chosen, -1)                                 # [B, Hkv, Bq, top]
    b = jnp.arange(num_blocks)
    bitmap = jnp.any(chosen[..., None] == b, axis=-2)                    # [B, Hkv, Bq, C]
    c = cur[:, None, :, None]
    return bitmap | (b == 0) | (b == c - 1) | (b == c)

  out = jax.lax.map(block, jnp.arange(num_q_blocks) * block_q)         # [nq, B, Hkv, Bq, C]
  out = jnp.transpose(out, (1, 0, 3, 2, 4)).reshape(batch, -1, num_kv_heads, num_blocks)
  return out[:, :time]


def selected_mask_fn(selected: jax.Array, positions: jax.Array, segment_ids: jax.Array | None,
                     block_size: int) -> MaskFn:
  """Key j is visible to query i iff causal, same document and j's block is selected by i."""
  causal = causal_mask_fn(segment_ids, None)

  def mask_fn(q_idx, k_idx):
    rows = jnp.transpose(take_time(selected, q_idx), (0, 2, 1, 3))     # [B, Hkv, Bq, C]
    key_block = take_time(positions, k_idx) // block_size              # [B, Sk]
    shape = rows.shape[:3] + (k_idx.shape[0],)
    chosen = jnp.take_along_axis(rows, jnp.broadcast_to(key_block[:, None, None, :], shape),
                                 axis=-1)
    return causal(q_idx, k_idx) & chosen
  return mask_fn


def pooled_blocks(k: jax.Array, v: jax.Array | None, segment_ids: jax.Array | None,
                  block_size: int):
  """-> (k_cmp, v_cmp (None without v), layout, positions [B, T], doc [B, T]): the
  mean-pooled blocks of k and v and the block layout both branches read."""
  batch, time = k.shape[:2]
  positions = token_positions(segment_ids, batch, time)
  doc = document_index(segment_ids, batch, time)
  layout = block_layout(positions, doc, block_size)
  v_cmp = None if v is None else mean_pool(v, layout, block_size)
  return mean_pool(k, layout, block_size), v_cmp, layout, positions, doc


def nsa_attention_xla(q: jax.Array, k: jax.Array, v: jax.Array, gates: jax.Array, *,
                      block_size: int, block_count: int, window_size: int | None,
                      segment_ids: jax.Array | None, scale: float,
                      block_q: int = DEFAULT_BLOCK_Q) -> jax.Array:
  """q [B, T, Hq, D], k [B, T, Hkv, D], v [B, T, Hkv, Dv], gates [B, T, Hq, 3]
  -> o [B, T, Hq, Dv] in v.dtype."""
  k_cmp, v_cmp, layout, positions, doc = pooled_blocks(k, v, segment_ids, block_size)
  o_cmp = blockwise_attention(q, k_cmp, v_cmp, compressed_mask_fn(layout, doc), scale=scale,
                              block_q=block_q)
  selected = select_blocks(q, k_cmp, layout, positions, doc, block_size=block_size,
                           block_count=block_count, scale=scale, block_q=block_q)
  o_slc = blockwise_attention(q, k, v, selected_mask_fn(selected, positions, segment_ids,
                                                        block_size),
                              scale=scale, block_q=block_q)
  g = gates.astype(jnp.float32)
  o = g[..., 0:1] * o_cmp + g[..., 1:2] * o_slc
  if window_size is not None:
    o_swa = blockwise_attention(q, k, v, causal_mask_fn(segment_ids, window_size), scale=scale,
                                block_q=block_q, lookback=window_size)
    o = o + g[..., 2:3] * o_swa
  return o.astype(v.dtype)
