"""Softmax attention mixer: GQA + RoPE, full causal or sliding window.

``AttentionConfig.window_size`` W is the reference convention (W visible tokens
including the current one); the attention op takes the max distance W - 1.

Caches (keys stored after RoPE):
- full:  {'k', 'v': [B, max_len, Hkv, D], 'pos'}; slot j holds position j.
- SWA:   {'k', 'v': [B, W, Hkv, D], 'slot_pos': [W] int32 (-1 = empty), 'pos'};
         position p lives in slot p % W, so the cache does not grow with max_len.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from lte_jax import _checks
from lte_jax import remat
from lte_jax import segments
from lte_jax import sharding as sh
from lte_jax.configs import AttentionConfig
from lte_jax.layers.common import linear, output_std
from lte_jax.layers.rope import apply_rope
from lte_jax.ops.attention import attention, masked_attention


def check_cache_room(pos: jax.Array, slots: int) -> None:
  """Raise when a concrete cache position has no slot left (decoding past max_len).

  Traced under jit it cannot be checked without a host sync: the decoders then return
  NaN for that step instead.
  """
  _checks.check_values("cache['pos']", pos, lambda p: p < slots,
                       f"< max_len={slots} (the cache is full: make it with a larger "
                       "max_len)")


class QKVAttention(nnx.Module):
  """What the RoPE softmax mixers share (Attention, NSAAttention, LTEAttention): q/k/v/o
  projections with GQA, the window convention, input checks and the output projection."""

  def _init_projections(self, cfg: Any, d_model: int, *, num_layers: int, init_std: float,
                        dtype: Any, param_dtype: Any, rngs: nnx.Rngs) -> dict:
    """Creates q_proj, k_proj, v_proj, o_proj; returns the linear() keywords for more."""
    _checks.check_positive_int("d_model", d_model)
    _checks.check_positive_int("num_layers", num_layers)
    self.cfg, self.d_model, self.dtype = cfg, d_model, dtype
    hq, hkv, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    if d % 2:
      raise ValueError(f"cfg.head_dim must be even for RoPE, got {d}")
    self.num_heads, self.num_kv_heads, self.head_dim = hq, hkv, d
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.q_proj = linear(d_model, hq * d, names=(sh.EMBED, sh.HEADS), std=init_std, **kw)
    self.k_proj = linear(d_model, hkv * d, names=(sh.EMBED, sh.KV_HEADS), std=init_std, **kw)
    self.v_proj = linear(d_model, hkv * d, names=(sh.EMBED, sh.KV_HEADS), std=init_std, **kw)
    self.o_proj = linear(hq * d, d_model, names=(sh.HEADS, sh.EMBED),
                         std=output_std(init_std, num_layers), **kw)
    return kw

  @property
  def max_distance(self) -> int | None:
    """The op's window: the largest i - j a query may attend to (None: no window)."""
    return None if self.cfg.window_size is None else self.cfg.window_size - 1

  def _check_x(self, x: jax.Array, name: str = "x") -> None:
    _checks.check_shape(name, x, (None, None, self.d_model), "[batch, time, d_model]")
    _checks.check_float_dtype(name, x)

  def _project_qkv(self, x: jax.Array, positions: jax.Array):
    """q [B, T, Hq, D], k, v [B, T, Hkv, D]; RoPE applied to q and k."""
    b, t, _ = x.shape
    q = self.q_proj(x).reshape(b, t, self.num_heads, self.head_dim)
    k = self.k_proj(x).reshape(b, t, self.num_kv_heads, self.head_dim)
    v = self.v_proj(x).reshape(b, t, self.num_kv_heads, self.head_dim)
    q = apply_rope(q, positions, self.cfg.rope_theta)
    k = apply_rope(k, positions, self.cfg.rope_theta)
    names = (sh.BATCH, sh.LENGTH, sh.ACT_HEADS, None)
    return sh.constrain(q, names), sh.constrain(k, names), sh.constrain(v, names)

  def _output(self, o: jax.Array) -> jax.Array:
    y = self.o_proj(o.reshape(*o.shape[:2], -1).astype(self.dtype or o.dtype))
    return sh.constrain(y, (sh.BATCH, sh.LENGTH, sh.ACT_EMBED))

  def _decode_positions(self, x: jax.Array, cache: dict) -> jax.Array:
    """Checks one decode token x [B, 1, D] and the cache (the subclass's _check_cache);
    returns the token's positions [B, 1] int32 (all rows at cache['pos'])."""
    _checks.check_shape("x", x, (None, 1, self.d_model), "[batch, 1, d_model]")
    _checks.check_float_dtype("x", x)
    self._check_cache(cache, x.shape[0])
    return jnp.broadcast_to(cache["pos"], (x.shape[0], 1)).astype(jnp.int32)


class Attention(QKVAttention):
  """Causal softmax attention (full or sliding window); implements the mixer protocol."""

  def __init__(self, cfg: AttentionConfig, d_model: int, *, num_layers: int, init_std: float,
               dtype: Any = None, param_dtype: Any = jnp.float32, rngs: nnx.Rngs):
    if not isinstance(cfg, AttentionConfig):
      raise ValueError(f"cfg must be a lte_jax.configs.AttentionConfig, got "
                       f"{type(cfg).__name__}")
    self._init_projections(cfg, d_model, num_layers=num_layers, init_std=init_std, dtype=dtype,
                           param_dtype=param_dtype, rngs=rngs)

  @property
  def window_size(self) -> int | None:
    """Visible tokens per query including itself (None: full causal)."""
    return self.cfg.window_size

  def _project(self, x: jax.Array, positions: jax.Array):
    return self._project_qkv(x, positions)

  # ---- mixer protocol ----

  def __call__(self, x: jax.Array, *, segment_ids: jax.Array | None = None,
               positions: jax.Array | None = None) -> tuple[jax.Array, dict]:
    """x [B, T, D] -> (y [B, T, D], {}).

    positions [B, T] int (RoPE); default: in-document positions from
    segment_ids, else 0..T-1. Attention never crosses a change of segment id.
    """
    self._check_x(x)
    b, t, _ = x.shape
    _checks.check_segment_ids(segment_ids, b, t)
    positions = segments.resolve_positions(positions, segment_ids, b, t)
    x = sh.constrain(x, (sh.BATCH, sh.LENGTH, sh.ACT_EMBED))
    q, k, v = remat.tag(remat.MIXER_INPUTS, *self._project(x, positions))
    o = attention(q, k, v, window_size=self.max_distance, segment_ids=segment_ids,
                  implementation=self.cfg.implementation)
    (o,) = remat.tag(remat.MIXER_OUTPUT, o)
    return self._output(o), {}

  def cache_len(self, max_len: int) -> int:
    """KV slots a cache holds: max_len for full attention, W for a sliding window."""
    return max_len if self.window_size is None else self.window_size

  def init_cache(self, batch_size: int, max_len: int, dtype: Any = jnp.float32) -> dict:
    """Empty cache for up to ``max_len`` tokens (prompt + generated).

    Full attention preallocates max_len slots: decoding past max_len raises where
    cache['pos'] is concrete; under jit (traced) it gives NaN outputs (and logits),
    so size max_len to the most tokens ever seen. A sliding-window cache holds W
    slots whatever max_len is.
    """
    _checks.check_positive_int("batch_size", batch_size)
    _checks.check_positive_int("max_len", max_len)
    shape = (batch_size, self.cache_len(max_len), self.num_kv_heads, self.head_dim)
    cache = {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype),
             "pos": jnp.zeros((), jnp.int32)}
    if self.window_size is not None:
      cache["slot_pos"] = jnp.full((self.window_size,), -1, jnp.int32)
    return cache

  def _check_cache(self, cache: Any, batch: int) -> None:
    keys = {"k", "v", "pos"} | ({"slot_pos"} if self.window_size is not None else set())
    if not isinstance(cache, dict) or set(cache) != keys:
      raise ValueError(f"cache must be the dict made by init_cache with keys {sorted(keys)}, "
                       f"got {sorted(cache) if isinstance(cache, dict) else type(cache).__name__}")
    slots = None if self.window_size is None else self.window_size
    layout = "[batch, slots, kv_heads, head_dim]"
    _checks.check_shape("cache['k']", cache["k"],
                        (batch, slots, self.num_kv_heads, self.head_dim), layout)
    _checks.check_shape("cache['v']", cache["v"], cache["k"].shape, layout)

  def prefill(self, x: jax.Array, cache: dict) -> tuple[jax.Array, dict]:
    """Prompt x [B, T, D] into a FRESH cache (pos 0), one document per row.

    Returns (y [B, T, D], cache with pos = T). Full attention needs
    T <= max_len (checked here); a sliding window keeps the last W tokens.
    """
    self._check_x(x)
    self._check_cache(cache, x.shape[0])
    b, t, _ = x.shape
    if self.window_size is None and t > cache["k"].shape[1]:
      raise ValueError(f"x has {t} tokens but the cache holds max_len={cache['k'].shape[1]}; "
                       "make the cache with a larger max_len")
    q, k, v = self._project(x, segments.default_positions(b, t))
    o = attention(q, k, v, window_size=self.max_distance, implementation=self.cfg.implementation)
    kc, vc = k.astype(cache["k"].dtype), v.astype(cache["v"].dtype)
    new_cache = dict(cache, pos=jnp.asarray(t, jnp.int32))
    if self.window_size is None:
      new_cache["k"] = cache["k"].at[:, :t].set(kc)
      new_cache["v"] = cache["v"].at[:, :t].set(vc)
    else:
      w = self.window_size
      kept = jnp.arange(max(0, t - w), t, dtype=jnp.int32)  # last W positions
      slots = kept % w
      new_cache["k"] = cache["k"].at[:, slots].set(kc[:, kept])
      new_cache["v"] = cache["v"].at[:, slots].set(vc[:, kept])
      new_cache["slot_pos"] = cache["slot_pos"].at[slots].set(kept)
    return self._output(o), new_cache

  def decode(self, x: jax.Array, cache: dict) -> tuple[jax.Array, dict]:
    """One token x [B, 1, D] at position cache['pos'] -> (y [B, 1, D], cache).

    A full cache holds max_len tokens: past them this raises where the position is
    concrete and returns y = NaN under jit (the last slot is overwritten).
    """
    positions = self._decode_positions(x, cache)
    b, pos = x.shape[0], cache["pos"]
    if self.window_size is None:
      check_cache_room(pos, cache["k"].shape[1])
    q, k, v = self._project(x, positions)
    kc, vc = k.astype(cache["k"].dtype), v.astype(cache["v"].dtype)
    num_slots = cache["k"].shape[1]
    new_cache = dict(cache, pos=pos + 1)
    if self.window_size is None:
      slot = pos
      slot_pos = jnp.arange(num_slots, dtype=jnp.int32)
      visible = slot_pos <= pos
    else:
      slot = pos % self.window_size
      slot_pos = cache["slot_pos"].at[slot].set(pos)
      new_cache["slot_pos"] = slot_pos
      visible = (slot_pos >= 0) & (pos - slot_pos <= self.window_size - 1)
    new_cache["k"] = jax.lax.dynamic_update_slice_in_dim(cache["k"], kc, slot, axis=1)
    new_cache["v"] = jax.lax.dynamic_update_slice_in_dim(cache["v"], vc, slot, axis=1)
    mask = jnp.broadcast_to(visible, (b, 1, 1, num_slots))
    # The cache may be kept in another dtype than the activations.
    o = masked_attention(q, new_cache["k"].astype(q.dtype), new_cache["v"].astype(q.dtype), mask)
    if self.window_size is None:
      o = jnp.where(pos < num_slots, o, jnp.nan)
    return self._output(o), new_cache
