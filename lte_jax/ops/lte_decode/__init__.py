"""Attention of decode queries over the LTE constant-size cache (ring + retained slots)."""
from __future__ import annotations

from lte_jax.ops.lte_decode.api import (IMPLEMENTATIONS, default_implementation,
                                        lte_decode_attention)
from lte_jax.ops.lte_decode.reference import lte_decode_mask

__all__ = ["IMPLEMENTATIONS", "default_implementation", "lte_decode_attention",
           "lte_decode_mask"]
