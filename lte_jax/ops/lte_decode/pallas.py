"""The 'pallas' implementation: lte_jax.kernels.lte_decode, one call per shard.

XLA does not partition Pallas calls, so under an active mesh the kernel runs
inside shard_map, split over batch and KV heads as the sharding rules place the
batch and activation-head axes (an axis that does not divide its dimension
stays whole). Query heads split with their KV heads: query head h reads KV
head h // G, so contiguous blocks of both line up.
"""
from __future__ import annotations

import functools

import jax
from jax.sharding import PartitionSpec as P

from lte_jax import sharding as sh
from lte_jax.kernels.lte_decode import lte_decode_attention_pallas as _kernel_op


def lte_decode_attention_pallas(q, k, v, fill, num_tokens, *, ring_size, scale,
                                plan_options=None):
  """Arguments as lte_jax.ops.lte_decode_attention (validated there)."""
  op = functools.partial(_kernel_op, ring_size=ring_size, scale=scale, **(plan_options or {}))
  shards = sh.kernel_shards(q.shape[0], k.shape[2])
  if shards is None:
    return op(q, k, v, fill, num_tokens)
  mesh, b, h = shards
  tensor = P(b, None, h, None)
  return jax.shard_map(op, mesh=mesh, in_specs=(tensor, tensor, tensor, P(b, h), P()),
                       out_specs=tensor, check_vma=False)(q, k, v, fill, num_tokens)
