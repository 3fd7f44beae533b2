"""The 'pallas' implementation: lte_jax.kernels.gated_delta_rule, one call per shard.

XLA does not partition Pallas calls, so under an active mesh the kernels run
inside shard_map, split over batch and heads as the sharding rules place those
activation axes (an axis that does not divide its dimension stays whole); time
and head dims are never split, the recurrence needs them whole.
"""
from __future__ import annotations

import functools

import jax
from jax.sharding import PartitionSpec as P

from lte_jax import sharding as sh
from lte_jax.kernels.gated_delta_rule import chunk_gated_delta_rule_pallas as _kernel_op
from lte_jax.kernels.gated_delta_rule.backend import check_plan_options


def chunk_gated_delta_rule_pallas(q, k, v, g, beta, *, scale, initial_state,
                                  output_final_state, segment_ids, chunk_size,
                                  plan_options=None):
  """Arguments as lte_jax.ops.chunk_gated_delta_rule (validated there); plan_options:
  Plan fields."""
  if chunk_size < 16 or chunk_size & (chunk_size - 1):
    raise ValueError("chunk_size must be a power of two >= 16 for implementation 'pallas', "
                     f"got {chunk_size}")
  check_plan_options(plan_options or {})
  op = functools.partial(_kernel_op, scale=scale, output_final_state=output_final_state,
                         chunk_size=chunk_size, **(plan_options or {}))
  shards = sh.kernel_shards(q.shape[0], q.shape[2])
  if shards is None:
    return op(q, k, v, g, beta, initial_state=initial_state, segment_ids=segment_ids)
  mesh, b, h = shards
  tensor, scalar, state = P(b, None, h, None), P(b, None, h), P(b, h, None, None)

  def local(q, k, v, g, beta, initial_state, segment_ids):
    o, h_last = op(q, k, v, g, beta, initial_state=initial_state, segment_ids=segment_ids)
    return (o, h_last) if output_final_state else o

  in_specs = (tensor, tensor, tensor, scalar, scalar,
              None if initial_state is None else state,
              None if segment_ids is None else P(b, None))
  out_specs = (tensor, state) if output_final_state else tensor
  out = jax.shard_map(local, mesh=mesh, in_specs=in_specs, out_specs=out_specs,
                      check_vma=False)(q, k, v, g, beta, initial_state, segment_ids)
  return out if output_final_state else (out, None)
