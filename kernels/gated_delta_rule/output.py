"""Kernel 3: outputs, and the state-free part of dV_new's gradient; parallel over chunks.

  O = scale [ (qd Q) h + (Q K^T * causal decay) V_new ]      (PAPER.md section 2, step 6)
  dV_local = scale (Q K^T * causal decay)^T dO
"""
from __future__ import annotations

import functools

import jax

from lte_jax.kernels.gated_delta_rule import backend, chunk_math as cm


def _attention(q, k, g_col, g_row, seg_col, seg_row, dtype):
  """Intra-chunk scores [C, C]: (Q K^T) masked by the causal same-document decay."""
  causal, _ = cm.decay_masks(g_col, g_row, seg_col, seg_row)
  return cm.mm(q, k, tb=True, dtype=dtype) * causal


def _output_kernel(q_ref, k_ref, g_ref, g_row_ref, seg_ref, seg_row_ref, qd_ref, h_ref,
                   v_new_ref, o_ref, *, scale):
  q = q_ref[...]
  dtype = q.dtype
  p = _attention(q, k_ref[...], g_ref[...], g_row_ref[...], seg_ref[...], seg_row_ref[...],
                 dtype)
  o = cm.mm(qd_ref[...] * q.astype(cm.F32), h_ref[...], dtype=dtype)
  o = o + cm.mm(p, v_new_ref[...], dtype=dtype)
  o_ref[...] = (scale * o).astype(o_ref.dtype)


def _dv_local_kernel(q_ref, k_ref, g_ref, g_row_ref, seg_ref, seg_row_ref, do_ref, dv_ref,
                     *, scale):
  q = q_ref[...]
  p = _attention(q, k_ref[...], g_ref[...], g_row_ref[...], seg_ref[...], seg_row_ref[...],
                 q.dtype)
  dv_ref[...] = scale * cm.mm(p, do_ref[...], ta=True, dtype=q.dtype)


def _common_specs(layout, dk):
  c = layout.chunk
  col, row = backend.per_chunk(c, 1), backend.per_chunk(1, c)
  return [layout.block(dk), layout.block(dk), col, row, col, row]


# Both kernels run on a (BH, N, Dv blocks) grid: value columns are independent,
# and the scores are cheap to recompute per block next to a [Dk, Dv] state tile.

def chunk_outputs(plan: backend.Plan, layout: backend.Layout, q, k, g_col, g_row, seg_col,
                  seg_row, qd_col, h, v_new, *, scale: float, out_dtype):
  """q, k token tensors (layout) of width Dk; h [BH, N, Dk, Dv]; v_new [BH, N, C, Dv]
  -> o, a token tensor of width Dv."""
  bh, n, c, dk = layout.bh, layout.chunks, layout.chunk, q.shape[-1]
  dv = v_new.shape[-1]
  bv = plan.value_block(dv)
  by_value = backend.per_chunk_value_block
  return backend.call(
      functools.partial(_output_kernel, scale=scale), plan, grid=(bh, n, dv // bv),
      in_specs=_common_specs(layout, dk) + [backend.per_chunk(c, 1), by_value(dk, bv),
                                            by_value(c, bv)],
      out_specs=[layout.value_block(bv)],
      out_shape=[jax.ShapeDtypeStruct(layout.shape(dv), out_dtype)],
      name="gdn_chunk_outputs",
  )(q, k, g_col, g_row, seg_col, seg_row, qd_col, h, v_new)[0]


def local_value_grads(plan: backend.Plan, layout: backend.Layout, q, k, g_col, g_row, seg_col,
                      seg_row, d_o, *, scale: float):
  """dO, a token tensor (layout) of width Dv -> dV_local [BH, N, C, Dv] fp32."""
  bh, n, c, dk = layout.bh, layout.chunks, layout.chunk, q.shape[-1]
  dv = d_o.shape[-1]
  bv = plan.value_block(dv)
  return backend.call(
      functools.partial(_dv_local_kernel, scale=scale), plan, grid=(bh, n, dv // bv),
      in_specs=_common_specs(layout, dk) + [layout.value_block(bv)],
      out_specs=[backend.per_chunk_value_block(c, bv)],
      out_shape=[jax.ShapeDtypeStruct((bh, n, c, dv), cm.F32)],
      name="gdn_local_value_grads",
  )(q, k, g_col, g_row, seg_col, seg_row, d_o)[0]
