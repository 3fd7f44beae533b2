"""Public depthwise causal short conv + SiLU, by implementation."""
from __future__ import annotations

from typing import Callable

import jax

from lte_jax import _checks
from lte_jax.kernels.short_conv import Plan
from lte_jax.ops.short_conv.pallas import short_conv_pallas
from lte_jax.ops.short_conv.reference import short_conv_reference

# name -> fn(x, weight, segment_ids) -> y
IMPLEMENTATIONS: dict[str, Callable[..., jax.Array]] = {
    "xla": short_conv_reference,
    "pallas": short_conv_pallas,
}
# implementation=None, per jax.default_backend(): 'pallas' on GPU. Alone, XLA's conv is
# faster (H100, 2026-12-06, 8 x 4096 x 1024 bf16, fwd+bwd device ms: 'xla' 0.357,
# 'pallas' 0.523; FLA's Triton conv 1.345 queued), but inside the train step XLA fuses the
# conv's backward (the transpose of its pad) with its neighbours into one multi-output
# fusion that writes two fp32 [B, T, C] arrays, 1.5 ms a layer: the 0.4B GDN step took
# 0.325 s with 'xla' and 0.306 with 'pallas' (BENCHMARKS.md, short conv and training
# step). TPU: the kernels read unaligned row windows, a GPU-only form; the CPU runs Pallas
# only interpreted.
DEFAULT_IMPLEMENTATIONS = {"gpu": "pallas", "tpu": "xla", "cpu": "xla"}


def default_implementation(backend: str | None = None) -> str:
  return DEFAULT_IMPLEMENTATIONS.get(backend or jax.default_backend(), "xla")


def short_conv(x: jax.Array, weight: jax.Array, segment_ids: jax.Array | None = None, *,
               implementation: str | None = None, plan_options: dict | None = None
               ) -> jax.Array:
  """silu(causal depthwise conv1d(x)), as FLA's ShortConvolution with SiLU.

  Args:
    x: [B, T, C] float.
    weight: [K, C] float; tap K-1 reads the current token, tap 0 the token K-1 back.
    segment_ids: [B, T] int document ids or None; no tap reads across a document start.
    implementation: 'pallas' (GPU kernels; interpreted on CPU) or 'xla' (plain JAX, the
      reference); None: `default_implementation()` ('pallas' on GPU, else 'xla').
    plan_options: 'pallas' only: fields of lte_jax.kernels.short_conv.Plan (block_t,
      block_c, num_warps, num_stages, interpret).

  Returns:
    [B, T, C] in x.dtype, computed in fp32.
  """
  _checks.check_shape("x", x, (None, None, None), "[batch, time, channels]")
  _checks.check_float_dtype("x", x)
  _checks.check_shape("weight", weight, (None, x.shape[2]), "[kernel_size, channels]")
  _checks.check_float_dtype("weight", weight)
  _checks.check_segment_ids(segment_ids, x.shape[0], x.shape[1])
  name = default_implementation() if implementation is None else implementation
  if name not in IMPLEMENTATIONS:
    raise ValueError(f"implementation must be one of {tuple(IMPLEMENTATIONS)} (or None), "
                     f"got {implementation!r}")
  _checks.check_plan_options(plan_options, name)
  if plan_options is None:
    return IMPLEMENTATIONS[name](x, weight, segment_ids)
  unknown = sorted(set(plan_options) - set(Plan.__dataclass_fields__))
  if unknown:
    raise ValueError(f"plan_options has unknown keys {unknown}; allowed: "
                     f"{sorted(Plan.__dataclass_fields__)}")
  return short_conv_pallas(x, weight, segment_ids, plan_options=plan_options)
