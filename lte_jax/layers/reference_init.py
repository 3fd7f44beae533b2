"""ModelConfig.init = 'reference': the reference trainer's initialisation of a block.

The reference model (flash-linear-attention's ``_init_weights`` with the 'rescale'
residual strategy, run by the trainer's post-init) draws every Linear normal(init_std),
then redraws each output projection (``o_proj`` of the mixer, ``down_proj`` of the MLP)
with PyTorch's kaiming_uniform_(a=sqrt 5), U(+-1/sqrt(fan_in)), and divides it by
sqrt(2 x layers): std 1 / sqrt(3 fan_in x 2 x layers), e.g. 0.0026 (fan_in 1024) and
0.0016 (fan_in 2816) at 0.4B, against normal(0.006) / sqrt(48) = 0.00087 under 'normal'.
Its LTE scorer convolutions are nn.Conv2d modules, which that hook leaves to their own
reset: their biases keep PyTorch's default U(+-1/sqrt(fan_in)), fan_in = input channels
per group x kernel size (the scorer's weights and projection bias are the same under
both schemes, lte_jax.layers.lte_scorer).
"""
from __future__ import annotations

import math

from flax import nnx

from lte_jax.layers.common import uniform_fan_in
from lte_jax.layers.lte_scorer import LTEScorer


def _redraw(param: nnx.Param, init, rngs: nnx.Rngs) -> None:
  param.set_value(init(rngs.params(), param.shape, param.dtype))


def reinitialise(block: nnx.Module, num_layers: int, rngs: nnx.Rngs) -> None:
  """Redraw, in place, what the reference initialises differently in a Block.

  ``block``: a lte_jax.models.Block (``mixer.o_proj``, ``mlp.down_proj``, and
  ``mixer.scorer`` in LTE layers); ``num_layers``: the model's depth. Draws from
  ``rngs.params()``.
  """
  if not isinstance(num_layers, int) or num_layers < 1:
    raise ValueError(f"num_layers must be an integer >= 1, got {num_layers!r}")
  scale = 1.0 / math.sqrt(2 * num_layers)
  for proj in (block.mixer.o_proj, block.mlp.down_proj):
    kernel = proj.kernel   # [in, out]: fan_in is the input width
    _redraw(kernel, uniform_fan_in(kernel.shape[0], scale), rngs)
  scorer = getattr(block.mixer, "scorer", None)
  if isinstance(scorer, LTEScorer):
    for kernel, bias in zip(scorer.conv_kernels, scorer.conv_biases):
      ksize, _, c_in, _ = kernel.shape   # [K, Hkv, C_in, C_out], one group per head
      _redraw(bias, uniform_fan_in(ksize * c_in), rngs)
