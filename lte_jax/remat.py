"""Rematerialisation policies of the decoder blocks (ModelConfig.remat) and the names that
tag what the 'dots_mixers' policy keeps.

'dots' keeps the matmul outputs, so the backward pass recomputes everything else in a
block: the short convs, norms and RoPE before a mixer's core op, and the core op's own
forward kernels, because their outputs (and the residuals a kernel's custom VJP saves,
such as the GDN kernels' WY inverse T or the attention kernels' log-sum-exp) are not
matmul outputs. On the H200's 0.4B GDN step that was about 21 ms of recomputed conv / norm
fusions and a second run of every forward kernel (profile of 2026-11-29; BENCHMARKS.md,
"Where the step's time goes" under the training step).
'dots_mixers' keeps, besides the matmul outputs, the values tagged with the names below:
per layer and token, the core op's inputs (GDN: also q and k before their L2 norm) and
output, and the kernels' residuals: in bf16 about 12 bytes per channel and token for a GDN
layer, ~400 MB per 0.4B layer at 8 x 4096 tokens (~10 GB for 24 layers), and less for an
attention layer.
"""
from __future__ import annotations

from typing import Any

import jax
from jax.ad_checkpoint import checkpoint_name

from lte_jax.configs import REMAT_POLICIES

# The core op's inputs after the short convs, norms, gates and RoPE (q, k, v, g, beta,
# retention scores), and GDN's q, k before the L2 norm.
MIXER_INPUTS = "mixer_inputs"
# The core op's output, before the output gate / norm / projection.
MIXER_OUTPUT = "mixer_output"
# What a kernel's custom VJP keeps besides its inputs and outputs.
KERNEL_RESIDUALS = "kernel_residuals"

POLICIES = REMAT_POLICIES


def tag(name: str, *xs: Any) -> tuple:
  """xs, each tagged `name` for the remat policy (identity otherwise). None passes."""
  return tuple(None if x is None else checkpoint_name(x, name) for x in xs)


def policy(name: str) -> Any:
  """The jax.checkpoint policy of a POLICIES entry other than 'none' ('full': None, which
  keeps only the block's input)."""
  if name not in POLICIES or name == "none":
    raise ValueError(f"remat policy must be one of {POLICIES[1:]}, got {name!r}")
  dots = jax.checkpoint_policies.dots_with_no_batch_dims_saveable
  return {
      "full": None,
      "dots": dots,
      "dots_mixers": jax.checkpoint_policies.save_from_both_policies(
          dots, jax.checkpoint_policies.save_only_these_names(
              MIXER_INPUTS, MIXER_OUTPUT, KERNEL_RESIDUALS)),
  }[name]
