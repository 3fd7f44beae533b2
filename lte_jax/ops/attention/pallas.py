"""The 'pallas' implementation of causal attention, and the shard_map wrapper of the
attention kernels (lte_jax.kernels.lte_attention).

Sliding-window attention is LTE attention without sinks or retained tokens, so it
runs on the band kernels alone (full causal attention: the band is the whole
causal range). XLA does not partition Pallas calls, so under an active mesh the
kernels run inside shard_map, split over batch and KV heads as the sharding rules
place those activation axes (an axis that does not divide its dimension stays
whole; query heads split with their KV heads, as Hq = group x Hkv keeps each
group inside one shard). Time and head dims are never split.
"""
from __future__ import annotations

import functools

import jax
from jax.sharding import PartitionSpec as P

from lte_jax import sharding as sh
from lte_jax.kernels.lte_attention import sliding_window_attention_pallas


def per_shard(op, q, k, v, *per_kv_head, segment_ids):
  """op(q, k, v, *per_kv_head, segment_ids=...) under shard_map when a mesh is active.

  q [B, T, Hq, D], k/v [B, T, Hkv, *], per_kv_head arrays [B, T, Hkv], segment_ids
  [B, T] or None -> o [B, T, Hq, Dv].
  """
  shards = sh.kernel_shards(q.shape[0], k.shape[2])
  if shards is None:
    return op(q, k, v, *per_kv_head, segment_ids=segment_ids)
  mesh, b, h = shards
  tensor, scalar = P(b, None, h, None), P(b, None, h)

  def local(q, k, v, segment_ids, *rest):
    return op(q, k, v, *rest, segment_ids=segment_ids)

  in_specs = (tensor, tensor, tensor, None if segment_ids is None else P(b, None),
              *(scalar for _ in per_kv_head))
  return jax.shard_map(local, mesh=mesh, in_specs=in_specs, out_specs=tensor,
                       check_vma=False)(q, k, v, segment_ids, *per_kv_head)


def attention_pallas(q, k, v, *, window_size, segment_ids, scale, plan_options=None):
  """Arguments as lte_jax.ops.attention (validated there); plan_options: Plan fields."""
  op = functools.partial(sliding_window_attention_pallas, window_size=window_size, scale=scale,
                         plan_options=plan_options)
  return per_shard(op, q, k, v, segment_ids=segment_ids)
