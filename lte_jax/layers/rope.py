"""Rotary position embedding (rotate-half layout, as flash-linear-attention)."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from lte_jax import _checks


def rope_angles(positions: jax.Array, dim: int, theta: float = 10000.0) -> jax.Array:
  """[B, T, dim // 2] float32 angles positions * theta^(-2i/dim)."""
  inv_freq = 1.0 / (theta ** (jnp.arange(0, dim, 2, dtype=jnp.float32) / dim))
  return positions.astype(jnp.float32)[..., None] * inv_freq


def apply_rope(x: jax.Array, positions: jax.Array, theta: float = 10000.0) -> jax.Array:
  """Rotate features of x [B, T, H, D] by its token positions [B, T].

  Feature i pairs with feature i + D/2 (not interleaved). Math in float32;
  the result has x's dtype.
  """
  _checks.check_rank("x", x, 4, "[batch, time, heads, head_dim]")
  _checks.check_shape("positions", positions, x.shape[:2], "[batch, time]")
  _checks.check_int_dtype("positions", positions)
  dim = x.shape[-1]
  if dim % 2:
    raise ValueError(f"x head_dim must be even for RoPE, got {dim}")
  angles = rope_angles(positions, dim, theta)[:, :, None, :]  # [B, T, 1, D/2]
  cos, sin = jnp.cos(angles), jnp.sin(angles)
  xf = x.astype(jnp.float32)
  x1, x2 = xf[..., : dim // 2], xf[..., dim // 2:]
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x.dtype)
