"""Pure-function ops, layout [batch, time, heads, dim]; each has a reference beside its fast paths."""
from __future__ import annotations

from lte_jax.ops.attention import attention, masked_attention
from lte_jax.ops.gated_delta_rule import chunk_gated_delta_rule, recurrent_gated_delta_rule
from lte_jax.ops.lte_attention import lte_attention
from lte_jax.ops.lte_decode import lte_decode_attention
from lte_jax.ops.nsa_attention import nsa_attention, nsa_decode
from lte_jax.ops.short_conv import short_conv

__all__ = [
    "attention", "chunk_gated_delta_rule", "lte_attention", "lte_decode_attention",
    "masked_attention", "nsa_attention", "nsa_decode", "recurrent_gated_delta_rule",
    "short_conv",
]
