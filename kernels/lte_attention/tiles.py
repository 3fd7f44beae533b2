"""In-kernel algebra of one (query tile, key tile) pair, shared by every kernel.

Everything is 2-D (the Triton lowering has no batched dots); per-token vectors
are columns [n, 1] or rows [1, n] so that no kernel transposes a vector, which
Mosaic handles poorly. Masks come from iota and those vectors (no captured
constants). Products take the inputs' dtype (bf16 operands, fp32 accumulation:
the tensor cores' rate); logits, softmax statistics and accumulators are fp32.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

F32 = jnp.float32
# Masked logits: finite, so a tile with no visible key never computes inf - inf;
# probabilities are zeroed by the mask, not by this value.
NEG = -1e30


def mm(a: jax.Array, b: jax.Array, *, tb: bool = False) -> jax.Array:
  """a @ b (a @ b^T with tb) in the operands' dtype with fp32 accumulation."""
  dims = (((1,), (1,) if tb else (0,)), ((), ()))
  return jax.lax.dot_general(a, b, dims, preferred_element_type=F32)


def iota(shape: tuple[int, int], axis: int, start) -> jax.Array:
  """start + index along `axis` of an int32 [rows, cols] tile (one of them 1)."""
  return start + jax.lax.broadcasted_iota(jnp.int32, shape, axis)


def online_step(carry, q, k, v, mask, scale):
  """One key tile into the running softmax of a query tile.

  carry: (m [bq, 1] running max, l [bq, 1] running sum, acc [bq, Dv]) fp32;
  q [bq, D], k [bk, D], v [bk, Dv]; mask [bq, bk] bool.
  """
  m, l, acc = carry
  s = jnp.where(mask, mm(q, k, tb=True) * scale, NEG)
  m_new = jnp.maximum(m, jnp.max(s, axis=1, keepdims=True))
  alpha = jnp.exp(m - m_new)
  p = jnp.where(mask, jnp.exp(s - m_new), 0.0)
  l = alpha * l + jnp.sum(p, axis=1, keepdims=True)
  acc = alpha * acc + mm(p.astype(v.dtype), v)
  return m_new, l, acc


def dq_step(dq, q, k, v, d_o, lse, delta, mask, scale):
  """dq [bq, D] fp32 += dS K for one key tile; lse, delta [bq, 1] (delta = rowsum(dO * O))."""
  s = jnp.where(mask, mm(q, k, tb=True) * scale, NEG)
  p = jnp.where(mask, jnp.exp(s - lse), 0.0)
  ds = p * (mm(d_o, v, tb=True) - delta)
  return dq + mm(ds.astype(k.dtype), k)


def dkv_step(carry, k, v, q, d_o, lse, delta, mask, scale):
  """(dk [bk, D], dv [bk, Dv]) fp32 += one query tile, in the transposed form:
  logits^T [bk, bq] so that lse and delta are rows [1, bq] and no product needs a
  transposed left operand. mask [bk, bq]."""
  dk, dv = carry
  s_t = jnp.where(mask, mm(k, q, tb=True) * scale, NEG)
  p_t = jnp.where(mask, jnp.exp(s_t - lse), 0.0)
  dv = dv + mm(p_t.astype(d_o.dtype), d_o)
  ds_t = p_t * (mm(v, d_o, tb=True) - delta)
  dk = dk + mm(ds_t.astype(q.dtype), q)
  return dk, dv
