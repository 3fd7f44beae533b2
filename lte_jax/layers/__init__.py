"""Flax NNX layers: norms, SwiGLU, RoPE, short conv and the token mixers."""
from __future__ import annotations

from lte_jax.layers.attention import Attention
from lte_jax.layers.common import dtype_of, linear, output_std, partitioned
from lte_jax.layers.gated_deltanet import GatedDeltaNet
from lte_jax.layers.lte import LTEAttention
from lte_jax.layers.lte_scorer import LTEScorer
from lte_jax.layers.mlp import SwiGLU
from lte_jax.layers.norm import GatedRMSNorm, RMSNorm
from lte_jax.layers.nsa import NSAAttention
from lte_jax.layers.rope import apply_rope
from lte_jax.layers.short_conv import ShortConv

__all__ = [
    "Attention", "GatedDeltaNet", "GatedRMSNorm", "LTEAttention", "LTEScorer", "NSAAttention",
    "RMSNorm", "ShortConv", "SwiGLU",
    "apply_rope", "dtype_of", "linear", "output_std", "partitioned",
]
