"""Kernel 1: the per-chunk WY (UT) transform, parallel over chunks.

With A = [j < i, same doc] beta_i e^{G_i - G_j} k_i.k_j and T = (I + A)^-1:
  U = T (beta V)  [C, Dv]   and   W = T (beta qd K)  [C, Dk],
qd_i = [token i continues the chunk's incoming document] e^{G_i}. The
recurrence then needs only V_new = U - W h (PAPER.md section 2, steps 2-4).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from lte_jax.kernels.gated_delta_rule import backend, chunk_math as cm


def wy_inverse(k, beta_col, g_col, g_row, seg_col, seg_row, dtype, precision):
  """T = (I + A)^-1 [C, C] fp32 and the masked strict decay used to build A."""
  _, strict = cm.decay_masks(g_col, g_row, seg_col, seg_row)
  a = beta_col * cm.mm(k, k, tb=True, dtype=dtype) * strict
  return cm.unit_lower_inverse(a, precision), strict


def _kernel(k_ref, v_ref, beta_ref, g_ref, g_row_ref, seg_ref, seg_row_ref, qd_ref,
            w_ref, u_ref, *, dtype, precision):
  k, beta = k_ref[...], beta_ref[...]
  t, _ = wy_inverse(k, beta, g_ref[...], g_row_ref[...], seg_ref[...], seg_row_ref[...],
                    dtype, precision)
  u_ref[...] = cm.mm(t, beta * v_ref[...].astype(cm.F32)).astype(u_ref.dtype)
  w_ref[...] = cm.mm(t, (beta * qd_ref[...]) * k.astype(cm.F32)).astype(w_ref.dtype)


def wy_transform(plan: backend.Plan, k, v, beta_col, g_col, g_row, seg_col, seg_row, qd_col,
                 *, state_dtype=jnp.float32):
  """k [BH, N, C, Dk], v [BH, N, C, Dv], columns [BH, N, C, 1], rows [BH, N, 1, C]
  -> w [BH, N, C, Dk], u [BH, N, C, Dv] in state_dtype."""
  bh, n, c, dk = k.shape
  dv = v.shape[-1]
  col, row = backend.per_chunk(c, 1), backend.per_chunk(1, c)
  return backend.call(
      functools.partial(_kernel, dtype=k.dtype, precision=plan.inverse_dot_precision), plan,
      grid=(bh, n),
      in_specs=[backend.per_chunk(c, dk), backend.per_chunk(c, dv), col, col, row, col, row,
                col],
      out_specs=[backend.per_chunk(c, dk), backend.per_chunk(c, dv)],
      out_shape=[jax.ShapeDtypeStruct((bh, n, c, dk), state_dtype),
                 jax.ShapeDtypeStruct((bh, n, c, dv), state_dtype)],
      name="gdn_wy_transform",
  )(k, v, beta_col, g_col, g_row, seg_col, seg_row, qd_col)
