"""In-kernel algebra of one (query tile, key tile) pair, shared by every kernel.

Everything is 2-D (the Triton lowering has no batched dots); per-token vectors
are columns [n, 1] or rows [1, n] so that no kernel transposes a vector, which
Mosaic handles poorly. Masks come from iota and those vectors (no captured
constants). Products take the inputs' dtype (bf16 operands, fp32 accumulation:
the tensor cores' rate); logits, softmax statistics and accumulators are fp32.

Logits are in base 2 (scale * log2(e) applied inside exp2's argument, a fused multiply-add
with the subtraction of the running max) and exponentiated with exp2, so the log-sum-exp the
forward saves is base 2 too: at head dim 64 a GPU's
exponential units are as busy as its tensor cores, and Triton's lowering of exp is
libdevice's accurate expf (a range reduction around the same ex2 instruction).
A tile whose every (query, key) pair is visible passes mask=None and skips the masking.

Precision at large logits: the backward recomputes each probability from the saved fp32
lse (m + log2 l, rounded at |m| * 2^-24) and, in dkv_step, from the transposed product
k q^T (another summation order), so its probabilities are off by ~|logit| * 2^-24
relative: fp32 dv errors of 2e-5 at logits ~1e3 and 2e-4 at several 1e3 against float64
(tests/test_attention_adversarial.py); the forward normalises acc / l and stays exact.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

F32 = jnp.float32
# Masked logits: finite, so a tile with no visible key never computes inf - inf;
# probabilities are zeroed by the mask, not by this value.
NEG = -1e30
LOG2E = math.log2(math.e)


def mm(a: jax.Array, b: jax.Array, *, tb: bool = False) -> jax.Array:
  """a @ b (a @ b^T with tb) in the operands' dtype with fp32 accumulation.

  fp32 operands get full fp32 products: the GPU default (TF32) rounds logits of ~1e3 by
  ~1, which check_adversarial measured as 0.15 relative error in dk on an H100.
  """
  dims = (((1,), (1,) if tb else (0,)), ((), ()))
  precision = jax.lax.Precision.HIGHEST if a.dtype == F32 and b.dtype == F32 else None
  return jax.lax.dot_general(a, b, dims, precision=precision, preferred_element_type=F32)


def iota(shape: tuple[int, int], axis: int, start) -> jax.Array:
  """start + index along `axis` of an int32 [rows, cols] tile (one of them 1)."""
  return start + jax.lax.broadcasted_iota(jnp.int32, shape, axis)


def _max_logit(raw, mask, scale):
  """Row max of the base-2 logits [n, 1] from the raw products (scale > 0 commutes with
  max), masked entries left out (a row with none visible gets scale * log2(e) * NEG)."""
  masked = raw if mask is None else jnp.where(mask, raw, NEG)
  return jnp.max(masked, axis=1, keepdims=True) * (scale * LOG2E)


def _probs(raw, scale, ref, mask):
  """exp2(raw * scale * log2(e) - ref), zero where masked. The scaling stays inside the
  exponent's argument so it compiles to one fused multiply-add per logit; a masked entry
  may overflow there (its ref can be about NEG), which the select turns into 0."""
  p = jnp.exp2(raw * (scale * LOG2E) - ref)
  return p if mask is None else jnp.where(mask, p, 0.0)


def walk_ranges(bounds, body, carry):
  """fori_loop body(masked) over the tile ranges of bounds = (lo, full_lo, full_hi, hi):
  [full_lo, full_hi) unmasked (every pair of those tiles visible), the ends masked."""
  lo, full_lo, full_hi, hi = bounds
  carry = jax.lax.fori_loop(lo, full_lo, body(True), carry)
  carry = jax.lax.fori_loop(full_lo, full_hi, body(False), carry)
  return jax.lax.fori_loop(full_hi, hi, body(True), carry)


def online_step(carry, q, k, v, mask, scale):
  """One key tile into the running softmax of a query tile.

  carry: (m [bq, 1] running max (base 2), l [bq, 1] running sum, acc [bq, Dv]) fp32;
  q [bq, D], k [bk, D], v [bk, Dv]; mask [bq, bk] bool or None (all visible).
  """
  m, l, acc = carry
  raw = mm(q, k, tb=True)
  m_new = jnp.maximum(m, _max_logit(raw, mask, scale))
  alpha = jnp.exp2(m - m_new)
  p = _probs(raw, scale, m_new, mask)
  l = alpha * l + jnp.sum(p, axis=1, keepdims=True)
  acc = alpha * acc + mm(p.astype(v.dtype), v)
  return m_new, l, acc


def dq_step(dq, q, k, v, d_o, lse, delta, mask, scale):
  """dq [bq, D] fp32 += dS K for one key tile; lse (base 2), delta [bq, 1]
  (delta = rowsum(dO * O))."""
  p = _probs(mm(q, k, tb=True), scale, lse, mask)
  ds = p * (mm(d_o, v, tb=True) - delta)
  return dq + mm(ds.astype(k.dtype), k)


def dkv_step(carry, k, v, q, d_o, lse, delta, mask, scale):
  """(dk [bk, D], dv [bk, Dv]) fp32 += one query tile, in the transposed form:
  logits^T [bk, bq] so that lse (base 2) and delta are rows [1, bq] and no product needs
  a transposed left operand. mask [bk, bq] or None."""
  dk, dv = carry
  p_t = _probs(mm(k, q, tb=True), scale, lse, mask)
  dv = dv + mm(p_t.astype(d_o.dtype), d_o)
  ds_t = p_t * (mm(v, d_o, tb=True) - delta)
  dk = dk + mm(ds_t.astype(q.dtype), q)
  return dk, dv
