"""Public LTE attention: causal attention over sinks, a window and the retained tokens."""
from __future__ import annotations

import jax
import numpy as np

from lte_jax import _checks
from lte_jax.ops.attention.api import (check_implementation, check_qkv, check_window_size,
                                       resolve_scale)
from lte_jax.ops.lte_attention import pallas, reference, xla

IMPLEMENTATIONS = {
    "reference": reference.lte_attention_reference,
    "xla": xla.lte_attention_xla,
    "pallas": pallas.lte_attention_pallas,
}


# implementation=None, per jax.default_backend(). GPU: 'pallas', measured on an H200
# (2026-11-29, BENCHMARKS.md): fwd+bwd 1.77 ms at (4, 4096, 16, 64) and 2.19 ms at
# (1, 16384, 16, 64), w 768, 512 retained per head. 'xla' was not in that run; it computes
# every causal block with a dense mask, so jax's fused cuDNN dense causal attention (1.88 /
# 4.95 ms there) bounds it from below. TPU keeps 'xla' until the Mosaic kernels have run on
# a TPU; the CPU runs Pallas only interpreted.
DEFAULT_IMPLEMENTATIONS = {"gpu": "pallas", "tpu": "xla", "cpu": "xla"}


def default_implementation(backend: str | None = None) -> str:
  return DEFAULT_IMPLEMENTATIONS.get(backend or jax.default_backend(), "xla")


def lte_attention(q: jax.Array, k: jax.Array, v: jax.Array, scores: jax.Array, *,
                  sink_size: int, window_size: int, budget: int | None = None,
                  segment_ids: jax.Array | None = None, scale: float | None = None,
                  implementation: str | None = None,
                  plan_options: dict | None = None) -> jax.Array:
  """Causal attention with Learnable Token Eviction (PAPER.md section 3).

  Query i of KV head h reads key j iff j <= i, both lie in one document and
  (pos_j < sink_size or i - j <= window_size or scores[b, j, h] > 0), where
  pos_j is j's position inside its document. Query heads of one KV head share
  its decision. The hard mask has no gradient; a straight-through estimator,
  v' = v * (1 + r - stop_gradient(r)), gives scores the gradient
  sum_d v * dL/dv' while leaving the forward value unchanged.

  Args:
    q: [B, T, Hq, D] queries; query head h reads KV head h // (Hq // Hkv).
    k: [B, T, Hkv, D] keys.
    v: [B, T, Hkv, Dv] values.
    scores: [B, T, Hkv] float retention scores r (retained iff r > 0), finite: checked
      (ValueError) when the values are concrete; traced under jit they cannot be checked
      without a host sync, and a NaN or inf score makes the outputs of its batch row NaN
      (its straight-through value v * (r - stop_gradient(r)) is NaN, and 0 * NaN is NaN
      in the products with it).
    sink_size: the first sink_size tokens of each document are always visible.
    window_size: largest distance i - j always visible (window_size + 1 tokens), an int
      in [0, 2**31 - 1].
    budget: None (training: every retained token is visible) or an int > sink_size:
      each query keeps only the (budget - sink_size) best-scored retained tokens
      outside sinks and window (ties: the earlier token wins), as the decode cache does.
    segment_ids: [B, T] int document ids; None: one document per row.
    scale: logit scale, default D ** -0.5.
    implementation: 'reference', 'xla' or 'pallas' (lte_jax.kernels.lte_attention:
      work ~ the attended set; interpreted on CPU). None: `default_implementation()`.
    plan_options: with 'pallas' only, kernel Plan fields such as
      {'block_q': 64, 'block_k': 64, 'num_warps': 4} (tuning).

  Returns:
    o [B, T, Hq, Dv] in v.dtype.
  """
  check_qkv(q, k, v)
  batch, time, _, _ = q.shape
  num_kv_heads = k.shape[2]
  _checks.check_shape("scores", scores, (batch, time, num_kv_heads), "[batch, time, kv_heads]")
  _checks.check_float_dtype("scores", scores)
  # The straight-through estimator computes v * (r - stop_gradient(r)): NaN for r = NaN or inf.
  _checks.check_values("scores", scores, np.isfinite, "finite (no NaN or inf)")
  _checks.check_positive_int("sink_size", sink_size, allow_zero=True)
  check_window_size(window_size, optional=False)
  if budget is not None:
    _checks.check_positive_int("budget", budget)
    if budget <= sink_size:
      raise ValueError(f"budget must be None or an integer > sink_size={sink_size}, "
                       f"got {budget!r}")
  _checks.check_segment_ids(segment_ids, batch, time)
  scale = resolve_scale(scale, q.shape[-1])
  check_implementation(implementation, IMPLEMENTATIONS)
  name = default_implementation() if implementation is None else implementation
  # Resolved first: a model config leaves implementation None and tunes the GPU default.
  _checks.check_plan_options(plan_options, name)
  fn = IMPLEMENTATIONS[name]
  extra = {} if plan_options is None else {"plan_options": plan_options}
  return fn(q, k, v, scores, sink_size=sink_size, window_size=window_size, budget=budget,
            segment_ids=segment_ids, scale=scale, **extra)
