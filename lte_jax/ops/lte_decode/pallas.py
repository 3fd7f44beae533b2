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
from lte_jax.ops.gated_delta_rule.pallas import _mesh_axes


def lte_decode_attention_pallas(q, k, v, fill, num_tokens, *, ring_size, scale,
                                plan_options=None):
  """Arguments as lte_jax.ops.lte_decode_attention (validated there)."""
  op = functools.partial(_kernel_op, ring_size=ring_size, scale=scale, **(plan_options or {}))
  mesh = jax.sharding.get_abstract_mesh()
  if mesh is None or mesh.empty:
    return op(q, k, v, fill, num_tokens)

  b_axes = _mesh_axes(sh.BATCH, q.shape[0], mesh)
  h_axes = _mesh_axes(sh.ACT_HEADS, k.shape[2], mesh, used=b_axes)
  b, h = b_axes or None, h_axes or None
  tensor = P(b, None, h, None)
  return jax.shard_map(op, mesh=mesh, in_specs=(tensor, tensor, tensor, P(b, h), P()),
                       out_specs=tensor, check_vma=False)(q, k, v, fill, num_tokens)
