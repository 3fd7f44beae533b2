"""Kernel 4b: the WY backward, parallel over chunks.

With A = beta (K K^T * strict decay Ds), T = (I + A)^-1, U = T (beta V) and
W = T (beta qd K), this takes dV (the total gradient of V_new = U - W h, so also dU's)
and dW (qk_grads.py) and gives dv, the rest of dk (added to qk_grads' part), dbeta, the
WY share of dqd, and the strict decays' share of dG (Z = dDs * Ds, row and column sums).
dA = -T^T dT T^T; only its strict same-document part reaches A.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from lte_jax.kernels.gated_delta_rule import backend, chunk_math as cm


def _kernel(t_ref, k_ref, v_ref, beta_ref, g_ref, g_row_ref, seg_ref, seg_row_ref, qd_ref,
            dv_ref, dw_ref, dk_part_ref,
            dk_ref, dvin_ref, dbeta_ref, dqd_ref, dg_ref, dg_row_ref, *,
            block_k, block_v, t_mm):
  dtype = k_ref.dtype
  beta, qd = beta_ref[...], qd_ref[...]
  bq = beta * qd
  _, strict = cm.decay_masks(g_ref[...], g_row_ref[...], seg_ref[...], seg_row_ref[...])
  t = t_ref[...]
  # Products with T: t_mm (Plan.t_product: FLA's WY backward rounding by default); the
  # others take the inputs' dtype, fp32 accumulation.
  chunk, dk_dim = k_ref.shape
  zeros = lambda *shape: jnp.zeros(shape, cm.F32)
  # The column loops are loops, not unrolled: unrolled, the scheduler hoisted later
  # blocks' loads and the program spilled (experiments/kernel_resources.py).
  def value_block(j, carry):          # U = T (beta V)
    d_t, dbeta = carry
    cols = cm.column_block(j, block_v)
    dv, vf = dv_ref[:, cols], v_ref[:, cols].astype(cm.F32)
    t_du = t_mm(t, dv, ta=True)
    dvin_ref[:, cols] = (beta * t_du).astype(dvin_ref.dtype)
    return (d_t + cm.mm(dv, beta * vf, tb=True, dtype=dtype),
            dbeta + cm.rowsum(vf * t_du))

  d_t, dbeta = jax.lax.fori_loop(0, v_ref.shape[-1] // block_v, value_block,
                                 (zeros(chunk, chunk), zeros(chunk, 1)))   # dL/dT

  def key_block_dt(j, d_t):   # W = T (beta qd K): dT needs every key column before dA
    rows = cm.column_block(j, block_k)   # exists, so two passes over them
    return d_t + cm.mm(dw_ref[:, rows], bq * k_ref[:, rows].astype(cm.F32), tb=True,
                       dtype=dtype)

  d_t = jax.lax.fori_loop(0, dk_dim // block_k, key_block_dt, d_t)
  # A = beta (B * Ds) with B = K K^T and Ds the strict decays: everything needing B and dA
  # first, so that only dL/dB stays live through the dk loop below.
  d_a_ds = -t_mm(t_mm(t, d_t, ta=True), t, tb=True) * strict      # dA * Ds
  b = cm.mm(k_ref[...], k_ref[...], tb=True, dtype=dtype)
  dbeta = dbeta + cm.rowsum(d_a_ds * b)
  e = beta * d_a_ds                                                # dL/dB
  dg_ref[...], dg_row_ref[...] = cm.decay_grads(e * b)            # Z = dDs * Ds

  def key_block_dk(j, k_t_dw):
    rows = cm.column_block(j, block_k)
    k = k_ref[:, rows]
    t_dw = t_mm(t, dw_ref[:, rows], ta=True)                        # [C, block_k]
    dk = (dk_part_ref[:, rows] + bq * t_dw + cm.mm(e, k, dtype=dtype)
          + cm.mm(e, k, ta=True, dtype=dtype))
    dk_ref[:, rows] = dk.astype(dk_ref.dtype)
    return k_t_dw + cm.rowsum(k.astype(cm.F32) * t_dw)

  k_t_dw = jax.lax.fori_loop(0, dk_dim // block_k, key_block_dk, zeros(chunk, 1))
  dbeta_ref[...] = dbeta + qd * k_t_dw
  dqd_ref[...] = beta * k_t_dw


def wy_grads(plan: backend.Plan, layout: backend.Layout, t, k, v, beta_col, g_col, g_row,
             seg_col, seg_row, qd_col, dv, dw, dk_part):
  """dk (layout, k.dtype), dv (layout, v.dtype); fp32 dbeta, dqd (WY part) [BH, N, C, 1],
  dG (row-sum part) [BH, N, C, 1], (column-sum part) [BH, N, 1, C]. t [BH, N, C, C];
  dv [BH, N, C, Dv] (the reverse recurrence's); dw, dk_part: qk_grads' outputs."""
  bh, n, c, dk = layout.bh, layout.chunks, layout.chunk, k.shape[-1]
  dvd = v.shape[-1]
  chunk, tokens = backend.per_chunk, layout.block
  col, row = chunk(c, 1), chunk(1, c)
  scalar_shapes = [(c, 1), (c, 1), (c, 1), (1, c)]
  return backend.call(
      functools.partial(_kernel, block_k=plan.key_block(dk), block_v=plan.value_block(dvd),
                        t_mm=plan.t_product(k.dtype)), plan,
      grid=(bh, n),
      in_specs=[chunk(c, c), tokens(dk), tokens(dvd), col, col, row, col, row, col,
                chunk(c, dvd), tokens(dk), tokens(dk)],
      out_specs=[tokens(dk), tokens(dvd)] + [chunk(*s) for s in scalar_shapes],
      out_shape=[jax.ShapeDtypeStruct(layout.shape(dk), k.dtype),
                 jax.ShapeDtypeStruct(layout.shape(dvd), v.dtype)]
      + [jax.ShapeDtypeStruct((bh, n, *s), cm.F32) for s in scalar_shapes],
      name="gdn_wy_grads",
  )(t, k, v, beta_col, g_col, g_row, seg_col, seg_row, qd_col, dv, dw, dk_part)
