"""The 'pallas' implementation: lte_jax.kernels.gated_delta_rule, one call per shard.

XLA does not partition Pallas calls, so under an active mesh the kernels run
inside shard_map, split over batch and heads as the sharding rules place those
activation axes (an axis that does not divide its dimension stays whole); time
and head dims are never split, the recurrence needs them whole.
"""
from __future__ import annotations

import functools
import math

import jax
from jax.sharding import PartitionSpec as P

from lte_jax import sharding as sh
from lte_jax.kernels.gated_delta_rule import chunk_gated_delta_rule_pallas as _kernel_op


def _mesh_axes(name: str, dim: int, mesh, used: tuple[str, ...] = ()) -> tuple[str, ...]:
  """Mesh axes the rules give logical axis `name`, if present and they divide `dim`."""
  axis = sh.logical_to_spec((name,))[0]
  axes = () if axis is None else (axis if isinstance(axis, tuple) else (axis,))
  axes = tuple(a for a in axes if a in mesh.axis_names and mesh.shape[a] > 1 and a not in used)
  return axes if axes and dim % math.prod(mesh.shape[a] for a in axes) == 0 else ()


def chunk_gated_delta_rule_pallas(q, k, v, g, beta, *, scale, initial_state,
                                  output_final_state, segment_ids, chunk_size):
  """Arguments as lte_jax.ops.chunk_gated_delta_rule (validated there)."""
  if chunk_size < 16 or chunk_size & (chunk_size - 1):
    raise ValueError("chunk_size must be a power of two >= 16 for implementation 'pallas', "
                     f"got {chunk_size}")
  op = functools.partial(_kernel_op, scale=scale, output_final_state=output_final_state,
                         chunk_size=chunk_size)
  mesh = jax.sharding.get_abstract_mesh()
  if mesh is None or mesh.empty:
    return op(q, k, v, g, beta, initial_state=initial_state, segment_ids=segment_ids)

  batch, _, heads, _ = q.shape
  b_axes = _mesh_axes(sh.BATCH, batch, mesh)
  h_axes = _mesh_axes(sh.ACT_HEADS, heads, mesh, used=b_axes)
  b, h = b_axes or None, h_axes or None
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
