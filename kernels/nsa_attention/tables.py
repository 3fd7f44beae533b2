"""Plain-JAX integer tables of the selected-block kernels (no gradient).

Query i (document start s_i) reads, for each of its selected in-document blocks b, the
keys [s_i + b * bs, min(s_i + (b + 1) * bs, i + 1)); blocks are selected inside i's
document and never past its current block, so nothing else needs masking. The kernels
read K and V in ALIGNED tiles [a * bs, (a + 1) * bs): a block that starts off the grid
(a document starting mid-tile) spans two tiles, each masked to the block's keys, so
every load is aligned on both lowerings.

- query table, per token: (s_i, n_i, b_0 .. b_{n_i - 1}) with the selected blocks in
  increasing order, padded to a power-of-two width (the forward and dq kernels).
- reads, per aligned key tile a: the (query i, keys [lo, hi) of the tile) pairs of every
  selected block that overlaps the tile, sorted by tile, then query (a block off the grid
  gives one pair in each of its two tiles; two blocks of one query in one tile give two
  pairs with disjoint intervals, whose gradient terms simply add). Stored as one list
  per (batch, KV head): entry n at [2n] (query) and [2n + 1] (lo + hi * 2^16), with the
  offsets of each tile's first entry, so the dk/dv kernel walks exactly the queries that
  read its tile: block_count * T pairs in all (twice that with documents), at any T.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from lte_jax.kernels.lte_attention import sets

I32 = jnp.int32
# reads: hi offset << READ_SHIFT | lo offset (block sizes < 2^16).
READ_SHIFT = 16
READ_MASK = (1 << READ_SHIFT) - 1
# Query table entries before the block list: document start, block count.
HEADER = 2


class Tables(NamedTuple):
  """query [B, Hkv, Tp / bt, 1, bt * width]: per token (start, count, blocks...);
  reads [B, Hkv, 1, 1, 2 * E]: (query, packed interval) pairs sorted by key tile, E =
  Tp * block_count (x2 with documents), unused entries past the last offset;
  offsets [B, Hkv, 1, 1, Tp / bs + 1]: tile a's pairs are entries [offsets[a], offsets[a + 1])."""
  query: jax.Array
  reads: jax.Array
  offsets: jax.Array


def query_width(block_count: int) -> int:
  """Entries per token of the query table: HEADER + block_count, to a power of two (Triton
  blocks are powers of two)."""
  return 1 << (HEADER + block_count - 1).bit_length()


def build(selected: jax.Array, segment_ids: jax.Array | None, *, block_size: int,
          block_count: int, padded: int, block_t: int) -> Tables:
  """selected [B, T, Hkv, C] bool (in-document blocks each query reads, C = ceil(T / bs),
  at most block_count per query) -> Tables; rows t >= T read nothing."""
  selected = jax.lax.stop_gradient(selected)
  batch, time, heads, num_blocks = selected.shape
  bs = block_size
  docs = sets.documents(segment_ids, batch, time, padded)
  real = jnp.arange(padded) < time
  sel = jnp.pad(selected, ((0, 0), (0, padded - time), (0, 0), (0, 1)))   # [B, Tp, H, C + 1]
  sel = jnp.transpose(sel & real[None, :, None, None], (0, 2, 1, 3))        # [B, H, Tp, C + 1]

  # Query table: the selected blocks in increasing order (top_k of C - b over the bitmap).
  top = min(block_count, num_blocks)
  rank = jnp.where(sel[..., :num_blocks], num_blocks - jnp.arange(num_blocks, dtype=I32), 0)
  values, _ = jax.lax.top_k(rank, top)                                      # [B, H, Tp, top]
  blocks = jnp.where(values > 0, num_blocks - values, 0)
  count = jnp.sum(sel, axis=-1, dtype=I32)[..., None]
  start = jnp.broadcast_to(docs.start[:, None, :, None], count.shape)
  width = query_width(block_count)
  row = jnp.concatenate([start, count, blocks], axis=-1)
  row = jnp.pad(row, ((0, 0), (0, 0), (0, 0), (0, width - row.shape[-1])))
  query = row.reshape(batch, heads, padded // block_t, 1, block_t * width)

  # Reads: one (tile, query, interval) per selected block and tile it overlaps; blocks
  # start on the tile grid without documents, so the second tile exists only with them.
  tiles = padded // bs
  i = jnp.arange(padded, dtype=I32)[None, None, :, None, None]
  used = (jnp.arange(top, dtype=I32) < count)[..., None]                  # [B, H, Tp, top, 1]
  first = start[..., None] + blocks[..., None] * bs                          # block's first key
  last = jnp.minimum(first + bs, i + 1)                                      # one past its last
  halves = 1 if segment_ids is None else 2
  tile = first // bs + jnp.arange(halves, dtype=I32)                        # [.., top, halves]
  lo = jnp.maximum(first, tile * bs) - tile * bs
  hi = jnp.minimum(last, tile * bs + bs) - tile * bs
  tile = jnp.where(used & (hi > lo), tile, tiles)                           # tiles: unused
  code = lo + (hi << READ_SHIFT)
  flat = lambda x: jnp.broadcast_to(x, tile.shape).reshape(batch, heads, -1)
  # Stable: each tile's pairs stay in query order (flattened query-major).
  tile, reader, code = jax.lax.sort((flat(tile), flat(i), flat(code)), dimension=-1,
                                    is_stable=True, num_keys=1)
  per_tile = jnp.zeros((batch, heads, tiles + 1), I32).at[
      jnp.arange(batch)[:, None, None], jnp.arange(heads)[None, :, None], tile].add(1)
  offsets = jnp.concatenate([jnp.zeros((batch, heads, 1), I32),
                             jnp.cumsum(per_tile[..., :tiles], axis=-1, dtype=I32)], axis=-1)
  reads = jnp.stack([reader, code], axis=-1).reshape(batch, heads, 1, 1, -1)
  return Tables(query=query.astype(I32), reads=reads.astype(I32),
                offsets=offsets[:, :, None, None, :].astype(I32))
