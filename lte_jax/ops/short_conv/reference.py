"""The short conv in plain JAX: the reference, and the 'xla' path (XLA fuses it)."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from lte_jax import segments


def short_conv_reference(x: jax.Array, weight: jax.Array,
                         segment_ids: jax.Array | None = None) -> jax.Array:
  """x [B, T, C], weight [K, C], segment_ids [B, T] or None -> [B, T, C] in x.dtype.

  y_t[c] = silu(sum_tap w[tap, c] x_{t-lag}[c]) with lag = K-1-tap, in fp32; a tap that
  would reach before the sequence or the token's document start reads zero.
  """
  k, t = weight.shape[0], x.shape[1]
  w = weight.astype(jnp.float32)
  x_pad = jnp.pad(x.astype(jnp.float32), ((0, 0), (k - 1, 0), (0, 0)))
  if segment_ids is not None:
    # A tap `lag` steps back stays inside the document iff the token sits at
    # least `lag` tokens after the document start.
    pos_in_doc = segments.positions_from_segment_ids(segment_ids)[..., None]
  y = jnp.zeros(x.shape, jnp.float32)
  for tap in range(k):
    lag = k - 1 - tap
    contrib = x_pad[:, tap:tap + t] * w[tap]
    if segment_ids is not None and lag > 0:
      contrib = jnp.where(pos_in_doc >= lag, contrib, 0.0)
    y = y + contrib
  return jax.nn.silu(y).astype(x.dtype)
