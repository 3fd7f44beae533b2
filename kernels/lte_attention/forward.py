"""Query-side kernels: the forward pass and dq, one program per (batch, query head, query tile).

A program walks the key tiles of its band ([band_lo, band_hi)) and then the
compact far-key tiles it can reach ([far_lo, far_hi)), both read from the
bounds table; with one online-softmax state the two parts merge for free and,
as the band takes only i - j <= w and the far part only i - j > w, no key is
counted twice. Band tiles in [full_lo, full_hi) are visible to every query of the
tile (the window's interior), and so are far tiles in [far_full_lo, far_full_hi) (keys
of the tile's one document below every query's window, read to the document's end):
those skip the masking. dq recomputes the probabilities
from the saved log-sum-exp (base 2, tiles.py).
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from lte_jax.kernels.lte_attention import backend, sets, tiles

F32 = jnp.float32


@dataclasses.dataclass(frozen=True)
class Static:
  """Shapes and constants shared by the kernels of one call (hashable).

  time: real sequence length T; padded: Tp (a multiple of every block);
  heads_kv, group: KV heads and query heads per KV head; window: w;
  far: whether there are far keys (False: sliding-window attention, band only).
  """
  plan: backend.Plan
  scale: float
  window: int
  time: int
  padded: int
  heads_kv: int
  group: int
  far: bool

  @property
  def tokens(self) -> backend.Tokens:
    return backend.Tokens(self.plan.native_layout)


def _kv_head(h, group: int):
  """KV head of query head h. lax.div, not //: Mosaic cannot lower the sign fix-up of
  a floor division without a TPU attached, and both operands are >= 0."""
  return jax.lax.div(h, jnp.int32(group))


def _walk(cfg: Static, bounds_ref, band_tile, far_tile, carry):
  """Run band_tile over this program's band key tiles, then far_tile over its compact
  tiles; both are (tile index, carry, masked) -> carry, masked=False for the tiles every
  query of the tile sees (tiles.walk_ranges)."""
  # This (batch, head)'s row of the table is in bounds_ref: sets.QUERY_BOUNDS per tile.
  at = lambda n: bounds_ref[0, pl.program_id(2) * sets.QUERY_BOUNDS + n]
  body = lambda tile: lambda masked: lambda t, c: tile(t, c, masked)
  carry = tiles.walk_ranges([at(n) for n in range(4)], body(band_tile), carry)
  if cfg.far:
    carry = tiles.walk_ranges([at(n) for n in range(4, 8)], body(far_tile), carry)
  return carry


def _tile_loaders(cfg: Static, lo_ref, k_ref, v_ref, far_refs, *, block_q: int, block_k: int):
  """(band(kb) -> (k, v, mask), far(c) -> (k, v, mask)) for this program's query tile."""
  tokens = cfg.tokens
  i = tiles.iota((block_q, 1), 0, pl.program_id(2) * block_q)
  lo = lo_ref[...]

  def band(kb):
    start = pl.multiple_of(kb * block_k, block_k)
    j = tiles.iota((1, block_k), 1, start)
    return (tokens.rows(k_ref, start, block_k), tokens.rows(v_ref, start, block_k),
            (j >= lo) & (j <= i))

  def far(c):
    idx, last = far_refs[-2][c], far_refs[-1][c]                       # [1, bk]
    mask = (idx < i - cfg.window) & (i <= last)
    if cfg.plan.gathers_far_rows:
      # Empty slots (index Tp) read the last row, masked: any real row would do.
      rows = jnp.minimum(far_refs[-2][c, 0, :], cfg.padded - 1)        # [bk]
      return k_ref[rows, :], v_ref[rows, :], mask
    kc_ref, vc_ref = far_refs[:2]
    rows = pl.ds(pl.multiple_of(c * block_k, block_k), block_k)
    return kc_ref[rows, :], vc_ref[rows, :], mask

  return band, far


def _forward_kernel(bounds_ref, lo_ref, q_ref, k_ref, v_ref, *refs, cfg: Static):
  far_refs, (o_ref, lse_ref) = refs[:-2], refs[-2:]
  bq, bk = cfg.plan.block_q, cfg.plan.block_k
  band, far = _tile_loaders(cfg, lo_ref, k_ref, v_ref, far_refs, block_q=bq, block_k=bk)
  q = q_ref[...]

  def step(load):
    def body(t, carry, masked):
      k, v, mask = load(t)
      return tiles.online_step(carry, q, k, v, mask if masked else None, cfg.scale)
    return body

  init = (jnp.full((bq, 1), tiles.NEG, F32), jnp.zeros((bq, 1), F32),
          jnp.zeros((bq, v_ref.shape[-1]), F32))
  m, l, acc = _walk(cfg, bounds_ref, step(band), step(far), init)
  # Every query reads at least itself, so l > 0 (the guard only keeps padding exact).
  l = jnp.where(l > 0, l, 1.0)
  o_ref[...] = (acc / l).astype(o_ref.dtype)
  lse_ref[...] = m + jnp.log2(l)


def _dq_kernel(bounds_ref, lo_ref, q_ref, do_ref, lse_ref, delta_ref, k_ref, v_ref, *refs,
               cfg: Static):
  far_refs, dq_ref = refs[:-1], refs[-1]
  bq, bk = cfg.plan.block_q, cfg.plan.block_k
  band, far = _tile_loaders(cfg, lo_ref, k_ref, v_ref, far_refs, block_q=bq, block_k=bk)
  q, d_o, lse, delta = q_ref[...], do_ref[...], lse_ref[...], delta_ref[...]

  def step(load):
    def body(t, dq, masked):
      k, v, mask = load(t)
      return tiles.dq_step(dq, q, k, v, d_o, lse, delta, mask if masked else None, cfg.scale)
    return body

  dq = _walk(cfg, bounds_ref, step(band), step(far), jnp.zeros(q.shape, F32))
  dq_ref[...] = (dq * cfg.scale).astype(dq_ref.dtype)


def _specs(cfg: Static, d: int, dv: int, far):
  """In-specs shared by both kernels: K and V sequences, then the far refs (api's
  _far_inputs: compact K and V unless the plan gathers rows, then idx and last)."""
  tokens, group, padded = cfg.tokens, cfg.group, cfg.padded
  kv_head = lambda h: _kv_head(h, group)
  specs = [tokens.sequence(padded, d, head=kv_head), tokens.sequence(padded, dv, head=kv_head)]
  if cfg.far:
    whole = lambda x: pl.BlockSpec((pl.squeezed, pl.squeezed, *x.shape[2:]),
                                   lambda b, h, n: (b, kv_head(h)) + (0,) * (x.ndim - 2))
    specs += [whole(x) for x in far]
  return specs


def _bounds(cfg: Static, bounds) -> pl.BlockSpec:
  """The program's row of sets.query_bounds [B, Hkv or 1, 1, nq * QUERY_BOUNDS]."""
  head = (lambda h: _kv_head(h, cfg.group)) if cfg.far else (lambda h: 0)
  return backend.scalars(cfg.plan, bounds, head)


def _column(block: int) -> pl.BlockSpec:
  """Rows of a query tile of a per-(batch, head) column [B, H, Tp, 1] -> ref [block, 1]."""
  return pl.BlockSpec((pl.squeezed, pl.squeezed, block, 1), lambda b, h, n: (b, h, n, 0))


def _lo_column(block: int) -> pl.BlockSpec:
  """lo [B, Tp, 1] (shared by all heads) -> ref [block, 1]."""
  return pl.BlockSpec((pl.squeezed, block, 1), lambda b, h, n: (b, n, 0))


def attention_forward(cfg: Static, q, k, v, lo, bounds, far):
  """q [layout, Hq heads, D], k [.., Hkv, D], v [.., Hkv, Dv] (Tp rows); lo [B, Tp]
  int32; bounds from sets.query_bounds; far: (kc [B, Hkv, Tp, D], vc [B, Hkv, Tp, Dv],
  idx and last [B, Hkv, Tp / block_k, 1, block_k] int32), without kc and vc when the
  plan gathers far rows from k and v (Plan.far_gather), or None
  -> (o like q with Dv, lse [B, Hq, Tp, 1] fp32, base 2)."""
  tokens, plan = cfg.tokens, cfg.plan
  batch, heads = q.shape[0], cfg.heads_kv * cfg.group
  d, dv, bq = q.shape[-1], v.shape[-1], plan.block_q
  nq = cfg.padded // bq
  args = [bounds, lo[..., None], q, k, v] + ([] if far is None else list(far))
  in_specs = ([_bounds(cfg, bounds), _lo_column(bq), tokens.block(bq, d)]
              + _specs(cfg, d, dv, far))
  out_shape = [jax.ShapeDtypeStruct(tokens.shape(batch, cfg.padded, heads, dv), v.dtype),
               jax.ShapeDtypeStruct((batch, heads, cfg.padded, 1), F32)]
  kernel = lambda *refs: _forward_kernel(*refs, cfg=cfg)
  return backend.call(kernel, plan, grid=(batch, heads, nq), in_specs=in_specs,
                      out_specs=[tokens.block(bq, dv), _column(bq)], out_shape=out_shape,
                      name="lte_attention_fwd")(*args)


def attention_dq(cfg: Static, q, k, v, d_o, lse, delta, lo, bounds, far):
  """dq [layout of q] in q.dtype; d_o like the output; lse, delta [B, Hq, Tp, 1] fp32;
  the rest as attention_forward."""
  tokens, plan = cfg.tokens, cfg.plan
  batch, heads = q.shape[0], cfg.heads_kv * cfg.group
  d, dv, bq = q.shape[-1], v.shape[-1], plan.block_q
  args = [bounds, lo[..., None], q, d_o, lse, delta, k, v] + ([] if far is None else list(far))
  in_specs = ([_bounds(cfg, bounds), _lo_column(bq), tokens.block(bq, d), tokens.block(bq, dv),
               _column(bq), _column(bq)] + _specs(cfg, d, dv, far))
  kernel = lambda *refs: _dq_kernel(*refs, cfg=cfg)
  return backend.call(kernel, plan, grid=(batch, heads, cfg.padded // bq), in_specs=in_specs,
                      out_specs=[tokens.block(bq, d)],
                      out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype)],
                      name="lte_attention_dq")(*args)[0]
