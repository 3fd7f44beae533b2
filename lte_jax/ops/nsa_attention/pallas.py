"""The 'pallas' implementation of Native Sparse Attention.

The compression branch and the top-k selection stay in plain JAX (xla.py: T / block_size
mean-pooled blocks, small; the selection carries no gradient). The selected-block branch
runs on lte_jax.kernels.nsa_attention, which reads only each query's selected blocks
(O(T * block_count * block_size) work where the 'xla' path masks a dense T x T), and the
sliding-window branch on the band kernels of lte_jax.kernels.lte_attention. Under a mesh
both kernels run per shard over batch and KV heads (ops/attention/pallas.py); the
selection is computed inside the shard, as it only mixes the query heads of one KV group.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from lte_jax.kernels.lte_attention import sliding_window_attention_pallas
from lte_jax.kernels.nsa_attention import selected_attention
from lte_jax.ops.attention.pallas import per_shard
from lte_jax.ops.attention.xla import blockwise_attention
from lte_jax.ops.nsa_attention import xla


def nsa_attention_pallas(q, k, v, gates, *, block_size, block_count, window_size, segment_ids,
                         scale, platform: str | None = None, interpret: bool | None = None,
                         plan_options: dict | None = None,
                         window_plan_options: dict | None = None):
  """Arguments as lte_jax.ops.nsa_attention (validated there); block_size a power of two
  >= 16. platform ('gpu', 'tpu') and interpret as lte_jax.kernels.nsa_attention.make_plan;
  plan_options: that Plan's fields; window_plan_options: the sliding-window kernels'
  (lte_jax.kernels.lte_attention.Plan)."""
  k_cmp, v_cmp, layout, _, doc = xla.pooled_blocks(k, v, segment_ids, block_size)
  o_cmp = blockwise_attention(q, k_cmp, v_cmp, xla.compressed_mask_fn(layout, doc), scale=scale)

  def selected_op(q, k, v, segment_ids):
    # Selection per shard (it mixes only one KV group's query heads). The pooled keys are
    # pooled again from the shard's k: per_shard passes [B, T, H, *] tensors and segment
    # ids only, and pooling is one read of k, small beside the attention.
    k_cmp, _, layout, positions, doc = xla.pooled_blocks(k, None, segment_ids, block_size)
    selected = xla.select_blocks(q, k_cmp, layout, positions, doc, block_size=block_size,
                                 block_count=block_count, scale=scale)
    return selected_attention(q, k, v, selected, block_size=block_size,
                              block_count=block_count, segment_ids=segment_ids, scale=scale,
                              platform=platform, interpret=interpret, plan_options=plan_options)

  g = gates.astype(jnp.float32)
  o_slc = per_shard(selected_op, q, k, v, segment_ids=segment_ids)
  o = g[..., 0:1] * o_cmp + g[..., 1:2] * o_slc.astype(jnp.float32)
  if window_size is not None:
    def window_op(q, k, v, segment_ids):
      return sliding_window_attention_pallas(q, k, v, window_size=window_size,
                                             segment_ids=segment_ids, scale=scale,
                                             platform=platform, interpret=interpret,
                                             plan_options=window_plan_options)
    o_swa = per_shard(window_op, q, k, v, segment_ids=segment_ids)
    o = o + g[..., 2:3] * o_swa.astype(jnp.float32)
  return o.astype(v.dtype)
