"""Runnable examples of lte_jax used from outside its own models (not installed)."""
