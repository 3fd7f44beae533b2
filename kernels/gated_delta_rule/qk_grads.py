"""Kernel 4a: the backward's dq, the output/state part of dk, and dW, parallel over chunks.

For one chunk (P = Q K^T * causal decay Dc):
  O = scale [qd Q h + P V_new]      h_next = hd h + (kd K)^T V_new      V_new = U - W h
so, with dV the total gradient of V_new (from the reverse recurrence) and dh that of h_next:
  dq = scale qd (dO h^T) + dS K,   dk_part = dS^T Q + kd (V_new dh^T),   dW = -dV h^T,
  dS = scale (dO V_new^T) * Dc.
dW goes to HBM for the WY backward (wy_grads.py), which adds its share of dk: one kernel
holding both halves kept three [C, Dk] and three [C, C] fp32 accumulators live per
program, more than a GPU's register file (it took 2.8 of the 4.1 ms of the whole
forward+backward on the H200). Here key columns go in blocks of Plan.block_k, so a program
holds three [C, block_k] accumulators and the [C, C] dS at a time.
The decays' share of dG comes out as Z = dDc * Dc (row and column sums; wy_grads.py adds
dDs * Ds); qd, kd and hd get their gradients as per-token (per-chunk) scalars.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from lte_jax.kernels.gated_delta_rule import backend, chunk_math as cm


def _kernel(q_ref, k_ref, g_ref, g_row_ref, seg_ref, seg_row_ref, qd_ref, kd_ref, h_ref,
            dh_ref, v_new_ref, dv_ref, do_ref,
            dq_ref, dk_ref, dw_ref, dqd_ref, dkd_ref, dhd_ref, dg_ref, dg_row_ref, *,
            scale, block_k, block_v):
  dtype = q_ref.dtype
  qd, kd = qd_ref[...], kd_ref[...]
  causal, _ = cm.decay_masks(g_ref[...], g_row_ref[...], seg_ref[...], seg_row_ref[...])
  chunk, dk_dim = q_ref.shape
  dv_dim = v_new_ref.shape[-1]
  zeros = lambda *shape: jnp.zeros(shape, cm.F32)
  d_p = zeros(chunk, chunk)
  dqd, dkd, dhd = zeros(chunk, 1), zeros(chunk, 1), zeros(1, 1)
  d_s = None
  for k_start in range(0, dk_dim, block_k):
    rows = pl.ds(k_start, block_k)
    first = d_s is None

    # Value blocks in a loop: only [block_k, block_v] tiles of the states are live. Unrolled,
    # the scheduler hoisted later blocks' loads: 472 stack bytes a thread at Dv = 256 on
    # sm_90 with 4 warps, 104 as a loop (experiments/kernel_resources.py, triton 3.6).
    def value_block(j, carry):
      d_p, do_h, v_dh, d_w, dhd = carry
      cols = cm.column_block(j, block_v)
      h, dh = h_ref[rows, cols].astype(cm.F32), dh_ref[rows, cols].astype(cm.F32)
      d_o, v_new, dv = do_ref[:, cols], v_new_ref[:, cols], dv_ref[:, cols]
      if first:   # dL/dP needs one pass over the values: the first key block's
        d_p = d_p + cm.mm(d_o, v_new, tb=True, dtype=dtype)
      return (d_p, do_h + cm.mm(d_o, h, tb=True, dtype=dtype),
              v_dh + cm.mm(v_new, dh, tb=True, dtype=dtype),
              d_w - cm.mm(dv, h, tb=True, dtype=dtype),
              dhd + jnp.sum(cm.rowsum(h * dh), axis=0, keepdims=True))

    d_p, do_h, v_dh, d_w, dhd = jax.lax.fori_loop(
        0, dv_dim // block_v, value_block,
        (d_p, zeros(chunk, block_k), zeros(chunk, block_k), zeros(chunk, block_k), dhd))
    if d_s is None:
      d_s = scale * d_p * causal
    q, k = q_ref[:, rows], k_ref[:, rows]
    dq_ref[:, rows] = (scale * qd * do_h + cm.mm(d_s, k, dtype=dtype)).astype(dq_ref.dtype)
    dk_ref[:, rows] = cm.mm(d_s, q, ta=True, dtype=dtype) + kd * v_dh
    dw_ref[:, rows] = d_w.astype(dw_ref.dtype)
    dqd = dqd + scale * cm.rowsum(q.astype(cm.F32) * do_h)
    dkd = dkd + cm.rowsum(k.astype(cm.F32) * v_dh)
  # S = Q K^T once the accumulators are gone, rather than summed over the key blocks
  # alongside them: one [C, C] fp32 tile fewer live in the loop.
  s = cm.mm(q_ref[...], k_ref[...], tb=True, dtype=dtype)
  dg_ref[...], dg_row_ref[...] = cm.decay_grads(d_s * s)          # Z = dDc * Dc
  dqd_ref[...] = dqd
  dkd_ref[...] = dkd
  dhd_ref[...] = dhd


def chunk_qk_grads(plan: backend.Plan, layout: backend.Layout, q, k, g_col, g_row, seg_col,
                   seg_row, qd_col, kd_col, h, dh, v_new, dv, d_o, *, dw_dtype, scale: float):
  """dq (layout, q.dtype), dk_part (layout, fp32; wy_grads adds the rest), dW (layout,
  dw_dtype); fp32 dqd, dkd [BH, N, C, 1], dhd [BH, N, 1, 1], dG (row-sum part)
  [BH, N, C, 1] and (column-sum part) [BH, N, 1, C]. h, dh [BH, N, Dk, Dv]; v_new, dv
  [BH, N, C, Dv] (the recurrences' layouts); d_o token layout."""
  bh, n, c, dk = layout.bh, layout.chunks, layout.chunk, q.shape[-1]
  dvd = d_o.shape[-1]
  block_k = plan.key_block(dk)
  key_grid = plan.qk_key_grid and dk > block_k     # TPU: key_block is all of Dk
  chunk, tokens = backend.per_chunk, layout.block
  col, row = chunk(c, 1), chunk(1, c)
  scalar_shapes = [(c, 1), (c, 1), (1, 1), (c, 1), (1, c)]
  kernel = functools.partial(_kernel, scale=scale, block_k=block_k,
                             block_v=plan.value_block(dvd))
  big_shapes = [jax.ShapeDtypeStruct(layout.shape(dk), dt) for dt in (q.dtype, cm.F32, dw_dtype)]
  inputs = (q, k, g_col, g_row, seg_col, seg_row, qd_col, kd_col, h, dh, v_new, dv, d_o)
  if not key_grid:
    return backend.call(
        kernel, plan, grid=(bh, n),
        in_specs=[tokens(dk), tokens(dk), col, row, col, row, col, col, chunk(dk, dvd),
                  chunk(dk, dvd), chunk(c, dvd), chunk(c, dvd), tokens(dvd)],
        out_specs=[tokens(dk)] * 3 + [chunk(*s) for s in scalar_shapes],
        out_shape=big_shapes + [jax.ShapeDtypeStruct((bh, n, *s), cm.F32)
                                for s in scalar_shapes],
        name="gdn_chunk_qk_grads",
    )(*inputs)
  # Plan.qk_key_grid: program (b, n, j) sees key columns j * block_k... of q, k, dq, dk, dW
  # and key rows of h, dh, so the kernel body runs its key loop once; the scalar
  # gradients come out per key block, summed below.
  nk = dk // block_k
  keys = layout.column_block(block_k)
  state_rows = pl.BlockSpec((pl.squeezed, pl.squeezed, block_k, dvd),
                            lambda b, i, j: (b, i, j, 0))
  per_key = lambda *s: pl.BlockSpec((pl.squeezed, pl.squeezed, pl.squeezed, *s),
                                    lambda b, i, j: (b, i, j) + (0,) * len(s))
  *big, dqd, dkd, dhd, dg_col, dg_row = backend.call(
      kernel, plan, grid=(bh, n, nk),
      in_specs=[keys, keys, col, row, col, row, col, col, state_rows, state_rows,
                chunk(c, dvd), chunk(c, dvd), tokens(dvd)],
      out_specs=[keys] * 3 + [per_key(*s) for s in scalar_shapes],
      out_shape=big_shapes + [jax.ShapeDtypeStruct((bh, n, nk, *s), cm.F32)
                              for s in scalar_shapes],
      name="gdn_chunk_qk_grads",
  )(*inputs)
  return (*big, *(x.sum(axis=2) for x in (dqd, dkd, dhd, dg_col, dg_row)))
