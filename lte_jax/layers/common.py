"""Small parameter helpers shared by every layer."""
from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def dtype_of(name: str) -> Any:
  """Map a config dtype name ('float32' or 'bfloat16') to the jnp dtype."""
  if name not in _DTYPES:
    raise ValueError(f"dtype must be one of {tuple(_DTYPES)}, got {name!r}")
  return _DTYPES[name]


def output_std(init_std: float, num_layers: int) -> float:
  """Init std of residual-branch output projections (o_proj, down_proj).

  The reference divides them by sqrt(2 x layers): each layer adds two residual
  branches, so this keeps the residual stream's variance flat with depth.
  """
  if not isinstance(num_layers, int) or num_layers < 1:
    raise ValueError(f"num_layers must be an integer >= 1, got {num_layers!r}")
  return init_std / math.sqrt(2 * num_layers)


def partitioned(init: Callable, names: Sequence[str | None]) -> Callable:
  """Attach logical axis ``names`` (lte_jax.sharding) to a parameter initialiser.

  Eager sharding is off: the names are metadata only, so modules can be built
  without a mesh; the trainer maps them to mesh axes with sharding.RULES
  (e.g. nnx.get_partition_spec + sharding.logical_to_spec) when it shards state.
  """
  return nnx.with_partitioning(init, tuple(names), eager_sharding=False)


def normal_init(std: float, names: Sequence[str | None]) -> Callable:
  """normal(std) initialiser that carries logical axis ``names``."""
  return partitioned(nnx.initializers.normal(stddev=std), names)


def uniform_fan_in(fan_in: int, scale: float = 1.0) -> Callable:
  """Initialiser ``init(key, shape, dtype)``: U(-b, b) with b = scale / sqrt(fan_in).

  PyTorch's default for nn.Linear / nn.Conv: its kaiming_uniform_(a=sqrt 5) weights have
  bound gain x sqrt(3 / fan_in) with gain sqrt(2 / (1 + 5)), i.e. 1 / sqrt(fan_in) (std
  1 / sqrt(3 fan_in)), and its biases the same bound.
  """
  if not isinstance(fan_in, int) or fan_in < 1:
    raise ValueError(f"fan_in must be an integer >= 1, got {fan_in!r}")
  bound = scale / math.sqrt(fan_in)

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, jnp.float32, -bound, bound).astype(dtype)

  return init


def linear(in_features: int, out_features: int, *, names: tuple, std: float, rngs: nnx.Rngs,
           use_bias: bool = False, param_dtype: Any = jnp.float32,
           dtype: Any = None) -> nnx.Linear:
  """nnx.Linear with a normal(std) kernel [in, out] sharded by logical ``names``."""
  if len(names) != 2:
    raise ValueError(f"names must name the 2 kernel axes (in, out), got {names!r}")
  bias_init = partitioned(nnx.initializers.zeros_init(), (names[1],))
  return nnx.Linear(in_features, out_features, use_bias=use_bias, dtype=dtype,
                    param_dtype=param_dtype, kernel_init=normal_init(std, names),
                    bias_init=bias_init, rngs=rngs)


def kernel_plan_options(text: str, implementation: str | None,
                        default_implementation: Callable[[], str],
                        parse: Callable[[str], dict]) -> dict | None:
  """A mixer config's kernel options 'name=value;...' as its op's plan_options: None when
  empty or when the op runs another implementation than 'pallas' on this backend (a
  GPU-tuned config still evaluates on CPU). `parse`: the kernel folder's parse_options."""
  if not text or (implementation or default_implementation()) != "pallas":
    return None
  return parse(text)
