"""Depthwise causal short convolution + SiLU in Pallas (GPU, Triton lowering).

Modules: kernel (the forward and backward kernels and their launch plan), api (padding
glue and the custom VJP). TPU keeps the plain-XLA form (lte_jax.ops.short_conv): the
kernels read row windows at unaligned offsets, which Mosaic's (8, 128) tiles do not take.
"""
from lte_jax.kernels.short_conv.api import short_conv_pallas
from lte_jax.kernels.short_conv.kernel import Plan

__all__ = ["Plan", "short_conv_pallas"]
