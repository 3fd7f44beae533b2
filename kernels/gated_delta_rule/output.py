"""Kernel 3: outputs, and the state-free part of dV_new's gradient; parallel over chunks.

  O = scale [ qd (Q h) + (Q K^T * causal decay) V_new ]      (PAPER.md section 2, step 6)
  dV_local = scale (Q K^T * causal decay)^T dO
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from lte_jax.kernels.gated_delta_rule import backend, chunk_math as cm


def _attention(q, k, g_col, g_row, seg_col, seg_row, dtype):
  """Intra-chunk scores [C, C]: (Q K^T) masked by the causal same-document decay."""
  causal, _ = cm.decay_masks(g_col, g_row, seg_col, seg_row)
  return cm.mm(q, k, tb=True, dtype=dtype) * causal


def _output_kernel(q_ref, k_ref, g_ref, g_row_ref, seg_ref, seg_row_ref, qd_ref, h_ref,
                   v_new_ref, o_ref, *, scale, block_v):
  q = q_ref[...]
  dtype = q.dtype
  p = _attention(q, k_ref[...], g_ref[...], g_row_ref[...], seg_ref[...], seg_row_ref[...],
                 dtype)
  # (qd Q) h = qd (Q h): the per-row factor goes on the [C, block_v] product, so Q enters
  # the dot as loaded (no [C, Dk] fp32 copy held across the value loop, and no rounding
  # of qd Q to the input dtype).
  qd = qd_ref[...]
  # The scores once per chunk, then value blocks in turn: only a [Dk, block_v] state tile
  # and a [C, block_v] accumulator live at a time.
  for start in range(0, v_new_ref.shape[-1], block_v):
    cols = pl.ds(start, block_v)
    o = qd * cm.mm(q, h_ref[:, cols], dtype=dtype) + cm.mm(p, v_new_ref[:, cols], dtype=dtype)
    o_ref[:, cols] = (scale * o).astype(o_ref.dtype)


def _scores_by_key_blocks(q_ref, k_ref, g_ref, g_row_ref, seg_ref, seg_row_ref, block_k,
                          h_ref=None):
  """Plan.output_value_grid: the masked scores [C, C] (and with h_ref, Q h [C, block_v])
  summed over key blocks in a loop, which Triton pipelines: only [C, block_k] slices of Q
  and K (and a [block_k, block_v] slice of h) are loaded at a time."""
  dtype = q_ref.dtype
  chunk = q_ref.shape[0]

  def key_block(j, carry):
    s, qh = carry
    cols = cm.column_block(j, block_k)
    q = q_ref[:, cols]
    s = s + cm.mm(q, k_ref[:, cols], tb=True, dtype=dtype)
    return s, (None if h_ref is None else qh + cm.mm(q, h_ref[cols, :], dtype=dtype))

  start = (jnp.zeros((chunk, chunk), cm.F32),
           None if h_ref is None else jnp.zeros((chunk, h_ref.shape[-1]), cm.F32))
  s, qh = jax.lax.fori_loop(0, q_ref.shape[-1] // block_k, key_block, start)
  causal, _ = cm.decay_masks(g_ref[...], g_row_ref[...], seg_ref[...], seg_row_ref[...])
  return s * causal, qh


def _output_grid_kernel(q_ref, k_ref, g_ref, g_row_ref, seg_ref, seg_row_ref, qd_ref, h_ref,
                        v_new_ref, o_ref, *, scale, block_k):
  """Plan.output_value_grid: one value block of one chunk; each value block's program
  recomputes the scores."""
  p, qh = _scores_by_key_blocks(q_ref, k_ref, g_ref, g_row_ref, seg_ref, seg_row_ref,
                                block_k, h_ref)
  o = qd_ref[...] * qh + cm.mm(p, v_new_ref[...], dtype=q_ref.dtype)
  o_ref[...] = (scale * o).astype(o_ref.dtype)


def _dv_local_grid_kernel(q_ref, k_ref, g_ref, g_row_ref, seg_ref, seg_row_ref, do_ref,
                          dv_ref, *, scale, block_k):
  p, _ = _scores_by_key_blocks(q_ref, k_ref, g_ref, g_row_ref, seg_ref, seg_row_ref, block_k)
  dv_ref[...] = scale * cm.mm(p, do_ref[...], ta=True, dtype=q_ref.dtype)


def _dv_local_kernel(q_ref, k_ref, g_ref, g_row_ref, seg_ref, seg_row_ref, do_ref, dv_ref,
                     *, scale, block_v):
  q = q_ref[...]
  p = _attention(q, k_ref[...], g_ref[...], g_row_ref[...], seg_ref[...], seg_row_ref[...],
                 q.dtype)
  for start in range(0, do_ref.shape[-1], block_v):
    cols = pl.ds(start, block_v)
    dv_ref[:, cols] = scale * cm.mm(p, do_ref[:, cols], ta=True, dtype=q.dtype)


def _value_grid(plan, layout, dv):
  """Plan.output_value_grid applies: the GPU form (native token layout) with more than one
  value block."""
  return plan.output_value_grid and layout.native and dv > plan.value_block(dv)


def _value_block(rows, bv):
  """Value block j of a chunk's [rows, Dv] slice of a [BH, N, rows, Dv] array, on a
  (B*H, N, value blocks) grid."""
  return pl.BlockSpec((pl.squeezed, pl.squeezed, rows, bv), lambda b, i, j: (b, i, 0, j))


def _common_specs(layout, dk):
  c = layout.chunk
  col, row = backend.per_chunk(c, 1), backend.per_chunk(1, c)
  return [layout.block(dk), layout.block(dk), col, row, col, row]


# Both kernels run one program per chunk by default (B*H*N of them, plenty): the [C, C]
# scores and their decays are computed once, not once per value block as a grid over value
# blocks would (Plan.output_value_grid: that grid, as FLA's chunk_fwd_o and
# chunk_bwd_dv_local).

def chunk_outputs(plan: backend.Plan, layout: backend.Layout, q, k, g_col, g_row, seg_col,
                  seg_row, qd_col, h, v_new, *, scale: float, out_dtype):
  """q, k token tensors (layout) of width Dk; h [BH, N, Dk, Dv]; v_new [BH, N, C, Dv]
  -> o, a token tensor of width Dv."""
  bh, n, c, dk = layout.bh, layout.chunks, layout.chunk, q.shape[-1]
  dv = v_new.shape[-1]
  bv = plan.value_block(dv)
  args = (q, k, g_col, g_row, seg_col, seg_row, qd_col, h, v_new)
  if _value_grid(plan, layout, dv):
    return backend.call(
        functools.partial(_output_grid_kernel, scale=scale, block_k=plan.key_block(dk)),
        plan, grid=(bh, n, dv // bv),
        in_specs=_common_specs(layout, dk) + [backend.per_chunk(c, 1),
                                              _value_block(dk, bv), _value_block(c, bv)],
        out_specs=[layout.column_block(bv)],
        out_shape=[jax.ShapeDtypeStruct(layout.shape(dv), out_dtype)],
        name="gdn_chunk_outputs",
    )(*args)[0]
  return backend.call(
      functools.partial(_output_kernel, scale=scale, block_v=bv), plan,
      grid=(bh, n),
      in_specs=_common_specs(layout, dk) + [backend.per_chunk(c, 1), backend.per_chunk(dk, dv),
                                            backend.per_chunk(c, dv)],
      out_specs=[layout.block(dv)],
      out_shape=[jax.ShapeDtypeStruct(layout.shape(dv), out_dtype)],
      name="gdn_chunk_outputs",
  )(*args)[0]


def local_value_grads(plan: backend.Plan, layout: backend.Layout, q, k, g_col, g_row, seg_col,
                      seg_row, d_o, *, scale: float):
  """dO, a token tensor (layout) of width Dv -> dV_local [BH, N, C, Dv] fp32."""
  bh, n, c, dk = layout.bh, layout.chunks, layout.chunk, q.shape[-1]
  dv = d_o.shape[-1]
  bv = plan.value_block(dv)
  if _value_grid(plan, layout, dv):
    return backend.call(
        functools.partial(_dv_local_grid_kernel, scale=scale, block_k=plan.key_block(dk)),
        plan, grid=(bh, n, dv // bv),
        in_specs=_common_specs(layout, dk) + [layout.column_block(bv)],
        out_specs=[_value_block(c, bv)],
        out_shape=[jax.ShapeDtypeStruct((bh, n, c, dv), cm.F32)],
        name="gdn_local_value_grads",
    )(q, k, g_col, g_row, seg_col, seg_row, d_o)[0]
  return backend.call(
      functools.partial(_dv_local_kernel, scale=scale, block_v=bv), plan,
      grid=(bh, n),
      in_specs=_common_specs(layout, dk) + [layout.block(dv)],
      out_specs=[backend.per_chunk(c, dv)],
      out_shape=[jax.ShapeDtypeStruct((bh, n, c, dv), cm.F32)],
      name="gdn_local_value_grads",
  )(q, k, g_col, g_row, seg_col, seg_row, d_o)[0]
