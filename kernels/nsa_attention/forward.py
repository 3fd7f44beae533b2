"""Query-side kernels: the forward pass and dq, one program per (batch, KV head, block_t tokens).

For each of its tokens i a program takes the token's query group as one [Gp, D] tile
(the G query heads of the KV head, padded to Gp rows) and walks the token's selected
blocks from the query table: block b covers keys [s_i + b * bs, min(s_i + (b + 1) * bs,
i + 1)), read as the one or two aligned K/V tiles it overlaps, each masked to the block
(tables.py). One online softmax (lte_attention.tiles: base-2 logits, fp32 statistics)
runs over all of them -> o and the base-2 log-sum-exp; dq recomputes the probabilities
from it. Work: block_count * bs keys a token (two tiles a block where documents start
off the block grid), never T.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from lte_jax.kernels.lte_attention import tiles
from lte_jax.kernels.nsa_attention import backend, tables

F32 = jnp.float32


@dataclasses.dataclass(frozen=True)
class Static:
  """Shapes and constants shared by the kernels of one call (hashable).

  time: real sequence length T; padded: Tp (a multiple of block_size and block_t);
  heads_kv, group: KV heads and query heads per KV head; rows: Gp, the group's rows in
  the kernels (group padded on GPU); width: query-table entries per token.
  """
  plan: backend.Plan
  scale: float
  block_size: int
  time: int
  padded: int
  heads_kv: int
  group: int
  rows: int
  width: int

  @property
  def layout(self) -> backend.Layout:
    return backend.Layout(self.plan.native_layout)


def _walk_blocks(cfg: Static, table_ref, t, i, step, carry):
  """Run step(k, v, mask [1, bs], carry) -> carry over every aligned K/V tile of token t's
  (query index i's) selected blocks, each tile masked to its block's keys."""
  bs = cfg.block_size
  entry = lambda n: table_ref[0, t * cfg.width + n]
  doc_start, count = entry(0), entry(1)

  def block(s, carry):
    start = doc_start + entry(tables.HEADER + s) * bs
    end = jnp.minimum(start + bs, i + 1)

    def tile(a, carry):
      j = tiles.iota((1, bs), 1, a * bs)
      return step(a, (j >= start) & (j < end), carry)

    # lax.div, not //: both are >= 0 and Mosaic cannot lower floor division's sign fix-up.
    first, last = jax.lax.div(start, bs), jax.lax.div(end - 1, bs)
    return jax.lax.fori_loop(first, last + 1, tile, carry)

  return jax.lax.fori_loop(0, count, block, carry)


def _kv_tile(cfg: Static, ref, a):
  """Aligned tile a of a [Tp, d] K or V ref -> [bs, d]."""
  bs = cfg.block_size
  return ref[pl.ds(pl.multiple_of(a * bs, bs), bs), :]


def _forward_kernel(table_ref, q_ref, k_ref, v_ref, o_ref, lse_ref, *, cfg: Static):
  n = pl.program_id(2)
  rows, dv = cfg.rows, v_ref.shape[-1]

  def token(t, _):
    q = q_ref[t]                                                        # [Gp, D]

    def step(a, mask, carry):
      return tiles.online_step(carry, q, _kv_tile(cfg, k_ref, a), _kv_tile(cfg, v_ref, a),
                               mask, cfg.scale)

    init = (jnp.full((rows, 1), tiles.NEG, F32), jnp.zeros((rows, 1), F32),
            jnp.zeros((rows, dv), F32))
    m, l, acc = _walk_blocks(cfg, table_ref, t, n * q_ref.shape[0] + t, step, init)
    # Real tokens read at least themselves (l > 0); padding rows read nothing: zeros.
    l = jnp.where(l > 0, l, 1.0)
    o_ref[t] = (acc / l).astype(o_ref.dtype)
    lse_ref[t] = m + jnp.log2(l)
    return 0

  jax.lax.fori_loop(0, q_ref.shape[0], token, 0)


def _dq_kernel(table_ref, q_ref, do_ref, lse_ref, delta_ref, k_ref, v_ref, dq_ref, *,
               cfg: Static):
  n = pl.program_id(2)

  def token(t, _):
    q, d_o, lse, delta = q_ref[t], do_ref[t], lse_ref[t], delta_ref[t]

    def step(a, mask, dq):
      return tiles.dq_step(dq, q, _kv_tile(cfg, k_ref, a), _kv_tile(cfg, v_ref, a), d_o, lse,
                           delta, mask, cfg.scale)

    dq = _walk_blocks(cfg, table_ref, t, n * q_ref.shape[0] + t, step, jnp.zeros(q.shape, F32))
    dq_ref[t] = (dq * cfg.scale).astype(dq_ref.dtype)
    return 0

  jax.lax.fori_loop(0, q_ref.shape[0], token, 0)


def selected_forward(cfg: Static, q, k, v, query_table):
  """q [B, Tp, Hkv, Gp, D]; k, v in the KV layout; query_table from tables.build
  -> (o [B, Tp, Hkv, Gp, Dv] in v.dtype, lse [B, Tp, Hkv, Gp, 1] fp32, base 2)."""
  layout, plan = cfg.layout, cfg.plan
  batch, d, dv, bt = q.shape[0], q.shape[-1], v.shape[-1], plan.block_t
  in_specs = [backend.table_row(plan, query_table), layout.group_block(bt, cfg.rows, d),
              layout.kv_sequence(cfg.padded, d), layout.kv_sequence(cfg.padded, dv)]
  out_shape = [jax.ShapeDtypeStruct(q.shape[:-1] + (dv,), v.dtype),
               jax.ShapeDtypeStruct(q.shape[:-1] + (1,), F32)]
  kernel = lambda *refs: _forward_kernel(*refs, cfg=cfg)
  return backend.call(kernel, plan, grid=(batch, cfg.heads_kv, cfg.padded // bt),
                      in_specs=in_specs,
                      out_specs=[layout.group_block(bt, cfg.rows, dv),
                                 layout.group_block(bt, cfg.rows, 1)],
                      out_shape=out_shape, name="nsa_selected_fwd")(query_table, q, k, v)


def selected_dq(cfg: Static, q, k, v, d_o, lse, delta, query_table):
  """dq like q (q.dtype); d_o like o; lse, delta [B, Tp, Hkv, Gp, 1] fp32; the rest as
  selected_forward."""
  layout, plan = cfg.layout, cfg.plan
  batch, d, dv, bt = q.shape[0], q.shape[-1], v.shape[-1], plan.block_t
  column = layout.group_block(bt, cfg.rows, 1)
  in_specs = [backend.table_row(plan, query_table), layout.group_block(bt, cfg.rows, d),
              layout.group_block(bt, cfg.rows, dv), column, column,
              layout.kv_sequence(cfg.padded, d), layout.kv_sequence(cfg.padded, dv)]
  kernel = lambda *refs: _dq_kernel(*refs, cfg=cfg)
  return backend.call(kernel, plan, grid=(batch, cfg.heads_kv, cfg.padded // bt),
                      in_specs=in_specs, out_specs=[layout.group_block(bt, cfg.rows, d)],
                      out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype)],
                      name="nsa_selected_dq")(query_table, q, d_o, lse, delta, k, v)[0]
