"""The 'pallas' implementation: lte_jax.kernels.short_conv, one call per shard.

XLA does not partition Pallas calls, so under an active mesh the kernel runs inside
shard_map, split over batch and channels as the rules place the batch and
activation-head axes (channels are heads x head dim, and a depthwise conv never mixes
them); time stays whole.
"""
from __future__ import annotations

import functools

import jax
from jax.sharding import PartitionSpec as P

from lte_jax import sharding as sh
from lte_jax.kernels.short_conv import short_conv_pallas as _kernel_op


def short_conv_pallas(x, weight, segment_ids=None, *, plan_options=None):
  """Arguments as lte_jax.ops.short_conv (validated there)."""
  op = functools.partial(_kernel_op, **(plan_options or {}))
  shards = sh.kernel_shards(x.shape[0], x.shape[2])
  if shards is None:
    return op(x, weight, segment_ids)
  mesh, b, h = shards
  in_specs = (P(b, None, h), P(None, h), None if segment_ids is None else P(b, None))
  return jax.shard_map(op, mesh=mesh, in_specs=in_specs, out_specs=P(b, None, h),
                       check_vma=False)(x, weight, segment_ids)
