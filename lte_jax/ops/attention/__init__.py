"""Causal softmax attention (GQA, sliding window, packed documents) and masked attention."""
from __future__ import annotations

from lte_jax.ops.attention.api import IMPLEMENTATIONS, attention, masked_attention

__all__ = ["IMPLEMENTATIONS", "attention", "masked_attention"]
