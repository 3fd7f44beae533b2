"""Public entry point of the gated delta rule with a choice of implementation."""
from __future__ import annotations

from typing import Callable

import jax

from lte_jax._checks import check_plan_options, check_positive_int
from lte_jax.ops.gated_delta_rule.pallas import chunk_gated_delta_rule_pallas
from lte_jax.ops.gated_delta_rule.reference import recurrent_gated_delta_rule
from lte_jax.ops.gated_delta_rule.validation import validate_args
from lte_jax.ops.gated_delta_rule.xla import chunk_gated_delta_rule_xla


def _reference(q, k, v, g, beta, *, scale, initial_state, output_final_state, segment_ids,
               chunk_size):
  del chunk_size  # the recurrence has no chunks
  return recurrent_gated_delta_rule(q, k, v, g, beta, scale=scale,
                                    initial_state=initial_state,
                                    output_final_state=output_final_state,
                                    segment_ids=segment_ids)


# name -> fn(q, k, v, g, beta, *, scale, initial_state, output_final_state,
#            segment_ids, chunk_size) -> (o, final_state | None)
IMPLEMENTATIONS: dict[str, Callable[..., tuple[jax.Array, jax.Array | None]]] = {
    "reference": _reference,
    "xla": chunk_gated_delta_rule_xla,
    "pallas": chunk_gated_delta_rule_pallas,
}
# implementation=None, per jax.default_backend(). GPU: 'pallas', measured on an H200
# (2026-11-29, B4 T4096 H16 D128, bf16): 2.0 / 6.4 ms fwd / fwd+bwd against 4.8 / 13.9 ms
# for 'xla' (BENCHMARKS.md). TPU stays on 'xla' until the Mosaic kernels have compiled
# and run on a TPU (only lowered so far: Mosaic's layout passes live in libtpu); the
# CPU runs Pallas only interpreted.
DEFAULT_IMPLEMENTATIONS = {"tpu": "xla", "gpu": "pallas", "cpu": "xla"}


def default_implementation(backend: str | None = None) -> str:
  return DEFAULT_IMPLEMENTATIONS.get(backend or jax.default_backend(), "xla")


def _resolve(implementation: str | None) -> str:
  name = default_implementation() if implementation is None else implementation
  available = tuple(IMPLEMENTATIONS)
  if name not in IMPLEMENTATIONS:
    raise ValueError(f"implementation must be one of {available} (or None), got {name!r}")
  return name


def chunk_gated_delta_rule(q: jax.Array, k: jax.Array, v: jax.Array, g: jax.Array,
                           beta: jax.Array, *, scale: float | None = None,
                           initial_state: jax.Array | None = None,
                           output_final_state: bool = False,
                           segment_ids: jax.Array | None = None, chunk_size: int = 64,
                           implementation: str | None = None,
                           plan_options: dict | None = None
                           ) -> tuple[jax.Array, jax.Array | None]:
  """Gated delta rule over a whole sequence (training / prefill).

  Args:
    q, k: [B, T, H, Dk], used as given (the layer L2-normalises them).
    v: [B, T, H, Dv].
    g: [B, T, H] per-token log decay (<= 0).  beta: [B, T, H] in [0, 1].
      Both are checked (ValueError) where their values are concrete; traced under jit
      they cannot be checked without a host sync: a g > 0 multiplies the state by
      exp(g) a step (g = 0.5 over 256 tokens gives inf / NaN outputs), a beta outside
      [0, 1] lets the delta-rule update grow it (beta = -0.5: outputs ~5e3 at T = 256),
      and NaN propagates to the rest of the document.
    scale: query scale; None means Dk ** -0.5.
    initial_state: [B, H, Dk, Dv] state before t = 0, for the row's first document.
    output_final_state: also return the state after the last token.
    segment_ids: [B, T] int; the state restarts at each change of id.
    chunk_size: tokens per chunk of the chunked form (any integer >= 1 for 'xla', a
      power of two >= 16 for 'pallas'; T need not be a multiple of it).
    implementation: 'pallas' (Pallas kernels; interpreted on CPU), 'xla' (chunked
      plain JAX) or 'reference' (recurrent scan); None: `default_implementation()`.
    plan_options: when the implementation (after None is resolved) is 'pallas', fields of
      lte_jax.kernels.gated_delta_rule.Plan, e.g. {'keep_states': True, 'block_v': 32}
      (`parse_options('keep_states=True;block_v=32')` builds it from a string).

  Returns:
    o [B, T, H, Dv] in v.dtype; final state [B, H, Dk, Dv] float32 or None.
  """
  name = _resolve(implementation)
  check_plan_options(plan_options, name)
  extra = {} if plan_options is None else {"plan_options": plan_options}
  _, _, _, dk, _ = validate_args(q, k, v, g, beta, scale=scale, initial_state=initial_state,
                                 segment_ids=segment_ids)
  check_positive_int("chunk_size", chunk_size)
  scale = dk ** -0.5 if scale is None else scale
  return IMPLEMENTATIONS[name](q, k, v, g, beta, scale=scale, initial_state=initial_state,
                              output_final_state=output_final_state, segment_ids=segment_ids,
                              chunk_size=int(chunk_size), **extra)
