"""LTE constant-cache decode attention in Pallas: GPU (Triton lowering) and TPU (Mosaic).

Modules: backend (the lowering choice and launch plan), kernel (the split-K
partial softmax per (batch, KV head, run of slots)), api (layout glue and the
combine of the splits).
"""
from lte_jax.kernels.lte_decode.api import combine, lte_decode_attention_pallas
from lte_jax.kernels.lte_decode.backend import PLATFORMS, Plan

__all__ = ["PLATFORMS", "Plan", "combine", "lte_decode_attention_pallas"]
