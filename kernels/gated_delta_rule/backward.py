"""Kernel 4: gradients of one chunk's inputs, parallel over chunks.

Given the state h entering the chunk, the gradient dh of the state leaving it,
V_new and its total gradient dV (both from the recurrences), this recomputes the
WY inverse T and differentiates, for one chunk (P = Q K^T * causal decay Dc,
A = beta (K K^T * strict decay Ds), T = (I + A)^-1):
  O = scale [qd Q h + P V_new]              h_next = hd h + (kd K)^T V_new
  V_new = U - W h,  U = T (beta V),  W = T (beta qd K).
Gradients of the decays come out per token as dG = rowsum(Z) - colsum(Z) with
Z = dDc * Dc + dDs * Ds, plus the gradients of the scalars qd, kd and hd; the
caller's autodiff carries those back to g (cumsum, masked exps).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from lte_jax.kernels.gated_delta_rule import backend, chunk_math as cm
from lte_jax.kernels.gated_delta_rule.prepare import wy_inverse


def _rowsum(x):
  return jnp.sum(x, axis=1, keepdims=True)


def _kernel(q_ref, k_ref, v_ref, beta_ref, g_ref, g_row_ref, seg_ref, seg_row_ref, qd_ref,
            kd_ref, h_ref, dh_ref, v_new_ref, dv_ref, do_ref,
            dq_ref, dk_ref, dvin_ref, dbeta_ref, dg_ref, dg_row_ref, dqd_ref, dkd_ref,
            dhd_ref, *, scale):
  q, k = q_ref[...], k_ref[...]
  dtype = q.dtype
  qf, kf, vf = q.astype(cm.F32), k.astype(cm.F32), v_ref[...].astype(cm.F32)
  beta, qd, kd = beta_ref[...], qd_ref[...], kd_ref[...]
  g_col, g_row, seg_col, seg_row = g_ref[...], g_row_ref[...], seg_ref[...], seg_row_ref[...]
  h, dh = h_ref[...].astype(cm.F32), dh_ref[...].astype(cm.F32)
  v_new, dv, d_o = v_new_ref[...], dv_ref[...], do_ref[...]

  # Output part: O = scale [qd Q h + (S * Dc) V_new], S = Q K^T.
  causal, _ = cm.decay_masks(g_col, g_row, seg_col, seg_row)
  s = cm.mm(q, k, tb=True, dtype=dtype)
  d_p = scale * cm.mm(d_o, v_new, tb=True, dtype=dtype)           # dL/dP
  d_s = d_p * causal
  do_h = cm.mm(d_o, h, tb=True, dtype=dtype)                       # [C, Dk]
  dq = scale * qd * do_h + cm.mm(d_s, k, dtype=dtype)
  dk = cm.mm(d_s, q, ta=True, dtype=dtype)
  dqd = scale * _rowsum(qf * do_h)
  z = d_p * s * causal                                             # dDc * Dc

  # State carry: h_next = hd h + (kd K)^T V_new.
  v_dh = cm.mm(v_new, dh, tb=True, dtype=dtype)                    # [C, Dk]
  dk = dk + kd * v_dh
  dkd = _rowsum(kf * v_dh)
  dhd = jnp.sum(_rowsum(h * dh), axis=0, keepdims=True)            # [1, 1]

  # V_new = U - W h with U = T (beta V), W = T (beta qd K).
  t, strict = wy_inverse(k, beta, g_col, g_row, seg_col, seg_row, dtype)
  d_w = -cm.mm(dv, h, tb=True)                                     # [C, Dk]
  t_du = cm.mm(t, dv, ta=True)                                     # [C, Dv]
  t_dw = cm.mm(t, d_w, ta=True)                                    # [C, Dk]
  dvin = beta * t_du
  k_t_dw = _rowsum(kf * t_dw)
  dbeta = _rowsum(vf * t_du) + qd * k_t_dw
  dqd = dqd + beta * k_t_dw
  dk = dk + (beta * qd) * t_dw

  # T = (I + A)^-1:  dA = -T^T dT T^T, kept where A can be non-zero.
  d_t = cm.mm(dv, beta * vf, tb=True) + cm.mm(d_w, (beta * qd) * kf, tb=True)
  d_a = -cm.mm(cm.mm(t, d_t, ta=True), t, tb=True)  # only its strict same-doc part is used
  # A = beta (B * Ds) with B = K K^T.
  b = cm.mm(k, k, tb=True, dtype=dtype)
  e = beta * d_a * strict                                          # dL/dB
  dk = dk + cm.mm(e, kf) + cm.mm(e, kf, ta=True)
  dbeta = dbeta + _rowsum(d_a * strict * b)
  z = z + e * b                                                    # dDs * Ds

  # The diagonal decay is a constant e^0: its O(1) terms would enter dG_i twice with
  # opposite signs and leave only rounding noise, swamping tiny true gradients.
  z = cm.strict_lower(z)

  dq_ref[...] = dq
  dk_ref[...] = dk
  dvin_ref[...] = dvin
  dbeta_ref[...] = dbeta
  dg_ref[...] = _rowsum(z)
  dg_row_ref[...] = -jnp.sum(z, axis=0, keepdims=True)
  dqd_ref[...] = dqd
  dkd_ref[...] = dkd
  dhd_ref[...] = dhd


def chunk_input_grads(plan: backend.Plan, q, k, v, beta_col, g_col, g_row, seg_col, seg_row,
                      qd_col, kd_col, h, dh, v_new, dv, d_o, *, scale: float):
  """Per-chunk gradients, all fp32: dq, dk [BH, N, C, Dk]; dv [BH, N, C, Dv]; dbeta,
  dG (row-sum part), dqd, dkd [BH, N, C, 1]; dG (column-sum part) [BH, N, 1, C];
  dhd [BH, N, 1, 1]."""
  bh, n, c, dk = q.shape
  dvd = v.shape[-1]
  chunk = backend.per_chunk
  col, row = chunk(c, 1), chunk(1, c)
  shapes = [(c, dk), (c, dk), (c, dvd), (c, 1), (c, 1), (1, c), (c, 1), (c, 1), (1, 1)]
  return backend.call(
      functools.partial(_kernel, scale=scale), plan, grid=(bh, n),
      in_specs=[chunk(c, dk), chunk(c, dk), chunk(c, dvd), col, col, row, col, row, col, col,
                chunk(dk, dvd), chunk(dk, dvd), chunk(c, dvd), chunk(c, dvd), chunk(c, dvd)],
      out_specs=[chunk(*s) for s in shapes],
      out_shape=[jax.ShapeDtypeStruct((bh, n, *s), cm.F32) for s in shapes],
      name="gdn_chunk_input_grads",
  )(q, k, v, beta_col, g_col, g_row, seg_col, seg_row, qd_col, kd_col, h, dh, v_new, dv, d_o)
