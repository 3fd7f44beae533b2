"""The train state: a plain pytree of arrays that orbax saves as is.

The model is split once into a static part (``ModelDef``: graph definition and
logical axis names) and its parameters; only the parameters travel through the
train step and the checkpoints. The model's non-parameter state is its dropout
RNG streams, which the step reseeds from ``TrainState.rng`` on every call, so
they are never saved and a resumed run draws the same dropout masks.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from lte_jax import configs as configs_lib
from lte_jax import lte_controller
from lte_jax.models import Block, HybridLM


@flax.struct.dataclass
class TrainState:
  step: jax.Array        # int32 [], train steps taken (skipped ones included)
  params: Any            # nested dict of fp32 arrays (nnx.to_pure_dict of the Params)
  opt_state: Any         # optax state of ``params``
  controller: Any        # lte_controller.ControllerState (lambda [L, H], kept EMA, step);
                         # None for models without LTE layers
  rng: jax.Array         # uint32 [2] key data; split once per step for dropout
  skipped: jax.Array     # int32 [], steps skipped for non-finite gradients


@dataclasses.dataclass(frozen=True)
class ModelDef:
  """Everything about the model that is not an array."""
  config: configs_lib.ModelConfig
  graphdef: Any
  rest: Any                 # pure dict of placeholder RNG-stream state, reseeded before use
  logical_names: Any        # pure dict like params: tuple of logical axis names per array
  abstract_params: Any      # pure dict of ShapeDtypeStruct

  @property
  def lte_layers(self) -> tuple[int, ...]:
    return tuple(i for i, m in enumerate(self.config.layers) if m == "lte")

  def bind(self, params: Any, dropout_key: jax.Array) -> HybridLM:
    """A model with ``params`` whose dropout draws from ``dropout_key``."""
    model = nnx.merge(self.graphdef, params, self.rest)
    nnx.reseed(model, dropout=dropout_key)
    return model


def _placeholder(x: jax.ShapeDtypeStruct) -> jax.Array:
  if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
    return jax.random.wrap_key_data(jnp.zeros(x.shape + (2,), jnp.uint32))
  return jnp.zeros(x.shape, x.dtype)


def make_model_def(config: configs_lib.ModelConfig, train: bool = True) -> ModelDef:
  """Trace the model abstractly (no allocation) and keep its static parts."""
  def build():
    with nnx.use_eager_sharding(False):
      model = HybridLM(config, rngs=nnx.Rngs(params=0, dropout=1))
    model.train() if train else model.eval()
    return model
  abstract = nnx.eval_shape(build)
  graphdef, params, rest = nnx.split(abstract, nnx.Param, ...)
  for path, var in nnx.to_flat_state(rest):
    if not isinstance(var, (nnx.RngKey, nnx.RngCount)):
      raise ValueError(f"the model holds non-parameter state at {'/'.join(map(str, path))} "
                       f"({type(var).__name__}); the train state only carries parameters and "
                       "RNG streams")
  names = nnx.to_pure_dict(nnx.get_partition_spec(params))
  names = jax.tree.map(tuple, names, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
  return ModelDef(config=config, graphdef=graphdef,
                  rest=jax.tree.map(_placeholder, nnx.to_pure_dict(rest)),
                  logical_names=names,
                  abstract_params=nnx.to_pure_dict(params))


def num_params(model_def: ModelDef) -> int:
  return sum(int(x.size) for x in jax.tree.leaves(model_def.abstract_params))


def init_params(config: configs_lib.ModelConfig, seed: int) -> dict:
  """Fresh parameters of a HybridLM: a pure dict like nnx.to_pure_dict(nnx.state(model,
  nnx.Param)), deterministic in `seed`.

  The blocks of each mixer kind are built once, under jax.vmap over their layers' keys,
  and split per layer afterwards, so the traced init grows with the number of kinds, not
  of layers: built layer by layer, the 24-layer 0.4B init took 34 s to compile on 2 CPU
  cores (7 s now) and stalled for minutes on the H200.
  """
  key_top, key_blocks = jax.random.split(jax.random.key(seed))
  # Logical names stay metadata here: the shardings come from jit's out_shardings.
  with nnx.use_eager_sharding(False):
    # Embedding, final norm and head from a one-block twin (block params are replaced).
    top = HybridLM(dataclasses.replace(config, layers=config.layers[:1]),
                   rngs=nnx.Rngs(params=key_top, dropout=0))
  params = nnx.to_pure_dict(nnx.state(top, nnx.Param))
  blocks = {}
  for mixer in sorted(set(config.layers)):
    layers = [i for i, m in enumerate(config.layers) if m == mixer]

    def one(key, mixer=mixer):
      with nnx.use_eager_sharding(False):
        block = Block(config, mixer, rngs=nnx.Rngs(params=key, dropout=0))
      return nnx.to_pure_dict(nnx.state(block, nnx.Param))

    keys = jax.vmap(lambda i: jax.random.fold_in(key_blocks, i))(jnp.asarray(layers))
    stacked = jax.vmap(one)(keys)
    for j, i in enumerate(layers):
      blocks[i] = jax.tree.map(lambda x, j=j: x[j], stacked)
  params["blocks"] = {i: blocks[i] for i in range(len(config.layers))}
  return params


def init_train_state(model_def: ModelDef, tx: optax.GradientTransformation,
                     seed: int) -> TrainState:
  """A fresh train state (call under jax.jit with out_shardings to create it sharded)."""
  params = init_params(model_def.config, seed)
  want = jax.tree.map(lambda x: (x.shape, x.dtype), model_def.abstract_params)
  got = jax.tree.map(lambda x: (x.shape, x.dtype), params)
  assert got == want, "init_params' tree differs from the model's parameters"
  num_lte = len(model_def.lte_layers)
  controller = (lte_controller.init_controller(num_lte, model_def.config.lte.num_kv_heads)
                if num_lte else None)
  return TrainState(
      step=jnp.zeros((), jnp.int32),
      params=params,
      opt_state=tx.init(params),
      controller=controller,
      rng=jax.random.key_data(jax.random.key(seed + 2)),
      skipped=jnp.zeros((), jnp.int32))


def create_train_state(model_def: ModelDef, tx: optax.GradientTransformation, seed: int,
                       shardings: Any, on_host: bool | None = None) -> TrainState:
  """A fresh train state (init_train_state) laid out as `shardings`.

  on_host: draw it on the host CPU and copy each array's shards into place (None: when
  the default backend is not the CPU and a CPU device exists). Why: on the H200, XLA's GPU
  compiler had not finished compiling the 0.4B init after 47 s (it stalled the training
  benchmark for minutes in earlier runs) while the CPU compiles it in 7 s. The random bits
  are the same on every backend (threefry); normal draws pass them through log / erf_inv,
  whose last bit may differ between backends, so a host-drawn and a device-drawn state can
  differ by an ulp. Every process computes the whole state on its own CPU and keeps only
  its own shards, so this works on multi-host meshes too.
  """
  init = lambda: init_train_state(model_def, tx, seed)
  if on_host is None:
    on_host = jax.default_backend() != "cpu" and bool(_cpu_devices())
  if not on_host:
    return jax.jit(init, out_shardings=shardings)()
  # A one-device host mesh of its own: the caller's mesh context (jax.set_mesh) would
  # otherwise conflict with a computation pinned to the CPU.
  host_mesh = jax.sharding.Mesh(np.array(_cpu_devices()[:1]), ("host",))
  with jax.set_mesh(host_mesh):
    replicated = jax.sharding.NamedSharding(host_mesh, jax.sharding.PartitionSpec())
    host = jax.jit(init, out_shardings=replicated)()

  def place(x, sharding):
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])

  return jax.tree.map(place, host, shardings)


def _cpu_devices() -> list:
  # This process's own: under jax.distributed, jax.devices("cpu") lists every process's
  # CPUs and the first may belong to another host.
  try:
    return jax.local_devices(backend="cpu")
  except RuntimeError:   # JAX_PLATFORMS without the CPU
    return []
