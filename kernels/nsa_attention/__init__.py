"""Native Sparse Attention's selected-block branch in Pallas, training forward and backward.

Modules: backend (the lowering choice, Plan, layouts), tables (plain-JAX integer tables
from the selection bitmap), forward (forward and dq kernels, per token), backward (dk/dv
kernel, per aligned key tile), api (glue and the custom VJP). Which blocks a query
selects (compression probabilities, top-k) is decided by lte_jax.ops.nsa_attention; the
kernels read only those blocks.
"""
from lte_jax.kernels.nsa_attention.api import selected_attention
from lte_jax.kernels.nsa_attention.backend import PLATFORMS, Plan, make_plan, parse_options

__all__ = ["PLATFORMS", "Plan", "make_plan", "parse_options", "selected_attention"]
