"""SwiGLU feed-forward block."""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from lte_jax import _checks
from lte_jax import sharding as sh
from lte_jax.layers.common import linear, output_std


class SwiGLU(nnx.Module):
  """down_proj(silu(gate_proj(x)) * up_proj(x)); x [B, T, D] -> [B, T, D]. No biases.

  gate/up use normal(init_std); down_proj uses output_std(init_std, num_layers).
  """

  def __init__(self, d_model: int, intermediate_size: int, *, num_layers: int, init_std: float,
               dtype: Any = None, param_dtype: Any = jnp.float32, rngs: nnx.Rngs):
    _checks.check_positive_int("d_model", d_model)
    _checks.check_positive_int("intermediate_size", intermediate_size)
    self.d_model = d_model
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.gate_proj = linear(d_model, intermediate_size, names=(sh.EMBED, sh.MLP), std=init_std,
                            **kw)
    self.up_proj = linear(d_model, intermediate_size, names=(sh.EMBED, sh.MLP), std=init_std,
                          **kw)
    self.down_proj = linear(intermediate_size, d_model, names=(sh.MLP, sh.EMBED),
                            std=output_std(init_std, num_layers), **kw)

  def __call__(self, x: jax.Array) -> jax.Array:
    if x.ndim < 1 or x.shape[-1] != self.d_model:
      raise ValueError(f"x must have last axis d_model={self.d_model} (layout [..., d_model]), "
                       f"got {x.shape}")
    h = jax.nn.silu(self.gate_proj(x)) * self.up_proj(x)
    return self.down_proj(h)
