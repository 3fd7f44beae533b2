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


def _kernel(t_ref, k_ref, v_ref, beta_ref, bqd_ref, w_ref, u_ref, *, t_mm, block_k, block_v):
  t = t_ref[...]
  # T diag(beta) V: the per-token factors scale T's [C, C] columns (rows [1, C]) rather
  # than V's and K's [C, D] rows, so K and V enter the dots as loaded: no [C, D] fp32
  # copies. Column blocks, each stored before the next: one [C, block] fp32 product live
  # (all of U and W at D = 256 took 256 registers a thread at 4 warps, and spilled), in
  # a fori_loop so Triton can pipeline the next block's load behind this one's product.
  for out_ref, in_ref, factor, block in ((u_ref, v_ref, beta_ref, block_v),
                                         (w_ref, k_ref, bqd_ref, block_k)):
    scaled = t * factor[...]

    def column(j, carry, out_ref=out_ref, in_ref=in_ref, scaled=scaled, block=block):
      cols = cm.column_block(j, block)
      out_ref[:, cols] = t_mm(scaled, in_ref[:, cols]).astype(out_ref.dtype)
      return carry

    jax.lax.fori_loop(0, in_ref.shape[-1] // block, column, 0)


def wy_transform(plan: backend.Plan, layout: backend.Layout, t, k, v, beta_row, bqd_row, *,
                 state_dtype=jnp.float32):
  """t [BH, N, C, C]; k, v token tensors (layout) of widths Dk, Dv; beta and beta * qd as
  rows [BH, N, 1, C] fp32 -> w [BH, N, C, Dk], u [BH, N, C, Dv] in state_dtype."""
  bh, n, c, dk = layout.bh, layout.chunks, layout.chunk, k.shape[-1]
  dv = v.shape[-1]
  row = backend.per_chunk(1, c)
  return backend.call(
      functools.partial(_kernel, t_mm=plan.t_product(k.dtype), block_k=plan.key_block(dk),
                        block_v=plan.value_block(dv)),
      plan, grid=(bh, n),
      in_specs=[backend.per_chunk(c, c), layout.block(dk), layout.block(dv), row, row],
      out_specs=[backend.per_chunk(c, dk), backend.per_chunk(c, dv)],
      out_shape=[jax.ShapeDtypeStruct((bh, n, c, dk), state_dtype),
                 jax.ShapeDtypeStruct((bh, n, c, dv), state_dtype)],
      name="gdn_wy_transform",
  )(t, k, v, beta_row, bqd_row)
