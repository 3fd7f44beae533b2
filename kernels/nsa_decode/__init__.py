"""NSA decode step in Pallas: GPU (Triton lowering) and TPU (Mosaic).

Modules: backend (the lowering choice and launch plan), kernel (the selected-block and
sliding-window branches of one (batch, KV head), gated), api (layout glue and the block
table).
"""
from lte_jax.kernels.nsa_decode.api import nsa_decode_pallas
from lte_jax.kernels.nsa_decode.backend import KERNELS, PLATFORMS, Plan

__all__ = ["KERNELS", "PLATFORMS", "Plan", "nsa_decode_pallas"]
