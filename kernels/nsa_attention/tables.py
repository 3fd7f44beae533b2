"""Plain-JAX integer tables of the selected-block kernels (no gradient).

Query i (document start s_i) reads, for each of its selected in-document blocks b, the
keys [s_i + b * bs, min(s_i + (b + 1) * bs, i + 1)); blocks are selected inside i's
document and never past its current block, so nothing else needs masking. The kernels
read K and V in ALIGNED tiles [a * bs, (a + 1) * bs): a block that starts off the grid
(a document starting mid-tile) spans two tiles, each masked to the block's keys, so
every load is aligned on both lowerings.

- query table, per token: (s_i, n_i, b_0 .. b_{n_i - 1}) with the selected blocks in
  increasing order, padded to a power-of-two width (the forward and dq kernels).
- reads, per (aligned key tile a, query i): the keys of tile a that i reads. Inside one
  document the tile meets at most two consecutive blocks A, A + 1 of i's document, and
  i reads a union of whole blocks, so that set is ONE interval [lo, hi) of the tile:
  packed as lo + hi * 2^16 (offsets in the tile; 0 when i reads none of it).
- key end, per tile: one past the last query that may read it (its last key's document
  end): the dk/dv kernel walks the queries [a * bs, key_end).
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
  reads [B, Hkv, Tp / bs, 1, Tp]: the packed interval of each key tile a query reads;
  key_end [B, 1, 1, 1, Tp / bs]: one past the last query that may read each key tile."""
  query: jax.Array
  reads: jax.Array
  key_end: jax.Array


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

  # Reads: [B, H, Tp (query i), Tp / bs (key tile a)], then tiles first.
  tiles = padded // bs
  i = jnp.arange(padded, dtype=I32)[None, None, :, None]
  tile0 = (jnp.arange(tiles, dtype=I32) * bs)[None, None, None, :]
  s_i = docs.start[:, None, :, None]
  x0 = jnp.maximum(tile0, s_i)
  x1 = jnp.minimum(tile0 + bs, i + 1)
  first = jnp.clip((x0 - s_i) // bs, 0, num_blocks - 1)                     # block A
  split = s_i + (first + 1) * bs                                            # start of A + 1
  gather = lambda b: jnp.take_along_axis(sel, jnp.broadcast_to(b, sel.shape[:3] + (tiles,)),
                                         axis=-1)
  sel_a, sel_b = gather(first), gather(first + 1)
  lo = jnp.where(sel_a, x0, split)
  hi = jnp.where(sel_b, x1, jnp.minimum(split, x1))
  reads = jnp.where((hi > lo) & (x1 > x0), (lo - tile0) + ((hi - tile0) << READ_SHIFT), 0)
  reads = jnp.transpose(reads, (0, 1, 3, 2))[:, :, :, None, :]

  last_key = jnp.arange(tiles, dtype=I32) * bs + bs - 1
  key_end = (docs.end[:, last_key] + 1).reshape(batch, 1, 1, 1, tiles)
  return Tables(query=query.astype(I32), reads=reads.astype(I32), key_end=key_end.astype(I32))
