"""LTE sparse attention (sinks + window + retained tokens) in Pallas, training forward and backward.

Modules: backend (the lowering choice, Plan, token layout), sets (plain-JAX
band limits, far-key compaction and loop bounds), tiles (in-kernel algebra),
forward (forward and dq kernels), backward (dk/dv kernels), api (glue and the
custom VJP). The kernels know a band and far keys; LTE's rules (scores, budget,
straight-through gradient) are applied by lte_jax.ops.lte_attention.pallas.
Sliding-window and full causal attention run on the same kernels with no far keys.
"""
from lte_jax.kernels.lte_attention.api import (attention_with_far_keys,
                                               sliding_window_attention_pallas)
from lte_jax.kernels.lte_attention.backend import PLATFORMS, Plan, make_plan, parse_options

__all__ = ["PLATFORMS", "Plan", "attention_with_far_keys", "make_plan", "parse_options",
           "sliding_window_attention_pallas"]
