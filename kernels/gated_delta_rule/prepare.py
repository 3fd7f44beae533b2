"""Kernel 1: the per-chunk WY (UT) transform, parallel over chunks.

With T = (I + A)^-1 from the inverse kernel:
  U = T (beta V)  [C, Dv]   and   W = T (beta qd K)  [C, Dk],
qd_i = [token i continues the chunk's incoming document] e^{G_i}. The
recurrence then needs only V_new = U - W h (PAPER.md section 2, steps 2-4).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from lte_jax.kernels.gated_delta_rule import backend, chunk_math as cm


def _kernel(t_ref, k_ref, v_ref, beta_ref, qd_ref, w_ref, u_ref, *, precision, low):
  t, beta = t_ref[...], beta_ref[...]
  # low: operands rounded to the inputs' dtype (bf16 tensor-core products, as FLA).
  mm = (functools.partial(cm.mm, dtype=k_ref.dtype) if low
        else functools.partial(cm.mm, precision=precision))
  u = mm(t, beta * v_ref[...].astype(cm.F32))
  w = mm(t, (beta * qd_ref[...]) * k_ref[...].astype(cm.F32))
  u_ref[...] = u.astype(u_ref.dtype)
  w_ref[...] = w.astype(w_ref.dtype)


def wy_transform(plan: backend.Plan, layout: backend.Layout, t, k, v, beta_col, qd_col, *,
                 state_dtype=jnp.float32):
  """t [BH, N, C, C]; k, v token tensors (layout) of widths Dk, Dv; columns
  [BH, N, C, 1] -> w [BH, N, C, Dk], u [BH, N, C, Dv] in state_dtype."""
  bh, n, c, dk = layout.bh, layout.chunks, layout.chunk, k.shape[-1]
  dv = v.shape[-1]
  col = backend.per_chunk(c, 1)
  return backend.call(
      functools.partial(_kernel, precision=plan.inverse_dot_precision(k.dtype),
                        low=plan.wy_dtype(k.dtype) != jnp.float32),
      plan, grid=(bh, n),
      in_specs=[backend.per_chunk(c, c), layout.block(dk), layout.block(dv), col, col],
      out_specs=[backend.per_chunk(c, dk), backend.per_chunk(c, dv)],
      out_shape=[jax.ShapeDtypeStruct((bh, n, c, dk), state_dtype),
                 jax.ShapeDtypeStruct((bh, n, c, dv), state_dtype)],
      name="gdn_wy_transform",
  )(t, k, v, beta_col, qd_col)
