"""Logical axis names and the one table that maps them to mesh axes.

Every parameter is created with ``nnx.with_partitioning(init, names)`` using the
names below; activations are constrained with :func:`constrain`. A mesh has the
axes ``data``, ``fsdp`` and ``tensor`` (any of them may have size 1).
"""
from __future__ import annotations

import math
from typing import Sequence

import jax
from jax.sharding import PartitionSpec as P

# Parameter axes.
VOCAB = "vocab"          # embedding rows / lm_head columns
EMBED = "embed"          # d_model
MLP = "mlp"              # SwiGLU intermediate
HEADS = "heads"          # flattened query-head features (num_heads * head_dim) or a head axis
KV_HEADS = "kv_heads"    # flattened key/value-head features or a KV head axis
HEAD_DIM = "head_dim"    # per-head features (norm weights)
CONV = "conv"            # short-conv / scorer taps
SCORER = "scorer"        # LTE scorer channels
# Activation axes.
BATCH = "activation_batch"
LENGTH = "activation_length"
ACT_EMBED = "activation_embed"
ACT_HEADS = "activation_heads"

MESH_AXES = ("data", "fsdp", "tensor")

# The rules table: logical name -> mesh axis (or axes, or None = replicated).
RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    (VOCAB, "tensor"),
    (EMBED, "fsdp"),
    (MLP, "tensor"),
    (HEADS, "tensor"),
    (KV_HEADS, "tensor"),
    (HEAD_DIM, None),
    (CONV, None),
    (SCORER, None),
    (BATCH, ("data", "fsdp")),
    (LENGTH, None),
    (ACT_EMBED, None),
    (ACT_HEADS, "tensor"),
)


def logical_to_spec(names: Sequence[str | None], rules=RULES) -> P:
  """PartitionSpec for a tuple of logical axis names under ``rules``."""
  table = dict(rules)
  out = []
  for name in names:
    if name is not None and name not in table:
      raise ValueError(f"logical axis {name!r} is not in the rules table; known: "
                       f"{sorted(table)}")
    out.append(None if name is None else table[name])
  return P(*out)


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
  """Constrain an activation's sharding when a mesh is active, else a no-op."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh is None or mesh.empty:
    return x
  spec = logical_to_spec(names)
  spec = P(*[a if _axes_in_mesh(a, mesh) else None for a in spec])
  return jax.lax.with_sharding_constraint(x, spec)


def _axes_in_mesh(axis, mesh) -> bool:
  if axis is None:
    return True
  axes = axis if isinstance(axis, tuple) else (axis,)
  return all(a in mesh.axis_names for a in axes)


def _dividing_axes(name: str, dim: int, mesh, used: tuple[str, ...] = ()) -> tuple[str, ...]:
  """Mesh axes the rules give logical axis `name`, if present, > 1, unused and dividing `dim`."""
  axis = logical_to_spec((name,))[0]
  axes = () if axis is None else (axis if isinstance(axis, tuple) else (axis,))
  axes = tuple(a for a in axes if a in mesh.axis_names and mesh.shape[a] > 1 and a not in used)
  return axes if axes and dim % math.prod(mesh.shape[a] for a in axes) == 0 else ()


def kernel_shards(batch: int, heads: int):
  """How a Pallas kernel runs per shard under the active mesh: (mesh, batch axes, head
  axes), each a tuple of mesh axes or None; None when no mesh is active.

  XLA does not partition Pallas calls, so the ops wrap their kernels in shard_map,
  split over batch and (KV) heads as the rules place the activation axes. An axis
  that does not divide its dimension stays whole; heads never reuse batch's axes.
  """
  mesh = jax.sharding.get_abstract_mesh()
  if mesh is None or mesh.empty:
    return None
  b = _dividing_axes(BATCH, batch, mesh)
  h = _dividing_axes(ACT_HEADS, heads, mesh, used=b)
  return mesh, b or None, h or None
