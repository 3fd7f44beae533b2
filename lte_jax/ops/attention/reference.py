"""Plain fp32 definition of causal softmax attention (GQA, sliding window, documents).

Builds the full boolean mask and fp32 logits: obviously correct and O(T^2) in
memory, which is what the tests compare the fast paths against. float64 inputs
(under jax.enable_x64) are computed in float64: the tests' most exact answer.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def compute_dtype(x: jax.Array) -> jnp.dtype:
  """float32, or float64 for float64 inputs (the references' dtype)."""
  return jnp.promote_types(x.dtype, jnp.float32)


def causal_mask(time: int, *, window_size: int | None = None,
                segment_ids: jax.Array | None = None) -> jax.Array:
  """[B or 1, 1, T, T] bool: query i sees key j iff j <= i, i - j <= window_size, same document."""
  i = jnp.arange(time)[:, None]
  j = jnp.arange(time)[None, :]
  mask = j <= i
  if window_size is not None:
    mask = mask & (i - j <= window_size)
  mask = mask[None, None]
  if segment_ids is not None:
    mask = mask & (segment_ids[:, None, :, None] == segment_ids[:, None, None, :])
  return mask


def masked_attention_reference(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, *,
                               scale: float) -> jax.Array:
  """GQA softmax attention over the keys where ``mask`` is True, in fp32 (float64 inputs:
  float64).

  q [B, Tq, Hq, D], k [B, S, Hkv, D], v [B, S, Hkv, Dv], mask [B or 1, Hkv or 1, Tq, S] bool
  -> o [B, Tq, Hq, Dv] in that dtype. Query head h reads KV head h // (Hq // Hkv); a query with
  no visible key outputs zeros.
  """
  f = compute_dtype(q)
  group = q.shape[2] // k.shape[2]
  k = jnp.repeat(k.astype(f), group, axis=2)
  v = jnp.repeat(v.astype(f), group, axis=2)
  if mask.shape[1] != 1:
    mask = jnp.repeat(mask, group, axis=1)
  hi = jax.lax.Precision.HIGHEST
  logits = jnp.einsum("bqhd,bkhd->bhqk", q.astype(f), k, precision=hi) * scale
  logits = jnp.where(mask, logits, -jnp.inf)
  row_max = jnp.max(logits, axis=-1, keepdims=True)
  row_max = jax.lax.stop_gradient(jnp.where(jnp.isneginf(row_max), 0.0, row_max))
  p = jnp.exp(logits - row_max)
  denom = jnp.sum(p, axis=-1, keepdims=True)
  p = p / jnp.where(denom > 0, denom, 1.0)
  return jnp.einsum("bhqk,bkhd->bqhd", p, v, precision=hi)


def attention_reference(q: jax.Array, k: jax.Array, v: jax.Array, *,
                        window_size: int | None, segment_ids: jax.Array | None,
                        scale: float) -> jax.Array:
  """Causal attention: q [B, T, Hq, D], k [B, T, Hkv, D], v [B, T, Hkv, Dv] -> [B, T, Hq, Dv]."""
  mask = causal_mask(q.shape[1], window_size=window_size, segment_ids=segment_ids)
  return masked_attention_reference(q, k, v, mask, scale=scale).astype(v.dtype)
