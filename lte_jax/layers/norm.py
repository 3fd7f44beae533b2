"""RMSNorm and the gated per-head RMSNorm at the output of Gated DeltaNet."""
from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from lte_jax import _checks
from lte_jax import sharding as sh
from lte_jax.layers.common import partitioned


def rms_normalize(x: jax.Array, eps: float) -> jax.Array:
  """x / sqrt(mean(x^2) + eps) over the last axis, in float32."""
  xf = x.astype(jnp.float32)
  return xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)


class RMSNorm(nnx.Module):
  """RMSNorm over the last axis: x [..., dim] -> same shape, weight [dim] (init 1).

  Statistics in float32; output in ``dtype`` (None: x's dtype).
  """

  def __init__(self, dim: int, *, eps: float = 1e-6, names: Sequence[str | None] = (sh.EMBED,),
               dtype: Any = None, param_dtype: Any = jnp.float32):
    _checks.check_positive_int("dim", dim)
    if not eps > 0:
      raise ValueError(f"eps must be > 0, got {eps!r}")
    self.dim, self.eps, self.dtype = dim, eps, dtype
    init = partitioned(nnx.initializers.ones_init(), names)
    self.weight = nnx.Param(init(jax.random.key(0), (dim,), param_dtype))

  def __call__(self, x: jax.Array) -> jax.Array:
    if x.ndim < 1 or x.shape[-1] != self.dim:
      raise ValueError(f"x must have last axis {self.dim} (layout [..., dim]), got {x.shape}")
    out_dtype = self.dtype or x.dtype
    y = rms_normalize(x, self.eps) * self.weight[...].astype(jnp.float32)
    return y.astype(out_dtype)


class GatedRMSNorm(nnx.Module):
  """Per-head RMSNorm times SiLU output gate: norm(x) * weight * silu(gate).

  x, gate: [B, T, H, Dv]; the norm runs over Dv with one weight [Dv] shared by
  all heads (the reference's fused gated norm). Math in float32; output in
  ``dtype`` (None: x's dtype).
  """

  def __init__(self, head_dim: int, *, eps: float = 1e-6, dtype: Any = None,
               param_dtype: Any = jnp.float32):
    _checks.check_positive_int("head_dim", head_dim)
    if not eps > 0:
      raise ValueError(f"eps must be > 0, got {eps!r}")
    self.head_dim, self.eps, self.dtype = head_dim, eps, dtype
    init = partitioned(nnx.initializers.ones_init(), (sh.HEAD_DIM,))
    self.weight = nnx.Param(init(jax.random.key(0), (head_dim,), param_dtype))

  def __call__(self, x: jax.Array, gate: jax.Array) -> jax.Array:
    if x.ndim < 1 or x.shape[-1] != self.head_dim:
      raise ValueError(f"x must have last axis {self.head_dim} (layout [..., head_v_dim]), "
                       f"got {x.shape}")
    if gate.shape != x.shape:
      raise ValueError(f"gate must have the shape of x {x.shape}, got {gate.shape}")
    out_dtype = self.dtype or x.dtype
    y = rms_normalize(x, self.eps) * self.weight[...].astype(jnp.float32)
    y = y * jax.nn.silu(gate.astype(jnp.float32))
    return y.astype(out_dtype)
