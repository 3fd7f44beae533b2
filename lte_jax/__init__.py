"""lte_jax: hybrid linear/sparse-attention LMs with Learnable Token Eviction."""
__version__ = "0.1.0"
