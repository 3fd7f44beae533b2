"""Key-side kernel: dk and dv, one program per (batch, KV head, aligned key tile of bs keys).

A program walks its tile's entries of the reads table (tables.py): the queries that
selected a block overlapping the tile, each with the interval [lo, hi) of the tile's keys
that block covers, so no program looks at a query that does not read it (FLA's
parallel_nsa visits every later query and tests its block list, O(T^2 / bs) a head).
Each entry adds its query's [Gp, D] group in the transposed form
(lte_attention.tiles.dkv_step: logits^T [bs, Gp], so lse and delta are rows), summed over
the group's heads in the product: dk/dv need no reduction afterwards. Work: the (query,
block) pairs actually selected. On TPU the reads list of a (batch, KV head) sits in SMEM
(2 x T x block_count int32) and the Q / dO rows in VMEM: short sequences only until a TPU
layout that streams them exists.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from lte_jax.kernels.lte_attention import tiles
from lte_jax.kernels.nsa_attention import backend, tables
from lte_jax.kernels.nsa_attention.forward import Static

F32 = jnp.float32


def _dkv_kernel(reads_ref, offsets_ref, q_ref, do_ref, lse_ref, delta_ref, k_ref, v_ref,
                dk_ref, dv_ref, *, cfg: Static):
  bs = cfg.block_size
  a = pl.program_id(2)
  k, v = k_ref[...], v_ref[...]
  j = jax.lax.broadcasted_iota(jnp.int32, (bs, 1), 0)                  # key offsets

  def entry(n, carry):
    i, code = reads_ref[0, 2 * n], reads_ref[0, 2 * n + 1]
    lo, hi = code & tables.READ_MASK, code >> tables.READ_SHIFT
    mask = (j >= lo) & (j < hi)                                         # [bs, 1]
    return tiles.dkv_step(carry, k, v, q_ref[i], do_ref[i], lse_ref[i], delta_ref[i], mask,
                          cfg.scale)

  init = (jnp.zeros(k.shape, F32), jnp.zeros(v.shape, F32))
  dk, dv = jax.lax.fori_loop(offsets_ref[0, a], offsets_ref[0, a + 1], entry, init)
  dk_ref[...] = dk * cfg.scale
  dv_ref[...] = dv


def selected_key_grads(cfg: Static, q, k, v, d_o, lse_rows, delta_rows, reads, offsets):
  """(dk, dv) fp32 in the KV layout of k, v.

  q [B, Tp, Hkv, Gp, D], d_o [.., Dv]; lse_rows, delta_rows [B, Tp, Hkv, 1, Gp] fp32;
  reads, offsets from tables.build."""
  layout, plan = cfg.layout, cfg.plan
  bs, tp, rows = cfg.block_size, cfg.padded, cfg.rows
  batch, d, dv = q.shape[0], k.shape[-1], v.shape[-1]
  in_specs = [backend.table_head(plan, reads), backend.table_head(plan, offsets),
              layout.group_sequence(tp, rows, d), layout.group_sequence(tp, rows, dv),
              layout.group_sequence(tp, 1, rows), layout.group_sequence(tp, 1, rows),
              layout.kv_block(bs, d), layout.kv_block(bs, dv)]
  out_shape = [jax.ShapeDtypeStruct(k.shape, F32), jax.ShapeDtypeStruct(v.shape, F32)]
  kernel = lambda *refs: _dkv_kernel(*refs, cfg=cfg)
  return backend.call(kernel, plan, grid=(batch, cfg.heads_kv, tp // bs), in_specs=in_specs,
                      out_specs=[layout.kv_block(bs, d), layout.kv_block(bs, dv)],
                      out_shape=out_shape, name="nsa_selected_dkv")(
                          reads, offsets, q, d_o, lse_rows, delta_rows, k, v)
