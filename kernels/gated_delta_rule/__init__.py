"""Chunked gated delta rule in Pallas: GPU (Triton lowering) and TPU (Mosaic) kernels.

Modules: backend (the lowering choice, launch plans and token layout),
chunk_math (in-kernel algebra), inverse / prepare / state / output / qk_grads / wy_grads
(one kernel stage each), api (glue and the custom VJP).
"""
from lte_jax.kernels.gated_delta_rule.api import chunk_gated_delta_rule_pallas
from lte_jax.kernels.gated_delta_rule.backend import PLATFORMS, Plan, parse_options

__all__ = ["PLATFORMS", "Plan", "chunk_gated_delta_rule_pallas", "parse_options"]
