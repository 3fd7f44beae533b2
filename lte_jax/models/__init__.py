"""Language models built from the mixers in lte_jax.layers."""
from lte_jax.models.hybrid_lm import MIXER_REGISTRY, Block, HybridLM, count_params

__all__ = ["MIXER_REGISTRY", "Block", "HybridLM", "count_params"]
