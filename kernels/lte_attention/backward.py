"""Key-side kernels: dk and dv, one program per (batch, KV head, key tile).

Two kernels with one body: the band kernel's key tiles are tiles of the
sequence, read by the query tiles [j0 / bq, min(j + w, end_j) / bq]; the far
kernel's key tiles are compact far-key tiles, read by the query tiles after the
first key's window up to the tile's last reader. Query tiles that see every key of the
key tile (sets: full_lo, full_hi) skip the masking in both. A program sums over the query
heads of its KV head (GQA), so dk/dv need no reduction afterwards; the far
kernel's results are scattered back to the sequence by the caller, or, when the
kernel gathers the far keys' rows itself (Plan.far_gather='kernel'), added into the
band kernel's dk/dv in place at those rows.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from lte_jax.kernels.lte_attention import backend, sets, tiles
from lte_jax.kernels.lte_attention.forward import Static

F32 = jnp.float32


def _dkv_kernel(bounds_ref, q_ref, do_ref, lse_ref, delta_ref, k_ref, v_ref, mask_a_ref,
                mask_b_ref, *refs, cfg: Static, band: bool):
  """mask_a/mask_b: band: lo rows [nq, 1, bq] (mask_b unused); far: idx and last columns
  [bk, 1] of the compact keys. Per-query rows are [n, 1, block] so that a tile's row is
  picked by a leading-dim index (Mosaic's simplest dynamic access), never by a
  dynamic sublane or lane slice. refs: dk, dv outputs; far keys gathered by the kernel
  (Plan.far_gather): k, v are whole sequences and refs are the aliased dk, dv inputs then
  the outputs, whole sequences too, updated at the tile's rows."""
  tokens = cfg.tokens
  bq, bk = cfg.plan.block_q_dkv, cfg.plan.block_k_dkv
  kt = pl.program_id(2)
  gather = not band and cfg.plan.gathers_far_rows
  dk_ref, dv_ref = refs[-2:]
  # This (batch, head)'s row of the table is in bounds_ref: (q_lo, full_lo, full_hi, q_hi)
  # per key tile.
  at = lambda n: bounds_ref[0, kt * sets.KEY_BOUNDS + n]
  if band:
    j = tiles.iota((bk, 1), 0, kt * bk)
  else:
    idx, last = mask_a_ref[...], mask_b_ref[...]                       # [bk, 1]
  if gather:
    # Empty slots (index Tp) read and write back the last row unchanged: no row within
    # w of the end is ever a far key, so no other program writes it.
    rows = jnp.minimum(mask_a_ref[:, 0], cfg.padded - 1)               # [bk]
    k, v = k_ref[rows, :], v_ref[rows, :]
  else:
    k, v = k_ref[...], v_ref[...]

  def query_tile(g, masked):
    def body(qt, carry):
      start = pl.multiple_of(qt * bq, bq)
      q = tokens.rows(q_ref, start, bq, g)
      d_o = tokens.rows(do_ref, start, bq, g)
      lse, delta = lse_ref[g, qt], delta_ref[g, qt]                   # [1, bq]
      i = tiles.iota((1, bq), 1, start)
      if not masked:
        mask = None
      elif band:
        mask = (mask_a_ref[qt] <= j) & (j <= i)
      else:
        mask = (idx < i - cfg.window) & (i <= last)
      return tiles.dkv_step(carry, k, v, q, d_o, lse, delta, mask, cfg.scale)
    return body

  def head(g, carry):
    # Query tiles in [full_lo, full_hi) see every key of this tile: no masking there.
    return tiles.walk_ranges([at(n) for n in range(4)],
                             lambda masked: query_tile(g, masked), carry)

  init = (jnp.zeros(k.shape, F32), jnp.zeros(v.shape, F32))
  dk, dv = jax.lax.fori_loop(0, cfg.group, head, init)
  if gather:
    real = idx < cfg.padded                                            # [bk, 1]
    dk_ref[rows, :] = dk_ref[rows, :] + jnp.where(real, dk * cfg.scale, 0.0)
    dv_ref[rows, :] = dv_ref[rows, :] + jnp.where(real, dv, 0.0)
  else:
    dk_ref[...] = dk * cfg.scale
    dv_ref[...] = dv


def _query_specs(cfg: Static, d: int, dv: int):
  """Q and dO of the KV head's query heads (whole sequences), lse and delta rows."""
  tokens, group, bq = cfg.tokens, cfg.group, cfg.plan.block_q_dkv
  rows = pl.BlockSpec((pl.squeezed, group, cfg.padded // bq, 1, bq),
                      lambda b, h, n: (b, h, 0, 0, 0))
  return [tokens.sequence(cfg.padded, d, group=group),
          tokens.sequence(cfg.padded, dv, group=group), rows, rows]


def _rows(x, block):   # [B, H, Tp, 1] -> [B, H, Tp / block, 1, block], a free reshape
  return x.reshape(*x.shape[:2], x.shape[2] // block, 1, block)


def band_key_grads(cfg: Static, q, k, v, d_o, lse, delta, lo, bounds):
  """(dk, dv) fp32 in the token layout of k, v from the band part.

  q, d_o: [layout, Hq]; k, v: [layout, Hkv]; lse, delta [B, Hq, Tp, 1] fp32;
  lo [B, Tp] int32; bounds from sets.band_key_bounds."""
  tokens, plan = cfg.tokens, cfg.plan
  bq, bk = plan.block_q_dkv, plan.block_k_dkv
  batch, d, dv = q.shape[0], k.shape[-1], v.shape[-1]
  lo_rows = pl.BlockSpec((pl.squeezed, cfg.padded // bq, 1, bq), lambda b, h, n: (b, 0, 0, 0))
  in_specs = ([backend.scalars(plan, bounds, lambda h: 0)] + _query_specs(cfg, d, dv)
              + [tokens.block(bk, d), tokens.block(bk, dv), lo_rows, lo_rows])
  lo = lo.reshape(batch, cfg.padded // bq, 1, bq)
  args = (bounds, q, d_o, _rows(lse, bq), _rows(delta, bq), k, v, lo, lo)
  out_shape = [jax.ShapeDtypeStruct(k.shape, F32), jax.ShapeDtypeStruct(v.shape, F32)]
  kernel = lambda *refs: _dkv_kernel(*refs, cfg=cfg, band=True)
  return backend.call(kernel, plan, grid=(batch, cfg.heads_kv, cfg.padded // bk),
                      in_specs=in_specs, out_specs=[tokens.block(bk, d), tokens.block(bk, dv)],
                      out_shape=out_shape, name="lte_attention_dkv_band")(*args)


def far_key_grads(cfg: Static, q, d_o, lse, delta, k, v, idx, last, bounds, into=None):
  """The far keys' dk, dv (fp32); idx, last [B, Hkv, Tp] int32; bounds from
  sets.far_key_bounds.

  Default plan: k, v are the compact far keys kc [B, Hkv, Tp, D], vc [B, Hkv, Tp, Dv] and
  the result is (dkc, dvc) per compact slot, for the caller to scatter back.
  Plan.far_gather='kernel' (GPU layout): k, v are the whole sequences, the kernel reads
  the far keys' rows by idx, and into = (dk, dv) (fp32, the token layout of k, v; the
  band kernel's) come back with the far keys' gradients added at those rows, in place
  (aliased outputs)."""
  tokens, plan = cfg.tokens, cfg.plan
  if plan.gathers_far_rows != (into is not None):
    raise ValueError("far_key_grads takes `into` exactly when the plan gathers far rows")
  bq, bk = plan.block_q_dkv, plan.block_k_dkv
  batch, d, dv = q.shape[0], k.shape[-1], v.shape[-1]
  tile = lambda n: pl.BlockSpec((pl.squeezed, pl.squeezed, bk, n), lambda b, h, c: (b, h, c, 0))
  # Compact tiles of kc, vc and of the results, or whole sequences (rows gathered).
  keys = (lambda n: tokens.sequence(cfg.padded, n)) if into is not None else tile
  in_specs = ([backend.scalars(plan, bounds, lambda h: h)] + _query_specs(cfg, d, dv)
              + [keys(d), keys(dv), tile(1), tile(1)]
              + ([keys(d), keys(dv)] if into is not None else []))
  args = (bounds, q, d_o, _rows(lse, bq), _rows(delta, bq), k, v, idx[..., None],
          last[..., None]) + tuple(into or ())
  out_shape = [jax.ShapeDtypeStruct(k.shape[:-1] + (n,), F32) for n in (d, dv)]
  kernel = lambda *refs: _dkv_kernel(*refs, cfg=cfg, band=False)
  aliases = {len(args) - 2: 0, len(args) - 1: 1} if into is not None else None
  return backend.call(kernel, plan, grid=(batch, cfg.heads_kv, cfg.padded // bk),
                      in_specs=in_specs, out_specs=[keys(d), keys(dv)], out_shape=out_shape,
                      name="lte_attention_dkv_far", input_output_aliases=aliases)(*args)
