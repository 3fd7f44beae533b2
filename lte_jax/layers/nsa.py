"""Native Sparse Attention mixer of laNSA (PAPER.md section 4): GQA + RoPE + three gated branches.

One set of q / k / v projections feeds the compression, selection and sliding-window
branches of ``nsa_attention``; g_proj (d -> 3 x Hq, no bias, laid out [Hq, 3] as the
reference) gives a sigmoid gate per branch per query head. ``NSAConfig.window_size`` is
the reference convention (visible tokens including the current one); the op takes the
largest distance, window_size - 1.

Inference cache (keys stored after RoPE; L = max_len rounded up to a whole block):
  'k', 'v'          [B, L, Hkv, D]   every token so far (position p in slot p)
  'k_cmp', 'v_cmp'  [B, L / block_size, Hkv, D]  the mean of each block complete so far,
                                    written when its last token arrives
  'pos'             int32 scalar     tokens seen (all rows share it)
Decoding past max_len raises where the position is concrete; under jit (traced) the
step's output is NaN (nsa_decode's rule for a position outside the cache).
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from lte_jax import _checks
from lte_jax import segments
from lte_jax import sharding as sh
from lte_jax.configs import NSAConfig
from lte_jax.layers.attention import QKVAttention, check_cache_room
from lte_jax.layers.common import linear
from lte_jax.ops.nsa_attention import nsa_attention, nsa_decode

_CACHE_KEYS = ("k", "v", "k_cmp", "v_cmp", "pos")


def block_means(x: jax.Array, block_size: int) -> jax.Array:
  """x [B, N * block_size, H, D] -> [B, N, H, D]: fp32 mean of each block, in x.dtype
  (the same rounding as the op's compression)."""
  b, t, h, d = x.shape
  blocks = x.astype(jnp.float32).reshape(b, t // block_size, block_size, h, d)
  return jnp.mean(blocks, axis=2).astype(x.dtype)


class NSAAttention(QKVAttention):
  """Native Sparse Attention; implements the mixer protocol (see WORKSPACE.md)."""

  def __init__(self, cfg: NSAConfig, d_model: int, *, num_layers: int, init_std: float,
               dtype: Any = None, param_dtype: Any = jnp.float32, rngs: nnx.Rngs):
    if not isinstance(cfg, NSAConfig):
      raise ValueError(f"cfg must be a lte_jax.configs.NSAConfig, got {type(cfg).__name__}")
    kw = self._init_projections(cfg, d_model, num_layers=num_layers, init_std=init_std,
                                dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.g_proj = linear(d_model, cfg.num_heads * 3, names=(sh.EMBED, sh.HEADS), std=init_std,
                         **kw)

  def _op_kwargs(self) -> dict:
    return dict(block_size=self.cfg.block_size, block_count=self.cfg.block_count,
                window_size=self.max_distance)

  def _project(self, x: jax.Array, positions: jax.Array):
    """q [B, T, Hq, D], k, v [B, T, Hkv, D] (RoPE on q, k), gates [B, T, Hq, 3] float32."""
    b, t, _ = x.shape
    gates = jax.nn.sigmoid(self.g_proj(x).astype(jnp.float32)).reshape(b, t, self.num_heads, 3)
    return (*self._project_qkv(x, positions), gates)

  # ---- mixer protocol ----

  def __call__(self, x: jax.Array, *, segment_ids: jax.Array | None = None,
               positions: jax.Array | None = None) -> tuple[jax.Array, dict]:
    """x [B, T, D] -> (y [B, T, D], {}).

    positions [B, T] int (RoPE); default: in-document positions from segment_ids,
    else 0..T-1. Blocks and all three branches stay inside a document.
    """
    self._check_x(x)
    b, t, _ = x.shape
    _checks.check_segment_ids(segment_ids, b, t)
    positions = segments.resolve_positions(positions, segment_ids, b, t)
    x = sh.constrain(x, (sh.BATCH, sh.LENGTH, sh.ACT_EMBED))
    q, k, v, gates = self._project(x, positions)
    o = nsa_attention(q, k, v, gates, segment_ids=segment_ids,
                      implementation=self.cfg.implementation, **self._op_kwargs())
    return self._output(o), {}

  def cache_len(self, max_len: int) -> int:
    """KV slots a cache holds: max_len rounded up to a multiple of block_size."""
    bs = self.cfg.block_size
    return -(-max_len // bs) * bs

  def init_cache(self, batch_size: int, max_len: int, dtype: Any = jnp.float32) -> dict:
    """Empty cache for up to ``max_len`` tokens (prompt + generated)."""
    _checks.check_positive_int("batch_size", batch_size)
    _checks.check_positive_int("max_len", max_len)
    slots = self.cache_len(max_len)
    kv = (batch_size, slots, self.num_kv_heads, self.head_dim)
    cmp = (batch_size, slots // self.cfg.block_size, self.num_kv_heads, self.head_dim)
    return {"k": jnp.zeros(kv, dtype), "v": jnp.zeros(kv, dtype),
            "k_cmp": jnp.zeros(cmp, dtype), "v_cmp": jnp.zeros(cmp, dtype),
            "pos": jnp.zeros((), jnp.int32)}

  def _check_cache(self, cache: Any, batch: int) -> None:
    if not isinstance(cache, dict) or set(cache) != set(_CACHE_KEYS):
      got = sorted(cache) if isinstance(cache, dict) else type(cache).__name__
      raise ValueError(f"cache must be the dict made by init_cache with keys "
                       f"{sorted(_CACHE_KEYS)}, got {got}")
    h, d, bs = self.num_kv_heads, self.head_dim, self.cfg.block_size
    layout = "[batch, slots, kv_heads, head_dim]"
    _checks.check_shape("cache['k']", cache["k"], (batch, None, h, d), layout)
    slots = cache["k"].shape[1]
    if slots % bs:
      raise ValueError(f"cache['k'] must hold a multiple of block_size={bs} slots, got {slots}")
    _checks.check_shape("cache['v']", cache["v"], (batch, slots, h, d), layout)
    for name in ("k_cmp", "v_cmp"):
      _checks.check_shape(f"cache['{name}']", cache[name], (batch, slots // bs, h, d),
                          "[batch, slots / block_size, kv_heads, head_dim]")
    _checks.check_shape("cache['pos']", cache["pos"], (), "scalar")

  def prefill(self, x: jax.Array, cache: dict) -> tuple[jax.Array, dict]:
    """Prompt x [B, T, D] into a FRESH cache (pos 0), one document per row.

    Returns (y [B, T, D], cache with pos = T); T <= the cache's max_len (checked).
    """
    self._check_x(x)
    self._check_cache(cache, x.shape[0])
    b, t, _ = x.shape
    slots, bs = cache["k"].shape[1], self.cfg.block_size
    if t > slots:
      raise ValueError(f"x has {t} tokens but the cache holds {slots}; make the cache with a "
                       "larger max_len")
    q, k, v, gates = self._project(x, segments.default_positions(b, t))
    o = nsa_attention(q, k, v, gates, implementation=self.cfg.implementation,
                      **self._op_kwargs())
    kc, vc = k.astype(cache["k"].dtype), v.astype(cache["v"].dtype)
    full = (t // bs) * bs  # tokens of the complete blocks
    new_cache = dict(cache, pos=jnp.asarray(t, jnp.int32),
                     k=cache["k"].at[:, :t].set(kc), v=cache["v"].at[:, :t].set(vc))
    if full:
      new_cache["k_cmp"] = cache["k_cmp"].at[:, :full // bs].set(block_means(kc[:, :full], bs))
      new_cache["v_cmp"] = cache["v_cmp"].at[:, :full // bs].set(block_means(vc[:, :full], bs))
    return self._output(o), new_cache

  def decode(self, x: jax.Array, cache: dict) -> tuple[jax.Array, dict]:
    """One token x [B, 1, D] at position cache['pos'] -> (y [B, 1, D], cache)."""
    positions = self._decode_positions(x, cache)
    pos, bs = cache["pos"], self.cfg.block_size
    check_cache_room(pos, cache["k"].shape[1])
    q, k, v, gates = self._project(x, positions)
    k_all = jax.lax.dynamic_update_slice_in_dim(cache["k"], k.astype(cache["k"].dtype), pos, 1)
    v_all = jax.lax.dynamic_update_slice_in_dim(cache["v"], v.astype(cache["v"].dtype), pos, 1)
    # The token that completes its block writes the block's mean into the compressed cache.
    block = pos // bs
    completes = (pos + 1) % bs == 0

    def with_block(cmp, full):
      mean = block_means(jax.lax.dynamic_slice_in_dim(full, block * bs, bs, axis=1), bs)
      return jnp.where(completes, jax.lax.dynamic_update_slice_in_dim(cmp, mean, block, 1), cmp)

    k_cmp, v_cmp = with_block(cache["k_cmp"], k_all), with_block(cache["v_cmp"], v_all)
    # The cache may be kept in another dtype than the activations.
    o = nsa_decode(q, k_all.astype(q.dtype), v_all.astype(q.dtype), k_cmp.astype(q.dtype),
                   v_cmp.astype(q.dtype), gates, pos, **self._op_kwargs())
    new_cache = dict(k=k_all, v=v_all, k_cmp=k_cmp, v_cmp=v_cmp, pos=pos + 1)
    return self._output(o), new_cache
