"""Device mesh, multi-host start-up, and the shardings of the train state and batch.

The mesh has the axes of ``lte_jax.sharding.MESH_AXES`` (data, fsdp, tensor).
Parameter shardings come from the logical axis names the model attaches to
every parameter, mapped to mesh axes by the one rules table
(``lte_jax.sharding.RULES``). The batch is split over (data, fsdp).
"""
from __future__ import annotations

import math
import os
from typing import Any, Sequence

import jax
import numpy as np
import optax
from absl import logging
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from lte_jax import sharding as sh
from lte_jax.training.train_state import ModelDef, TrainState

DISTRIBUTED_MODES = ("auto", "on", "off")


def maybe_initialize_distributed(mode: str = "auto") -> bool:
  """jax.distributed.initialize() when ``mode`` is 'on', or 'auto' under a launcher.

  'auto' initialises when a coordinator address is set or SLURM / Open MPI
  started more than one task (jax.distributed reads the cluster from them).

  Must run before anything touches the devices. Returns whether it initialised.
  """
  if mode not in DISTRIBUTED_MODES:
    raise ValueError(f"distributed must be one of {DISTRIBUTED_MODES}, got {mode!r}")
  launched = (bool(os.environ.get("JAX_COORDINATOR_ADDRESS"))
              or int(os.environ.get("SLURM_NTASKS", "1")) > 1
              or int(os.environ.get("OMPI_COMM_WORLD_SIZE", "1")) > 1)
  if mode == "on" or (mode == "auto" and launched):
    jax.distributed.initialize()
    logging.info("jax.distributed initialised: process %d of %d", jax.process_index(),
                 jax.process_count())
    return True
  return False


def mesh_shape(data: int, fsdp: int, tensor: int, num_devices: int) -> tuple[int, int, int]:
  """Resolve one -1 entry to the devices left over; check the product."""
  sizes = [data, fsdp, tensor]
  for name, size in zip(sh.MESH_AXES, sizes):
    if not isinstance(size, int) or (size < 1 and size != -1):
      raise ValueError(f"mesh.{name} must be a positive integer or -1, got {size!r}")
  if sizes.count(-1) > 1:
    raise ValueError(f"at most one mesh axis may be -1, got {dict(zip(sh.MESH_AXES, sizes))}")
  if -1 in sizes:
    known = math.prod(s for s in sizes if s != -1)
    if num_devices % known:
      raise ValueError(f"{num_devices} devices do not split into mesh "
                       f"{dict(zip(sh.MESH_AXES, sizes))}")
    sizes[sizes.index(-1)] = num_devices // known
  if math.prod(sizes) != num_devices:
    raise ValueError(f"mesh {dict(zip(sh.MESH_AXES, sizes))} needs {math.prod(sizes)} devices, "
                     f"{num_devices} are available")
  return tuple(sizes)


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1,
              devices: Sequence[jax.Device] | None = None) -> jax.sharding.Mesh:
  """A (data, fsdp, tensor) mesh over ``devices`` (default: all devices of all hosts)."""
  devices = jax.devices() if devices is None else list(devices)
  shape = mesh_shape(data, fsdp, tensor, len(devices))
  return jax.make_mesh(shape, sh.MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 3,
                       devices=devices)


def spec_for(names: Sequence[str | None], shape: Sequence[int],
             mesh: jax.sharding.Mesh) -> P:
  """PartitionSpec of an array with logical axis ``names`` on ``mesh``.

  A dimension stays replicated where its mesh axes are absent, of size 1,
  already used by an earlier dimension, or do not divide it (tiny presets have
  dimensions smaller than a large mesh).
  """
  names = tuple(names) + (None,) * (len(shape) - len(names))
  used: set[str] = set()
  out = []
  for dim, axis in zip(shape, sh.logical_to_spec(names)):
    axes = () if axis is None else (axis if isinstance(axis, tuple) else (axis,))
    axes = tuple(a for a in axes if a in mesh.shape and mesh.shape[a] > 1 and a not in used)
    size = math.prod(mesh.shape[a] for a in axes)
    if not axes or dim % size:
      out.append(None)
      continue
    used.update(axes)
    out.append(axes[0] if len(axes) == 1 else axes)
  return P(*out)


def param_shardings(model_def: ModelDef, mesh: jax.sharding.Mesh) -> Any:
  """Pure dict like the params: a NamedSharding per parameter."""
  return jax.tree.map(
      lambda names, x: NamedSharding(mesh, spec_for(names, x.shape, mesh)),
      model_def.logical_names, model_def.abstract_params,
      is_leaf=lambda x: isinstance(x, tuple))


def state_shardings(model_def: ModelDef, tx: optax.GradientTransformation,
                    abstract_state: TrainState, mesh: jax.sharding.Mesh) -> TrainState:
  """Shardings of every train-state leaf: optimizer moments follow their parameter."""
  params = param_shardings(model_def, mesh)
  replicated = NamedSharding(mesh, P())
  opt_state = optax.tree_map_params(
      tx, lambda _, s: s, abstract_state.opt_state, params,
      transform_non_params=lambda _: replicated)
  return TrainState(
      step=replicated, params=params, opt_state=opt_state,
      controller=jax.tree.map(lambda _: replicated, abstract_state.controller),
      rng=replicated, skipped=replicated)


def with_shardings(abstract: Any, shardings: Any) -> Any:
  """ShapeDtypeStructs that carry their target sharding (what orbax restores into)."""
  return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                      abstract, shardings)


def batch_sharding(mesh: jax.sharding.Mesh) -> NamedSharding:
  """[B, T] arrays: rows over (data, fsdp), time replicated."""
  return NamedSharding(mesh, sh.logical_to_spec((sh.BATCH, sh.LENGTH)))


def global_batch(local_batch: dict, sharding: NamedSharding) -> dict:
  """This process's rows of the batch -> global jax.Arrays laid out by ``sharding``."""
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
          for k, v in local_batch.items()}


def describe(mesh: jax.sharding.Mesh) -> str:
  return " x ".join(f"{name}={size}" for name, size in mesh.shape.items())
