"""Plain-JAX preparation of the attended set: band limits, far keys, loop bounds.

Query i of a KV head reads key j iff j <= i in i's document and
(i - j <= w, the band) or (i - j > w and j is a far key that i still keeps).
The band is a dense diagonal strip: query i reads [lo_i, i] with
lo_i = max(i - w, start of i's document). Far keys are sinks and retained
tokens; each carries `last`, the last query that keeps it (the end of its
document, or earlier under a budget), so query i reads far key j iff
j < i - w and i <= last_j: one compare pair, no document ids in the kernels.
Far keys are compacted per (batch, KV head), in time order, into T slots (so
nothing can overflow however many are kept); a prefix count gives each query
tile the range of compact tiles it can reach. The kernels' work is then the
band plus the far keys actually visible, not T^2.

Documents follow the lte_jax convention: a contiguous run of one id is one
document. Padding rows (t >= T, up to a multiple of the blocks) are documents
of one token each, so they read only themselves and nobody reads them.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from lte_jax import segments

I32 = jnp.int32


class Documents(NamedTuple):
  """start, end [B, Tp] int32: the first and last index of each token's document."""
  start: jax.Array
  end: jax.Array


class FarKeys(NamedTuple):
  """Compacted far keys of each (batch, KV head), in time order.

  idx [B, Hkv, Tp] int32: original index of compact slot c (Tp for an empty slot);
  last [B, Hkv, Tp] int32: the last query that reads it (-1 for an empty slot);
  before [B, Hkv, Tp + 1] int32: how many far keys have an index < t.
  """
  idx: jax.Array
  last: jax.Array
  before: jax.Array


def documents(segment_ids: jax.Array | None, batch: int, time: int, padded: int) -> Documents:
  """Document bounds of every row; rows t >= time are one-token documents."""
  t = jnp.arange(padded, dtype=I32)[None, :]
  if segment_ids is None:
    start = jnp.zeros((batch, time), I32)
    end = jnp.full((batch, time), time - 1, I32)
  else:
    first = segments.document_starts(segment_ids)
    last = jnp.concatenate([first[:, 1:], jnp.ones((batch, 1), bool)], axis=1)
    start = jax.lax.cummax(jnp.where(first, t[:, :time], 0), axis=1)
    end = jax.lax.cummin(jnp.where(last, t[:, :time], time - 1), axis=1, reverse=True)
  pad = ((0, 0), (0, padded - time))
  tb = jnp.broadcast_to(t, (batch, padded))
  real = tb < time
  return Documents(jnp.where(real, jnp.pad(start, pad), tb), jnp.where(real, jnp.pad(end, pad), tb))


def band_starts(docs: Documents, window: int) -> jax.Array:
  """lo [B, Tp] int32: the first key query i reads through the band."""
  t = jnp.arange(docs.start.shape[1], dtype=I32)[None, :]
  return jnp.maximum(t - window, docs.start)


FAR_COMPACTIONS = ("scatter", "sort")


def far_keys(keep: jax.Array, last: jax.Array | None, docs: Documents, window: int,
             compaction: str = "scatter") -> FarKeys:
  """keep [B, T, Hkv] bool (sinks and retained tokens); last [B, T, Hkv] int32, the last
  query a budget lets keep each token (None: no budget) -> FarKeys. compaction: one of
  FAR_COMPACTIONS (the same result; backend.Plan.far_compaction).

  A kept token whose last reader is within w of it is never far: it is left out,
  so short documents add no far keys.
  """
  batch, time, _ = keep.shape
  padded = docs.end.shape[1]
  t = jnp.arange(time, dtype=I32)[None, :, None]
  end = docs.end[:, :time, None]
  last = end if last is None else jnp.minimum(last, end)
  keep = keep & (last > t + window)
  pad = ((0, 0), (0, 0), (0, padded - time))
  keep = jnp.pad(jnp.transpose(keep, (0, 2, 1)), pad)                 # [B, H, Tp]
  last = jnp.pad(jnp.transpose(last.astype(I32), (0, 2, 1)), pad, constant_values=-1)
  before = jnp.pad(jnp.cumsum(keep, axis=-1, dtype=I32), ((0, 0), (0, 0), (1, 0)))
  if compaction == "sort":
    # Stable: kept tokens first, in time order.
    order = jnp.argsort(jnp.logical_not(keep).astype(I32), axis=-1, stable=True).astype(I32)
    filled = jnp.arange(padded, dtype=I32) < before[..., -1:]
    idx = jnp.where(filled, order, padded)
    last = jnp.where(filled, jnp.take_along_axis(last, order, axis=-1), -1)
    return FarKeys(idx, last, before)
  # Kept token t goes to slot before[t] (kept tokens first, in time order), the others
  # out of bounds at padded + t (dropped): every target distinct, as unique_indices says.
  t_all = jnp.broadcast_to(jnp.arange(padded, dtype=I32), keep.shape)
  slot = jnp.where(keep, before[..., :-1], padded + t_all)
  b = jnp.arange(batch)[:, None, None]
  h = jnp.arange(keep.shape[1])[None, :, None]
  compact = lambda x, fill: jnp.full(keep.shape, fill, I32).at[b, h, slot].set(
      x, mode="drop", unique_indices=True)
  return FarKeys(compact(t_all, padded), compact(last, -1), before)


# Entries per query tile of query_bounds, and per key tile of band_key_bounds and
# far_key_bounds.
QUERY_BOUNDS = 8
KEY_BOUNDS = 4


def _full_range(lo, hi, full_lo, full_hi):
  """[full_lo, full_hi) clipped into [lo, hi) (possibly empty, never reversed)."""
  full_lo = jnp.clip(full_lo, lo, hi)
  return full_lo, jnp.clip(full_hi, full_lo, hi)


def query_bounds(lo: jax.Array, docs: Documents, far: FarKeys | None, *, window: int,
                 time: int, block_q: int, block_k: int,
                 last_is_document_end: bool = False) -> jax.Array:
  """Loop bounds of the query-side kernels (forward, dq), int32
  [B, Hb, 1, nq * QUERY_BOUNDS]: (band_lo, full_lo, full_hi, band_hi, far_lo, far_full_lo,
  far_full_hi, far_hi) per (batch, head, query tile): key tiles [band_lo, band_hi) of the
  band, of which [full_lo, full_hi) are visible to every query of the tile (no masking),
  and compact tiles [far_lo, far_hi) of the far keys, of which [far_full_lo, far_full_hi)
  are visible to every query of the tile. Hb = Hkv with far keys, else 1 (the band does
  not depend on the head). last_is_document_end: far.last is each key's document end (no
  budget), which the unmasked far range needs; else that range is empty."""
  batch, padded = lo.shape
  nq = padded // block_q
  first = jnp.arange(nq, dtype=I32) * block_q
  final = first + block_q - 1
  band_lo = lo[:, ::block_q] // block_k                                  # [B, nq]
  band_hi = jnp.broadcast_to(final // block_k + 1, (batch, nq))
  # lo_i is non-decreasing in i, so the tile's last query has the latest band start; a
  # key tile is seen by every query if it starts at or after that and ends by the first.
  full_lo, full_hi = _full_range(band_lo, band_hi, -(-lo[:, block_q - 1::block_q] // block_k),
                                 (first + 1) // block_k)
  band = [band_lo, full_lo, full_hi, band_hi]
  if far is None:
    bounds = jnp.stack(band + [band_lo] * 4, axis=-1)
    return bounds.reshape(batch, 1, 1, nq * QUERY_BOUNDS)
  heads = far.before.shape[1]
  # Far keys of the tile: index in [start of the first query's document, final - w).
  start = jnp.take_along_axis(far.before, docs.start[:, None, ::block_q], axis=-1)
  stop = far.before[:, :, jnp.clip(final - window, 0, padded)]
  real = first < time                                    # padding tiles read no far key
  far_lo = start // block_k
  far_hi = jnp.where(real, jnp.maximum(-(-stop // block_k), far_lo), far_lo)
  # Every query of the tile reads the compact tiles wholly made of keys of its document
  # with index < first - w when the tile is inside one document and each key is read to
  # its document's end (no budget); compact slots run in time order, so those tiles are
  # whole tiles from the document's first slot up to the count below first - w.
  sure = far.before[:, :, jnp.clip(first - window, 0, padded)]
  one_doc = (docs.end[:, ::block_q] >= final)[:, None]       # also False for padding
  full = one_doc & last_is_document_end
  far_full_lo = jnp.where(full, jnp.clip(-(-start // block_k), far_lo, far_hi), far_lo)
  far_full_hi = jnp.where(full, jnp.clip(sure // block_k, far_full_lo, far_hi), far_lo)
  per_head = lambda x: jnp.broadcast_to(x[:, None], (batch, heads, nq))
  bounds = jnp.stack([per_head(x) for x in band] + [far_lo, far_full_lo, far_full_hi, far_hi],
                     axis=-1)
  return bounds.reshape(batch, heads, 1, nq * QUERY_BOUNDS)


def band_key_bounds(lo: jax.Array, docs: Documents, *, window: int, block_q: int,
                    block_k: int) -> jax.Array:
  """Loop bounds of the band dk/dv kernel, int32 [B, 1, 1, nk * KEY_BOUNDS]:
  (q_lo, full_lo, full_hi, q_hi) per key tile kb: query tiles [q_lo, q_hi) read it
  through the band (queries j .. min(j + w, end_j)); those in [full_lo, full_hi) see all
  of its keys (no masking). lo: band_starts."""
  batch, padded = lo.shape
  nk = padded // block_k
  first = jnp.arange(nk, dtype=I32) * block_k
  final = first + block_k - 1
  reach = jnp.minimum(final + window, docs.end[:, final])                # [B, nk]
  q_lo = jnp.broadcast_to(first // block_q, reach.shape)
  q_hi = reach // block_q + 1
  # Query tile qt sees all of key tile kb iff its first query is at or after the tile's
  # last key and its last query's band starts at or before the tile's first key (lo is
  # non-decreasing, so those tiles are a prefix of the ones after the key tile).
  lo_last = lo[:, block_q - 1::block_q]                                  # [B, nq]
  prefix = jnp.sum(lo_last[:, None, :] <= first[None, :, None], axis=-1, dtype=I32)
  full_lo, full_hi = _full_range(q_lo, q_hi, -(-final // block_q), prefix)
  bounds = jnp.stack([q_lo, full_lo, full_hi, q_hi], axis=-1)
  return bounds.reshape(batch, 1, 1, nk * KEY_BOUNDS)


def far_key_bounds(far: FarKeys, *, window: int, block_q: int, block_k: int) -> jax.Array:
  """Loop bounds of the far dk/dv kernel, int32 [B, Hkv, 1, ncap * KEY_BOUNDS]: (q_lo,
  full_lo, full_hi, q_hi) per compact tile: query tiles [q_lo, q_hi) after the first key's
  window up to the tile's last reader, of which [full_lo, full_hi) read every key of the
  tile (query i reads key j iff j < i - w and i <= last_j: past the window of the tile's
  last key, up to its earliest last reader; a tile with an empty slot has none)."""
  batch, heads, padded = far.idx.shape
  nq = padded // block_q
  idx = far.idx.reshape(batch, heads, padded // block_k, block_k)
  last = far.last.reshape(idx.shape)
  first, final = idx[..., 0], idx[..., -1]         # slots run in time order; empty: Tp
  reach = jnp.max(last, axis=-1)
  q_lo = jnp.minimum((first + window + 1) // block_q, nq)
  q_hi = jnp.where(reach > first + window, reach // block_q + 1, q_lo)
  full_lo, full_hi = _full_range(q_lo, q_hi, -(-(final + window + 1) // block_q),
                                 (jnp.min(last, axis=-1) + 1) // block_q)
  return jnp.stack([q_lo, full_lo, full_hi, q_hi], axis=-1).reshape(batch, heads, 1, -1)
