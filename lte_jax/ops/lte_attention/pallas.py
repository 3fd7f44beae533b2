"""The 'pallas' implementation: LTE's rules on lte_jax.kernels.lte_attention.

The kernels attend to a band [i - w, i] plus far keys, each with the last query
that reads it. Here the scores become those far keys: sinks (read to their
document's end) and retained tokens (r > 0; under a budget read up to
evict_at + w, the rule of ops/lte_attention/xla.py). The straight-through
estimator is applied to v before the kernels, so autodiff gives the scores their
gradient through v' while the kernels return only dq, dk, dv. Under a mesh the
kernels run per shard (ops/attention/pallas.py).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from lte_jax.kernels.lte_attention import attention_with_far_keys
from lte_jax.ops.attention.pallas import per_shard
from lte_jax.ops.lte_attention.reference import straight_through_values, token_positions
from lte_jax.ops.lte_attention.xla import evict_index


def far_keys(scores: jax.Array, segment_ids: jax.Array | None, *, sink_size: int,
             window_size: int, budget: int | None) -> tuple[jax.Array, jax.Array | None]:
  """scores [B, T, Hkv] (no gradient) -> (keep [B, T, Hkv] bool, last [B, T, Hkv] int32
  or None): the tokens a query may read beyond its window and the last query that does."""
  batch, time, _ = scores.shape
  positions = token_positions(segment_ids, batch, time)
  sinks = (positions < sink_size)[..., None]
  keep = sinks | (scores > 0)
  if budget is None:
    return keep, None
  evict_at = evict_index(scores, positions, segment_ids, sink_size=sink_size, budget=budget)
  # Sinks never leave: T is past every document's end (the kernels clip to it).
  return keep, jnp.where(sinks, time, evict_at + window_size)


def lte_attention_pallas(q, k, v, scores, *, sink_size, window_size, budget, segment_ids, scale,
                         platform: str | None = None, interpret: bool | None = None,
                         plan_options: dict | None = None):
  """Arguments as lte_jax.ops.lte_attention (validated there); platform ('gpu', 'tpu'),
  interpret and plan_options (Plan fields) as lte_jax.kernels.lte_attention.make_plan."""
  v = straight_through_values(v, scores)

  def op(q, k, v, scores, segment_ids):
    keep, last = far_keys(jax.lax.stop_gradient(scores), segment_ids, sink_size=sink_size,
                          window_size=window_size, budget=budget)
    return attention_with_far_keys(q, k, v, keep=keep, last=last, window_size=window_size,
                                   segment_ids=segment_ids, scale=scale, platform=platform,
                                   interpret=interpret, plan_options=plan_options)

  return per_shard(op, q, k, v, scores, segment_ids=segment_ids)
