"""LTE attention: sinks + sliding window + learned retained tokens, with a straight-through gradient."""
from __future__ import annotations

from lte_jax.ops.lte_attention.api import IMPLEMENTATIONS, lte_attention

__all__ = ["IMPLEMENTATIONS", "lte_attention"]
