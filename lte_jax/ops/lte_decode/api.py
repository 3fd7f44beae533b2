"""Public attention of a few decode queries over the LTE constant-size cache."""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

from lte_jax import _checks
from lte_jax.ops.attention.api import check_qkv, resolve_scale
from lte_jax.ops.lte_decode.pallas import lte_decode_attention_pallas
from lte_jax.ops.lte_decode.reference import lte_decode_attention_reference
from lte_jax.ops.lte_decode.xla import lte_decode_attention_xla

# name -> fn(q, k, v, fill, num_tokens, *, ring_size, scale) -> o
IMPLEMENTATIONS: dict[str, Callable[..., jax.Array]] = {
    "reference": lte_decode_attention_reference,
    "xla": lte_decode_attention_xla,
    "pallas": lte_decode_attention_pallas,
}
# implementation=None, per jax.default_backend(): 'xla' everywhere. On an H200
# (2026-11-29, batch 32, 16 heads, D 64, full 769 + 512 cache; BENCHMARKS.md) 'xla'
# took 0.073 ms per step and the kernel 0.082 ms; TPU: the kernel is only lowered so
# far; the CPU runs Pallas only interpreted.
DEFAULT_IMPLEMENTATIONS = {"tpu": "xla", "gpu": "xla", "cpu": "xla"}


def default_implementation(backend: str | None = None) -> str:
  return DEFAULT_IMPLEMENTATIONS.get(backend or jax.default_backend(), "xla")


def lte_decode_attention(q: jax.Array, k: jax.Array, v: jax.Array, fill: jax.Array,
                         num_tokens: Any, *, ring_size: int, scale: float | None = None,
                         implementation: str | None = None,
                         plan_options: dict | None = None) -> jax.Array:
  """Attention of the newest Tq tokens over an LTE cache (lte_jax/layers/lte.py).

  The cache holds, per KV head, a ring of ring_size = w + 1 slots (position p in
  slot p % ring_size) followed by b retained slots, of which the first fill[b, h]
  are in use. Query t of Tq sits at position num_tokens - Tq + t and reads the
  ring slots holding positions <= its own (the ring only ever holds the window)
  and every filled retained slot (sinks included). Exact for Tq = 1, the decode
  step; for Tq > 1 it is what a cache that already holds all Tq tokens offers.

  Args:
    q: [B, Tq, Hq, D] queries (RoPE applied); query head h reads KV head h // (Hq // Hkv).
    k: [B, ring_size + b, Hkv, D] cached keys, same dtype as q.
    v: [B, ring_size + b, Hkv, Dv] cached values.
    fill: [B, Hkv] int, retained slots in use, in [0, b].
    num_tokens: int scalar (may be traced), tokens written to the cache so far,
      the Tq queries included (>= Tq).
      fill and num_tokens are checked (ValueError) where their values are concrete;
      traced under jit they are not (that needs a host sync): a fill above b counts as
      b, and a query at a negative position (num_tokens < Tq) sees no slot (zeros).
    ring_size: static ring length w + 1 (1 <= Tq <= ring_size <= slots).
    scale: logit scale, default D ** -0.5.
    implementation: 'pallas' (the split-K kernel; interpreted on CPU), 'xla'
      (masked blockwise softmax) or 'reference' (dense fp32); None:
      `default_implementation()`.
    plan_options: 'pallas' only: fields of lte_jax.kernels.lte_decode.Plan
      (block_k, split, min_programs, num_warps, num_stages, platform, interpret).

  Returns:
    o [B, Tq, Hq, Dv] in v.dtype; fp32 softmax; a query with no visible slot gets zeros.
  """
  check_qkv(q, k, v, same_time=False)
  batch, num_queries = q.shape[:2]
  slots, num_kv = k.shape[1], k.shape[2]
  _checks.check_positive_int("ring_size", ring_size)
  if not num_queries <= ring_size <= slots:
    raise ValueError(f"ring_size must satisfy Tq={num_queries} <= ring_size <= cache slots="
                     f"{slots}, got {ring_size}")
  _checks.check_shape("fill", fill, (batch, num_kv), "[batch, kv_heads]")
  _checks.check_int_dtype("fill", fill)
  num_tokens = jnp.asarray(num_tokens)
  _checks.check_shape("num_tokens", num_tokens, (), "scalar")
  _checks.check_int_dtype("num_tokens", num_tokens)
  _checks.check_values("fill", fill, lambda f: (f >= 0) & (f <= slots - ring_size),
                       f"in [0, cache slots - ring_size] = [0, {slots - ring_size}]")
  _checks.check_values("num_tokens", num_tokens, lambda n: n >= num_queries,
                       f">= Tq={num_queries} (the queries are among the tokens)")
  scale = resolve_scale(scale, q.shape[-1])
  name = default_implementation() if implementation is None else implementation
  if name not in IMPLEMENTATIONS:
    raise ValueError(f"implementation must be one of {tuple(IMPLEMENTATIONS)} (or None), "
                     f"got {implementation!r}")
  if plan_options is not None:
    if name != "pallas":
      raise ValueError(f"plan_options apply to implementation='pallas' only, got "
                       f"implementation={name!r}")
    if not isinstance(plan_options, dict):
      raise ValueError(f"plan_options must be a dict or None, got {type(plan_options).__name__}")
    return IMPLEMENTATIONS[name](q, k, v, fill, num_tokens, ring_size=ring_size, scale=scale,
                                 plan_options=plan_options)
  return IMPLEMENTATIONS[name](q, k, v, fill, num_tokens, ring_size=ring_size, scale=scale)
