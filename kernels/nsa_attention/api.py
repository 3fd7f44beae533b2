"""Attention over selected blocks (NSA's selection branch) on Pallas kernels: glue and the custom VJP.

Pipeline (modules in brackets): plain JAX [tables] turns the selection bitmap into the
query table (each token's blocks) and the reads table (each key tile's readers);
forward [forward]: per (batch, KV head, token) the query group attends over its selected
blocks -> o, lse; backward: dq per token [forward], dk/dv per aligned key tile
[backward]. The custom VJP covers q, k and v after padding (T to whole blocks, and on
GPU the group and head dims to powers of two >= 16) and, on TPU, the [B, Hkv, T, D]
transpose of k and v, which JAX differentiates.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from lte_jax import remat
from lte_jax.kernels.nsa_attention import backend, backward, forward, tables

F32 = jnp.float32


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _core(cfg: forward.Static, q, k, v, tabs: tables.Tables):
  """q [B, Tp, Hkv, Gp, D], k, v in the KV layout -> o [B, Tp, Hkv, Gp, Dv]."""
  return _core_fwd(cfg, q, k, v, tabs)[0]


def _core_fwd(cfg, q, k, v, tabs):
  o, lse = forward.selected_forward(cfg, q, k, v, tabs.query)
  # Tagged, a block under the 'dots_mixers' remat policy keeps o and lse rather than rerun
  # the forward kernel in the backward pass (lte_jax.remat).
  o_res, lse = remat.tag(remat.KERNEL_RESIDUALS, o, lse)
  return o, (q, k, v, tabs, o_res, lse)


def _core_bwd(cfg, residuals, d_o):
  q, k, v, tabs, o, lse = residuals
  d_o = d_o.astype(o.dtype)
  delta = jnp.sum(d_o.astype(F32) * o.astype(F32), axis=-1, keepdims=True)  # [.., Gp, 1]
  dq = forward.selected_dq(cfg, q, k, v, d_o, lse, delta, tabs.query)
  # [Gp, 1] columns and [1, Gp] rows have one memory order: the reshapes are free.
  as_rows = lambda x: x.reshape(*x.shape[:3], 1, cfg.rows)
  dk, dv = backward.selected_key_grads(cfg, q, k, v, d_o, as_rows(lse), as_rows(delta),
                                       tabs.reads, tabs.offsets)
  return dq, dk.astype(k.dtype), dv.astype(v.dtype), None


_core.defvjp(_core_fwd, _core_bwd)


def _padded_dim(n: int) -> int:
  """A power of two >= 16 (Triton dots; zero rows and columns are inert)."""
  return max(16, 1 << (n - 1).bit_length())


def selected_attention(q: jax.Array, k: jax.Array, v: jax.Array, selected: jax.Array, *,
                       block_size: int, block_count: int, segment_ids: jax.Array | None,
                       scale: float, platform: str | None = None, interpret: bool | None = None,
                       plan_options: dict | None = None) -> jax.Array:
  """Causal attention of each query over the tokens of its selected in-document blocks.

  Query i (document start s_i) of KV head h reads key j iff s_i <= j <= i and block
  (j - s_i) // block_size is set in selected[b, i, h] (blocks start at each document's
  first token; a query selects only blocks of its document up to its own).

  q [B, T, Hq, D], k [B, T, Hkv, D], v [B, T, Hkv, Dv]; selected [B, T, Hkv,
  ceil(T / block_size)] bool with at most block_count blocks a query (no gradient);
  block_size a power of two >= 16 -> o [B, T, Hq, Dv] in v.dtype (zeros for a query
  that selects nothing); gradients for q, k, v. platform: 'gpu' or 'tpu' (None: the
  default backend's); interpret: None runs interpreted on CPU only; plan_options: Plan
  fields.
  """
  plan = backend.make_plan(platform, interpret, plan_options)
  if block_size < 16 or block_size & (block_size - 1) or block_size >= 1 << tables.READ_SHIFT:
    raise ValueError(f"block_size must be a power of two in [16, 2^{tables.READ_SHIFT}) for "
                     f"the Pallas kernels, got {block_size!r}")
  batch, time, num_heads, d = q.shape
  num_kv_heads, dv = k.shape[2], v.shape[-1]
  group = num_heads // num_kv_heads
  multiple = max(block_size, plan.block_t)
  padded = -(-time // multiple) * multiple
  pad = _padded_dim if plan.pads_dims else (lambda n: n)
  rows, d_k, d_v = pad(group), pad(d), pad(dv)
  cfg = forward.Static(plan=plan, scale=float(scale), block_size=block_size, time=time,
                       padded=padded, heads_kv=num_kv_heads, group=group, rows=rows,
                       width=tables.query_width(block_count))
  tabs = tables.build(selected, segment_ids, block_size=block_size, block_count=block_count,
                      padded=padded, block_t=plan.block_t)
  q5 = q.reshape(batch, time, num_kv_heads, group, d)
  q5 = jnp.pad(q5, ((0, 0), (0, padded - time), (0, 0), (0, rows - group), (0, d_k - d)))
  kv = lambda x, width: cfg.layout.kv_to_kernel(
      jnp.pad(x, ((0, 0), (0, padded - time), (0, 0), (0, width - x.shape[-1]))))
  o = _core(cfg, q5, kv(k, d_k), kv(v, d_v), tabs)
  return o[:, :time, :, :group, :dv].reshape(batch, time, num_heads, dv).astype(v.dtype)
