"""Kernel 0: T = (I + A)^-1 per chunk, parallel over chunks, stored for the later stages.

A = [j < i, same doc] beta_i e^{G_i - G_j} k_i.k_j is strictly lower triangular,
[C, C] per chunk. T is written to memory (C values per token, like a C-wide head; bf16
when its products run in bf16) and read by the WY transform and the backward, so the
backward never recomputes it.

Two algorithms (Plan.inverse_form; the default follows the platform):
  'blocked' (GPU): blocks of 16 rows. Each 16 x 16 diagonal block of A comes straight from
    16-row slices of K and is inverted by doubling; the blocks below the diagonal
    follow by block forward substitution, T_ij = -T_ii sum_{j<=m<i} A_im T_mj.
    Every product is 16 x 16 (the smallest Triton dot), so the work is about
    C^3 / 3 instead of the 2 log2(C) full C x C products of the masked form.
  'doubling' (TPU): the masked full-size doubling (chunk_math.unit_lower_inverse): a 16-lane
    block is a poor fit for (8, 128) vector tiles, a 64 x 64 product is not.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from lte_jax.kernels.gated_delta_rule import backend, chunk_math as cm

BLOCK = 16
KEY_COLUMNS = 64


def _full_kernel(k_ref, beta_ref, g_ref, g_row_ref, seg_ref, seg_row_ref, t_ref, *, dtype,
                 precision):
  _, strict = cm.decay_masks(g_ref[...], g_row_ref[...], seg_ref[...], seg_row_ref[...])
  a = beta_ref[...] * cm.mm(k_ref[...], k_ref[...], tb=True, dtype=dtype) * strict
  t_ref[...] = cm.unit_lower_inverse(a, precision).astype(t_ref.dtype)


def _blocked_kernel(k_ref, beta_ref, g_ref, g_row_ref, seg_ref, seg_row_ref, t_ref, *, dtype,
                    precision):
  chunk, dk = k_ref.shape
  num_blocks = chunk // BLOCK
  rows = lambda i: pl.ds(i * BLOCK, BLOCK)
  i_iota = jax.lax.broadcasted_iota(jnp.int32, (BLOCK, BLOCK), 0)
  j_iota = jax.lax.broadcasted_iota(jnp.int32, (BLOCK, BLOCK), 1)
  # The Gram blocks K_i K_j^T summed over key columns KEY_COLUMNS at a time: only those
  # columns of K are live (all of a [C, 256] K in registers spilled kilobytes a thread).
  gram, step = {}, min(dk, KEY_COLUMNS)
  for d in range(0, dk, step):
    cols = pl.ds(d, step)
    k = [k_ref[rows(i), cols] for i in range(num_blocks)]
    for i in range(num_blocks):
      for j in range(i + 1):
        part = cm.mm(k[i], k[j], tb=True, dtype=dtype)
        gram[i, j] = part if d == 0 else gram[i, j] + part

  def a_block(i, j):
    """A's block (i, j), i >= j: [16, 16]."""
    same_doc = seg_ref[rows(i), :] == seg_row_ref[:, rows(j)]
    mask = same_doc & (i_iota > j_iota) if i == j else same_doc
    decay = cm.masked_exp2(g_ref[rows(i), :] - g_row_ref[:, rows(j)], mask)
    return beta_ref[rows(i), :] * gram.pop((i, j)) * decay

  mm = functools.partial(cm.mm, precision=precision)
  t = {}
  for i in range(num_blocks):
    t[i, i] = cm.unit_lower_inverse(a_block(i, i), precision)
    a_row = {m: a_block(i, m) for m in range(i)}
    for j in range(i):
      acc = mm(a_row[j], t[j, j])
      for m in range(j + 1, i):
        acc = acc + mm(a_row[m], t[m, j])
      t[i, j] = -mm(t[i, i], acc)
  zeros = jnp.zeros((BLOCK, BLOCK), t_ref.dtype)
  for i in range(num_blocks):
    for j in range(num_blocks):
      t_ref[rows(i), rows(j)] = t[i, j].astype(t_ref.dtype) if j <= i else zeros


def wy_inverse(plan: backend.Plan, layout: backend.Layout, k, beta_col, g_col, g_row,
               seg_col, seg_row):
  """k: token tensor (layout) of width Dk; columns [BH, N, C, 1]; rows [BH, N, 1, C]
  -> T [BH, N, C, C], computed in fp32 and stored in plan.wy_dtype(k.dtype) (bf16 when its
  products run in bf16 anyway: half the traffic of the later stages' reads)."""
  bh, n, c, dk = layout.bh, layout.chunks, layout.chunk, k.shape[-1]
  kernel = _blocked_kernel if plan.inverse_form == "blocked" else _full_kernel
  col, row = backend.per_chunk(c, 1), backend.per_chunk(1, c)
  return backend.call(
      functools.partial(kernel, dtype=k.dtype, precision=plan.inverse_dot_precision(k.dtype)),
      plan,
      grid=(bh, n),
      in_specs=[layout.block(dk), col, col, row, col, row],
      out_specs=[backend.per_chunk(c, c)],
      out_shape=[jax.ShapeDtypeStruct((bh, n, c, c), plan.wy_dtype(k.dtype))],
      name="gdn_wy_inverse",
  )(k, beta_col, g_col, g_row, seg_col, seg_row)[0]
