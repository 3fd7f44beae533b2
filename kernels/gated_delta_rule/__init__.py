"""Chunked gated delta rule in Pallas: GPU (Triton lowering) and TPU (Mosaic) kernels.

Modules: backend (the lowering choice and launch plans), chunk_math (in-kernel
algebra), prepare / state / output / backward (one kernel stage each), api
(layout glue and the custom VJP).
"""
from lte_jax.kernels.gated_delta_rule.api import chunk_gated_delta_rule_pallas
from lte_jax.kernels.gated_delta_rule.backend import PLATFORMS, Plan

__all__ = ["PLATFORMS", "Plan", "chunk_gated_delta_rule_pallas"]
