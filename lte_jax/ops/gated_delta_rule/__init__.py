"""Gated delta rule (Gated DeltaNet's token mixer): chunked and recurrent forms."""
from __future__ import annotations

from lte_jax.ops.gated_delta_rule.api import (IMPLEMENTATIONS, chunk_gated_delta_rule,
                                              default_implementation)
from lte_jax.ops.gated_delta_rule.reference import recurrent_gated_delta_rule

__all__ = ["IMPLEMENTATIONS", "chunk_gated_delta_rule", "default_implementation",
           "recurrent_gated_delta_rule"]
