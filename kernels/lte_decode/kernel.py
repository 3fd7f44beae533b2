"""The split-K kernel: one program per (batch, KV head, run of cache slots).

Each program walks its slots in tiles of block_k and keeps an online softmax
(running max m, sum l, accumulator acc, all fp32) for its query rows: the Tq
query tokens x G query heads of one KV head, padded to a multiple of
Plan.min_rows. It writes the unnormalised partial (m, l, acc); api.combine
merges the splits. Visibility is computed from slot indices and three scalars,
never read from a per-slot mask:

  ring slot j < W1 holds position p_j = last - last_slot + j - (W1 if j > last_slot),
    visible to the query at position p iff 0 <= p_j <= p;
  retained slot W1 + r is visible to every query iff r < fill[b, h].

Per-slot things are rows [1, block_k] (logit masks) or columns [block_k, 1]
(load masks), each built from its own iota, so no vector is transposed.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from lte_jax.kernels.lte_decode import backend

F32 = jnp.float32


def dot(a, b, *, tb=False):
  """a @ b (b^T with tb) with fp32 accumulation; fp32 operands keep fp32 products
  (Triton would otherwise use TF32)."""
  dims = (((1,), (1,) if tb else (0,)), ((), ()))
  precision = jax.lax.Precision.HIGHEST if a.dtype == F32 else None
  return jax.lax.dot_general(a, b, dims, precision=precision, preferred_element_type=F32)


def _decode_kernel(meta_ref, fill_ref, q_ref, k_ref, v_ref, acc_ref, m_ref, l_ref, *,
                   plan: backend.Plan, ring: int, group: int, num_queries: int, scale: float,
                   split: int, compute_dtype):
  b, h, s = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  last, last_slot = meta_ref[0], meta_ref[1]
  fill = fill_ref[b, h]
  bk = plan.block_k
  q = q_ref[...].astype(compute_dtype)                      # [R, D]
  rows = q.shape[0]
  # Position of each query row: rows are (query token, head in the group), token-major.
  row = jax.lax.broadcasted_iota(jnp.int32, (rows, 1), 0)
  # (row // group, unrolled over the few tokens: Mosaic has no vector integer division)
  token = sum((row >= t * group).astype(jnp.int32) for t in range(1, num_queries))
  q_pos = last - (num_queries - 1) + token                   # [R, 1]
  ring_base = last - last_slot

  def slot_info(start, shape, axis):
    j = start + jax.lax.broadcasted_iota(jnp.int32, shape, axis)
    pos = ring_base + j - jnp.where(j > last_slot, ring, 0)
    in_ring = j < ring
    retained = (j >= ring) & (j < ring + fill)
    return pos, in_ring, retained

  def body(i, carry):
    m, l, acc = carry
    start = s * split + i * bk                                # first slot of the tile
    offset = start if plan.native_layout else i * bk          # ... inside the block
    pos_c, ring_c, ret_c = slot_info(start, (bk, 1), 0)
    readable = (ring_c & (pos_c >= 0)) | ret_c                # [bk, 1]
    k = backend.load_tile(plan, k_ref, offset, bk, readable).astype(compute_dtype)
    v = backend.load_tile(plan, v_ref, offset, bk, readable)
    pos_r, ring_r, ret_r = slot_info(start, (1, bk), 1)
    visible = (ring_r & (pos_r >= 0) & (pos_r <= q_pos)) | ret_r   # [R, bk]
    logits = jnp.where(visible, dot(q, k, tb=True) * scale, -jnp.inf)
    m_new = jnp.maximum(m, jnp.max(logits, axis=1, keepdims=True))
    m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)         # rows with nothing visible yet
    p = jnp.where(visible, jnp.exp(logits - m_safe), 0.0)
    alpha = jnp.exp(m - m_safe)
    l = alpha * l + jnp.sum(p, axis=1, keepdims=True)
    acc = alpha * acc + dot(p.astype(v.dtype), v)
    return m_new, l, acc

  init = (jnp.full((rows, 1), -jnp.inf, F32), jnp.zeros((rows, 1), F32),
          jnp.zeros(acc_ref.shape, F32))
  m, l, acc = jax.lax.fori_loop(0, split // bk, body, init)
  acc_ref[...] = acc
  m_ref[...] = m
  l_ref[...] = l


def partials(plan: backend.Plan, q, k, v, meta, fill, *, ring: int, group: int,
             num_queries: int, scale: float, split: int):
  """Partial softmax statistics of every split.

  q [B, Hkv, R, D] (rows token-major, padded); k, v: the cache, [B, S, Hkv, D]
  (GPU) or [B, Hkv, S_pad, D] (TPU, S_pad a multiple of split); meta [2] int32
  (newest query position, its ring slot); fill [B, Hkv] int32.
  -> acc [B, Hkv, N, R, Dv], m and l [B, Hkv, N, R, 1], fp32; N = splits.
  """
  batch, heads, rows, dk = q.shape
  dv = v.shape[-1]
  slots = k.shape[1] if plan.native_layout else k.shape[2]
  num_splits = -(-slots // split)
  compute_dtype = jnp.promote_types(q.dtype, k.dtype)
  sq = pl.squeezed
  if plan.native_layout:
    cache_spec = lambda d: pl.BlockSpec((sq, slots, sq, d), lambda b, h, s: (b, 0, h, 0))
  else:
    cache_spec = lambda d: pl.BlockSpec((sq, sq, split, d), lambda b, h, s: (b, h, s, 0))
  out_spec = lambda d: pl.BlockSpec((sq, sq, sq, rows, d), lambda b, h, s: (b, h, s, 0, 0))
  kernel = functools.partial(_decode_kernel, plan=plan, ring=ring, group=group,
                             num_queries=num_queries, scale=scale, split=split,
                             compute_dtype=compute_dtype)
  stat = jax.ShapeDtypeStruct((batch, heads, num_splits, rows, 1), F32)
  return backend.call(
      kernel, plan, grid=(batch, heads, num_splits),
      in_specs=[backend.scalar_spec(plan), backend.scalar_spec(plan),
                pl.BlockSpec((sq, sq, rows, dk), lambda b, h, s: (b, h, 0, 0)),
                cache_spec(dk), cache_spec(dv)],
      out_specs=[out_spec(dv), out_spec(1), out_spec(1)],
      out_shape=[jax.ShapeDtypeStruct((batch, heads, num_splits, rows, dv), F32), stat, stat],
      name="lte_decode_partials")(meta, fill, q, k, v)
