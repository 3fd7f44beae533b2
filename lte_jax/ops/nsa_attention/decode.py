"""One NSA decode step against a KV cache and the cache of compressed blocks.

A single query at ``position`` reads: the compressed blocks complete by then, the
tokens of its selected blocks (gathered, so a step costs O(block_count * block_size),
not O(position)), and its sliding window (a slice of the cache). The selection rule is
the one of ``xla.select_blocks``: blocks 0, c - 1, c, then the largest compression
probabilities summed over the KV group, the earlier block on ties.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

_HI = jax.lax.Precision.HIGHEST


def _attend(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, scale: float):
  """q [B, Hkv, G, D], k [B, Hkv, S, D], v [B, Hkv, S, Dv], mask [B or 1, Hkv or 1, S]
  -> (o [B, Hkv, G, Dv] f32, p [B, Hkv, G, S]); a row with no visible key gives zeros."""
  logits = jnp.einsum("bhgd,bhsd->bhgs", q, k.astype(jnp.float32), precision=_HI) * scale
  mask = mask[:, :, None, :]
  logits = jnp.where(mask, logits, -jnp.inf)
  row_max = jnp.max(logits, axis=-1, keepdims=True)
  p = jnp.exp(logits - jnp.where(jnp.isneginf(row_max), 0.0, row_max))
  denom = jnp.sum(p, axis=-1, keepdims=True)
  p = p / jnp.where(denom > 0, denom, 1.0)
  return jnp.einsum("bhgs,bhsd->bhgd", p, v.astype(jnp.float32), precision=_HI), p


def _heads_first(x: jax.Array) -> jax.Array:
  return jnp.swapaxes(x, 1, 2)  # [B, S, H, D] -> [B, H, S, D]


def select_decode_blocks(qg: jax.Array, k_cmp: jax.Array, v_cmp: jax.Array,
                         position: jax.Array, *, block_size: int, block_count: int,
                         scale: float) -> tuple[jax.Array, jax.Array]:
  """The compression branch and the selection of one decode step (shared by the 'xla' and
  'pallas' steps).

  qg [B, Hkv, G, D] float32 (the query's heads grouped by KV head); k_cmp [B, C, Hkv, D],
  v_cmp [B, C, Hkv, Dv] block means (C = L / block_size); position: int32 scalar
  -> (o_cmp [B, Hkv, G, Dv] float32, selected [B, Hkv, min(block_count, C)] int32: the
  chosen blocks, forced ones first, then by decreasing importance (the earlier block on
  ties); -1 marks an unused slot, while fewer than block_count blocks exist).
  """
  num_blocks = k_cmp.shape[1]
  blocks = jnp.arange(num_blocks)
  cur = position // block_size
  complete = ((blocks + 1) * block_size <= position + 1)[None, None, :]
  o_cmp, p = _attend(qg, _heads_first(k_cmp), _heads_first(v_cmp), complete, scale)
  importance = jnp.sum(jax.lax.stop_gradient(p), axis=2)                   # [B, Hkv, C]
  forced = ((blocks == 0) | (blocks == cur - 1) | (blocks == cur)) & (blocks <= cur)
  free = (blocks >= 1) & (blocks <= cur - 2)
  score = jnp.where(forced, jnp.inf, jnp.where(free, importance, -jnp.inf))
  values, chosen = jax.lax.top_k(score, min(block_count, num_blocks))      # [B, Hkv, top]
  return o_cmp, jnp.where(values > -jnp.inf, chosen, -1).astype(jnp.int32)


def nsa_decode_xla(q: jax.Array, k_cache: jax.Array, v_cache: jax.Array, k_cmp: jax.Array,
                   v_cmp: jax.Array, gates: jax.Array, position: jax.Array, *, block_size: int,
                   block_count: int, window_size: int | None, scale: float) -> jax.Array:
  """q [B, 1, Hq, D]; k_cache [B, L, Hkv, D], v_cache [B, L, Hkv, Dv] holding positions
  0..position (L a multiple of block_size); k_cmp [B, L / block_size, Hkv, D], v_cmp: block
  means, valid for the blocks complete by ``position``; gates [B, 1, Hq, 3];
  position: int32 scalar -> o [B, 1, Hq, Dv] in v_cache.dtype (NaN for a position
  outside [0, L))."""
  batch, _, num_heads, head_dim = q.shape
  cache_len, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
  group = num_heads // num_kv_heads
  num_blocks = cache_len // block_size
  qg = q[:, 0].astype(jnp.float32).reshape(batch, num_kv_heads, group, head_dim)
  g = gates[:, 0].astype(jnp.float32).reshape(batch, num_kv_heads, group, 3)
  o_cmp, selected = select_decode_blocks(qg, k_cmp, v_cmp, position, block_size=block_size,
                                         block_count=block_count, scale=scale)
  top = selected.shape[-1]
  chosen = jnp.maximum(selected, 0)
  per_block = jnp.moveaxis(k_cache.reshape(batch, num_blocks, block_size, num_kv_heads, -1),
                           3, 1)                                           # [B, Hkv, C, bs, D]
  per_block_v = jnp.moveaxis(v_cache.reshape(batch, num_blocks, block_size, num_kv_heads, -1),
                             3, 1)
  k_sel = jnp.take_along_axis(per_block, chosen[..., None, None], axis=2)
  v_sel = jnp.take_along_axis(per_block_v, chosen[..., None, None], axis=2)
  tokens = chosen[..., None] * block_size + jnp.arange(block_size)         # [B, Hkv, top, bs]
  sel_mask = (selected >= 0)[..., None] & (tokens <= position)
  o_slc, _ = _attend(qg, k_sel.reshape(batch, num_kv_heads, top * block_size, head_dim),
                     v_sel.reshape(batch, num_kv_heads, top * block_size, -1),
                     sel_mask.reshape(batch, num_kv_heads, -1), scale)
  o = g[..., 0:1] * o_cmp + g[..., 1:2] * o_slc

  if window_size is not None:
    span = min(cache_len, window_size + 1)
    start = jnp.clip(position - window_size, 0, cache_len - span)
    k_win = jax.lax.dynamic_slice_in_dim(k_cache, start, span, axis=1)
    v_win = jax.lax.dynamic_slice_in_dim(v_cache, start, span, axis=1)
    tok = start + jnp.arange(span)
    win_mask = ((tok <= position) & (position - tok <= window_size))[None, None, :]
    o_swa, _ = _attend(qg, _heads_first(k_win), _heads_first(v_win), win_mask, scale)
    o = o + g[..., 2:3] * o_swa
  # Past the cache the slices above clamp to its end: mark the answer undefined.
  o = jnp.where((position >= 0) & (position < cache_len), o, jnp.nan)
  return o.reshape(batch, 1, num_heads, -1).astype(v_cache.dtype)
