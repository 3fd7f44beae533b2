"""Depthwise causal short convolution + SiLU (Gated DeltaNet's q/k/v pre-mixing)."""
from __future__ import annotations

from lte_jax.ops.short_conv.api import IMPLEMENTATIONS, default_implementation, short_conv
from lte_jax.ops.short_conv.reference import short_conv_reference

__all__ = ["IMPLEMENTATIONS", "default_implementation", "short_conv", "short_conv_reference"]
