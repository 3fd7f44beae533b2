"""Depthwise causal short convolution + SiLU (Gated DeltaNet's q/k/v pre-mixing).

y_t[c] = silu( sum_k w[k, c] * x_{t-(K-1)+k}[c] ): tap K-1 reads the current
token, tap 0 the token K-1 steps back. Taps that would reach before the start
of the sequence or of the current document read zeros.
"""
from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from lte_jax import _checks
from lte_jax import sharding as sh
from lte_jax.layers.common import normal_init
from lte_jax.ops.short_conv import short_conv


class ShortConv(nnx.Module):
  """Causal depthwise conv1d, no bias, then SiLU. Weight [kernel_size, channels].

  __call__: x [B, T, C] -> [B, T, C] (lte_jax.ops.short_conv; `implementation` picks
  'pallas' or 'xla', None the op's default). Decoding keeps the last K-1 inputs as a
  conv_state [B, K-1, C] (see :meth:`prefill` and :meth:`step`).
  """

  def __init__(self, channels: int, kernel_size: int = 4, *, init_std: float,
               names: Sequence[str | None] = (sh.CONV, sh.HEADS), dtype: Any = None,
               param_dtype: Any = jnp.float32, implementation: str | None = None,
               rngs: nnx.Rngs):
    _checks.check_positive_int("channels", channels)
    _checks.check_positive_int("kernel_size", kernel_size)
    self.channels, self.kernel_size, self.dtype = channels, kernel_size, dtype
    self.implementation = implementation   # lte_jax.ops.short_conv's; None: per backend
    init = normal_init(init_std, names)
    self.weight = nnx.Param(init(rngs.params(), (kernel_size, channels), param_dtype))

  def _check_x(self, x: jax.Array, name: str = "x") -> None:
    _checks.check_shape(name, x, (None, None, self.channels), "[batch, time, channels]")

  def __call__(self, x: jax.Array, *, segment_ids: jax.Array | None = None) -> jax.Array:
    """x [B, T, C], segment_ids [B, T] or None -> [B, T, C] (lte_jax.ops.short_conv)."""
    self._check_x(x)
    return self._apply(x, segment_ids, self.implementation)

  def _apply(self, x, segment_ids, implementation):
    y = short_conv(x, self.weight[...], segment_ids, implementation=implementation)
    return y.astype(self.dtype or x.dtype)

  def init_state(self, batch_size: int, dtype: Any = jnp.float32) -> jax.Array:
    """Empty conv_state [B, K-1, C] (zeros = nothing before the document)."""
    return jnp.zeros((batch_size, self.kernel_size - 1, self.channels), dtype)

  def prefill(self, x: jax.Array, conv_state: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Continue from conv_state [B, K-1, C] over x [B, T, C] (one document per row).

    Returns (y [B, T, C], new conv_state [B, K-1, C]: the last K-1 inputs seen,
    zeros in front while fewer than K-1 tokens were seen from a fresh state).
    """
    self._check_x(x)
    _checks.check_shape("conv_state", conv_state,
                        (x.shape[0], self.kernel_size - 1, self.channels),
                        "[batch, kernel_size - 1, channels]")
    history = jnp.concatenate([conv_state.astype(x.dtype), x], axis=1)
    # The first K-1 rows are history only; every output kept reads real rows.
    # A decode step's few rows are one small fusion in XLA; the kernels pay for tiles.
    impl = "xla" if x.shape[1] < 64 else self.implementation
    y = self._apply(history, None, impl)[:, self.kernel_size - 1:]
    new_state = history[:, history.shape[1] - (self.kernel_size - 1):]
    return y, new_state.astype(conv_state.dtype)

  def step(self, x_t: jax.Array, conv_state: jax.Array) -> tuple[jax.Array, jax.Array]:
    """One decoding step: x_t [B, 1, C], conv_state [B, K-1, C] -> (y [B, 1, C], new state)."""
    _checks.check_shape("x_t", x_t, (None, 1, self.channels), "[batch, 1, channels]")
    return self.prefill(x_t, conv_state)
