"""Native Sparse Attention: mean-pooled compression, top-n block selection, sliding window."""
from __future__ import annotations

from lte_jax.ops.nsa_attention.api import IMPLEMENTATIONS, nsa_attention, nsa_decode

__all__ = ["IMPLEMENTATIONS", "nsa_attention", "nsa_decode"]
