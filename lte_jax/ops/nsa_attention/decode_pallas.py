"""The 'pallas' NSA decode step: selection in plain JAX, then lte_jax.kernels.nsa_decode.

The compression branch and the top-k selection work on L / block_size block means and
stay in plain JAX (decode.select_decode_blocks, shared with the 'xla' step); the kernel
reads only the selected blocks and the window's blocks of the cache. XLA does not
partition Pallas calls, so under an active mesh the step runs inside shard_map, split
over batch and KV heads (query head h reads KV head h // G, so contiguous blocks of
both line up).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from lte_jax import sharding as sh
from lte_jax.kernels.nsa_decode import nsa_decode_pallas as _kernel_op
from lte_jax.ops.nsa_attention.decode import select_decode_blocks


def _step(q, k_cache, v_cache, k_cmp, v_cmp, gates, position, *, block_size, block_count,
          window_size, scale, plan_options):
  batch, _, num_heads, head_dim = q.shape
  num_kv = k_cache.shape[2]
  qg = q[:, 0].astype(jnp.float32).reshape(batch, num_kv, num_heads // num_kv, head_dim)
  o_cmp, selected = select_decode_blocks(qg, k_cmp, v_cmp, position, block_size=block_size,
                                         block_count=block_count, scale=scale)
  return _kernel_op(q, k_cache, v_cache, o_cmp, selected, gates, position,
                    block_size=block_size, window_size=window_size, scale=scale,
                    **plan_options)


def nsa_decode_pallas(q, k_cache, v_cache, k_cmp, v_cmp, gates, position, *, block_size,
                      block_count, window_size, scale, plan_options=None):
  """Arguments as lte_jax.ops.nsa_decode (validated there); plan_options: fields of
  lte_jax.kernels.nsa_decode.Plan (platform, interpret, num_warps, num_stages)."""
  op = functools.partial(_step, block_size=block_size, block_count=block_count,
                         window_size=window_size, scale=scale,
                         plan_options=dict(plan_options or {}))
  position = jnp.asarray(position, jnp.int32)
  shards = sh.kernel_shards(q.shape[0], k_cache.shape[2])
  if shards is None:
    return op(q, k_cache, v_cache, k_cmp, v_cmp, gates, position)
  mesh, b, h = shards
  tensor = P(b, None, h, None)
  return jax.shard_map(op, mesh=mesh, in_specs=(tensor,) * 6 + (P(),), out_specs=tensor,
                       check_vma=False)(q, k_cache, v_cache, k_cmp, v_cmp, gates, position)
