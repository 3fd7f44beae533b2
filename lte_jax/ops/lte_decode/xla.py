"""Attention over the LTE decode cache in plain JAX: the masked blockwise softmax
(lte_jax.ops.attention.xla) under the cache's visibility mask."""
from __future__ import annotations

import jax

from lte_jax.ops.attention.xla import masked_attention_xla
from lte_jax.ops.lte_decode.reference import lte_decode_mask


def lte_decode_attention_xla(q: jax.Array, k: jax.Array, v: jax.Array, fill: jax.Array,
                             num_tokens: jax.Array, *, ring_size: int,
                             scale: float) -> jax.Array:
  """Same contract as lte_decode_attention_reference; inputs stay in their dtype,
  logits and softmax are fp32."""
  mask = lte_decode_mask(num_tokens, fill, ring_size=ring_size, num_slots=k.shape[1],
                         num_queries=q.shape[1])
  return masked_attention_xla(q, k, v, mask, scale=scale)
