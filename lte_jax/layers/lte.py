"""LTE attention mixer: sliding window + sinks + CNN-retained tokens (PAPER.md section 3).

Query i of head h sees key j iff j <= i and (j is a sink, i - j <= w, or the
scorer retains j for KV head h: r[j, h] > 0). The full-sequence forward calls
the ``lte_attention`` op (which also applies the straight-through estimator
that trains the scorer); with ``enforce_budget`` it keeps at most b retained
tokens per head, exactly what the constant-size inference cache holds.

Inference cache, per layer (W1 = w + 1 window slots, b retained slots, L = the
scorer's look-ahead, 6 by default):

  'k'      [B, W1 + b, Hkv, D]  keys after RoPE: slots [0, W1) a ring (position
                                t in slot t % W1), slots [W1, W1 + b) retained
  'v'      [B, W1 + b, Hkv, Dv]
  'k_raw'  [B, W1, Hkv, D]      ring keys BEFORE RoPE: the scorer input. They are
                                stored rather than un-roped so that delayed scores
                                are bit-for-bit the CNN's, not a rotation round trip.
  'score'  [B, W1 + b, Hkv] f32 per-slot r (+inf for sinks)
  'ret_pos'[B, b, Hkv] int32    position of each retained token (-1 = empty)
  'fill'   [B, Hkv] int32       retained slots in use
  'pos'    int32 scalar         tokens seen (all rows share it)
  'scored' int32 scalar         tokens [0, scored) have their final score

Nothing depends on ``max_len``. A token's score needs its L future neighbours,
so decoding scores in batches: when the oldest unscored token is L steps from
leaving the ring (pos - scored == W1 - L), the ring is read in time order, the
CNN runs over it and writes the now-complete scores of [scored, pos - L); this
happens every W1 - 2L steps, and every token gets the score of the
full-sequence CNN before it leaves the window (the ring still holds its L past
neighbours then). The token leaving the ring with r > 0 is appended to the
retained segment if there is room, else it replaces the lowest-ranked retained
token (lowest score, the latest on ties) if its own score is strictly higher;
otherwise it is dropped. This streaming rule keeps the top b by (score, then
earlier position), the same set the budgeted full forward keeps.
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
from lte_jax.configs import LTEConfig
from lte_jax.kernels.lte_attention import make_plan, parse_options
from lte_jax.layers.attention import QKVAttention
from lte_jax.layers.common import kernel_plan_options
from lte_jax.layers.lte_scorer import LTEScorer
from lte_jax.layers.rope import apply_rope
from lte_jax.ops.lte_attention import lte_attention
from lte_jax.ops.lte_attention.api import default_implementation
from lte_jax.ops.lte_decode import lte_decode_attention
from lte_jax.ops.lte_decode.reference import ring_positions

_CACHE_KEYS = ("k", "v", "k_raw", "score", "ret_pos", "fill", "pos", "scored")


class LTEAttention(QKVAttention):
  """LTE sparse attention; implements the mixer protocol (see WORKSPACE.md).

  Set ``enforce_budget = True`` (model.set_attributes) so the full-sequence
  forward keeps the inference budget, making it match prefill + decode.
  """

  def __init__(self, cfg: LTEConfig, d_model: int, *, num_layers: int, init_std: float,
               dtype: Any = None, param_dtype: Any = jnp.float32, rngs: nnx.Rngs):
    if not isinstance(cfg, LTEConfig):
      raise ValueError(f"cfg must be a lte_jax.configs.LTEConfig, got {type(cfg).__name__}")
    try:   # a bad field or value fails here, not at the first call (checked as for a GPU)
      make_plan("gpu", True, parse_options(cfg.plan_options))
    except ValueError as err:
      raise ValueError(f"LTEConfig.plan_options={cfg.plan_options!r}: {err}") from None
    self._init_projections(cfg, d_model, num_layers=num_layers, init_std=init_std, dtype=dtype,
                           param_dtype=param_dtype, rngs=rngs)
    self.ring_size = cfg.window_size + 1
    self.enforce_budget = False
    self.scorer = LTEScorer(cfg, rngs=rngs, dtype=dtype, param_dtype=param_dtype)

  @property
  def max_distance(self) -> int:
    """LTEConfig.window_size is already w, the largest i - j of the window."""
    return self.cfg.window_size

  # ---- shared pieces ----

  def _project(self, x: jax.Array):
    """q [B, T, Hq, D], k_raw, v [B, T, Hkv, D]; no RoPE yet (the scorer reads raw keys)."""
    b, t, _ = x.shape
    q = self.q_proj(x).reshape(b, t, self.num_heads, self.head_dim)
    k = self.k_proj(x).reshape(b, t, self.num_kv_heads, self.head_dim)
    v = self.v_proj(x).reshape(b, t, self.num_kv_heads, self.head_dim)
    names = (sh.BATCH, sh.LENGTH, sh.ACT_HEADS, None)
    return sh.constrain(q, names), sh.constrain(k, names), sh.constrain(v, names)

  def _rope(self, x: jax.Array, positions: jax.Array) -> jax.Array:
    return apply_rope(x, positions, self.cfg.rope_theta)

  def _attend(self, q, k, v, r, *, budget, segment_ids=None):
    cfg = self.cfg
    options = kernel_plan_options(cfg.plan_options, cfg.implementation, default_implementation,
                                  parse_options)
    return lte_attention(q, k, v, r, sink_size=cfg.sink_size, window_size=cfg.window_size,
                         budget=budget, segment_ids=segment_ids,
                         implementation=cfg.implementation, plan_options=options)

  # ---- mixer protocol ----

  def __call__(self, x: jax.Array, *, segment_ids: jax.Array | None = None,
               positions: jax.Array | None = None) -> tuple[jax.Array, dict]:
    """x [B, T, D] -> (y [B, T, D], {'retention': r [B, T, Hkv] float32}).

    positions [B, T] int (RoPE); default: in-document positions from
    segment_ids, else 0..T-1. Attention and the scorer never cross a change
    of segment id.
    """
    self._check_x(x)
    b, t, _ = x.shape
    _checks.check_segment_ids(segment_ids, b, t)
    positions = segments.resolve_positions(positions, segment_ids, b, t)
    x = sh.constrain(x, (sh.BATCH, sh.LENGTH, sh.ACT_EMBED))
    q, k_raw, v = self._project(x)
    r = self.scorer(k_raw, v, segment_ids=segment_ids)
    q, k = self._rope(q, positions), self._rope(k_raw, positions)
    q, k, v, r_in = remat.tag(remat.MIXER_INPUTS, q, k, v, r)
    budget = self.cfg.budget if self.enforce_budget else None
    o = self._attend(q, k, v, r_in, budget=budget, segment_ids=segment_ids)
    (o,) = remat.tag(remat.MIXER_OUTPUT, o)
    return self._output(o), {"retention": r}

  def init_cache(self, batch_size: int, max_len: int, dtype: Any = jnp.float32) -> dict:
    """Empty cache (see the module docstring); its size does not depend on ``max_len``."""
    _checks.check_positive_int("batch_size", batch_size)
    _checks.check_positive_int("max_len", max_len)
    bsz, w1, nb = batch_size, self.ring_size, self.cfg.budget
    h, d = self.num_kv_heads, self.head_dim
    return {
        "k": jnp.zeros((bsz, w1 + nb, h, d), dtype),
        "v": jnp.zeros((bsz, w1 + nb, h, d), dtype),
        "k_raw": jnp.zeros((bsz, w1, h, d), dtype),
        "score": jnp.zeros((bsz, w1 + nb, h), jnp.float32),
        "ret_pos": jnp.full((bsz, nb, h), -1, jnp.int32),
        "fill": jnp.zeros((bsz, h), jnp.int32),
        "pos": jnp.zeros((), jnp.int32),
        "scored": jnp.zeros((), jnp.int32),
    }

  def _check_cache(self, cache: Any, batch: int) -> None:
    if not isinstance(cache, dict) or set(cache) != set(_CACHE_KEYS):
      got = sorted(cache) if isinstance(cache, dict) else type(cache).__name__
      raise ValueError(f"cache must be the dict made by init_cache with keys "
                       f"{sorted(_CACHE_KEYS)}, got {got}")
    w1, nb, h, d = self.ring_size, self.cfg.budget, self.num_kv_heads, self.head_dim
    layout = "[batch, slots, kv_heads, head_dim]"
    _checks.check_shape("cache['k']", cache["k"], (batch, w1 + nb, h, d), layout)
    _checks.check_shape("cache['v']", cache["v"], (batch, w1 + nb, h, d), layout)
    _checks.check_shape("cache['k_raw']", cache["k_raw"], (batch, w1, h, d), layout)
    _checks.check_shape("cache['score']", cache["score"], (batch, w1 + nb, h),
                        "[batch, slots, kv_heads]")
    _checks.check_shape("cache['ret_pos']", cache["ret_pos"], (batch, nb, h),
                        "[batch, budget, kv_heads]")
    _checks.check_shape("cache['fill']", cache["fill"], (batch, h), "[batch, kv_heads]")
    _checks.check_shape("cache['pos']", cache["pos"], (), "scalar")
    _checks.check_shape("cache['scored']", cache["scored"], (), "scalar")

  def prefill(self, x: jax.Array, cache: dict) -> tuple[jax.Array, dict]:
    """Prompt x [B, T, D] into a FRESH cache, one document per row.

    Returns (y [B, T, D], cache with pos = T). The prompt attends with the
    budget enforced. The cache's previous contents are ignored (only its
    shapes and dtypes are used).
    """
    self._check_x(x)
    self._check_cache(cache, x.shape[0])
    bsz, t, _ = x.shape
    cfg, w1, nb = self.cfg, self.ring_size, self.cfg.budget
    positions = segments.default_positions(bsz, t)
    q, k_raw, v = self._project(x)
    r = self.scorer(k_raw, v)
    q, k = self._rope(q, positions), self._rope(k_raw, positions)
    o = self._attend(q, k, v, r, budget=nb)

    time = jnp.arange(t, dtype=jnp.int32)
    score = jnp.where(time[None, :, None] < cfg.sink_size, jnp.inf, r)  # [B, T, H]
    kdt, vdt = cache["k"].dtype, cache["v"].dtype

    # Retained segment: the top-b tokens already out of the window, by score
    # then earlier position, laid out in time order.
    n = max(t, nb)
    eligible = (time < t - w1)[None, :, None] & (score > 0)
    rank_key = jnp.where(eligible, -score, jnp.inf)
    rank_key = jnp.pad(rank_key, ((0, 0), (0, n - t), (0, 0)), constant_values=jnp.inf)
    idx = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32)[None, :, None], rank_key.shape)
    top_key, top_idx = jax.lax.sort((rank_key, idx), dimension=1, num_keys=2)
    top_valid = top_key[:, :nb] < jnp.inf
    ordered = jnp.sort(jnp.where(top_valid, top_idx[:, :nb], n), axis=1)  # [B, b, H]
    ret_valid = ordered < n
    ret_idx = jnp.minimum(ordered, t - 1)

    def gather(a, index, valid):  # a [B, T, H, ...], index/valid [B, S, H]
      ix = index.reshape(index.shape + (1,) * (a.ndim - 3))
      out = jnp.take_along_axis(a, jnp.broadcast_to(ix, index.shape + a.shape[3:]), axis=1)
      return jnp.where(valid.reshape(ix.shape), out, jnp.zeros((), a.dtype))

    # Ring: slot i holds the last position t' < T with t' % W1 == i.
    ring_pos = ring_positions(jnp.asarray(t, jnp.int32), w1)
    ring_idx = jnp.broadcast_to(jnp.maximum(ring_pos, 0)[None, :, None],
                                (bsz, w1, self.num_kv_heads))
    ring_valid = jnp.broadcast_to((ring_pos >= 0)[None, :, None], ring_idx.shape)

    new_cache = {
        "k": jnp.concatenate([gather(k, ring_idx, ring_valid), gather(k, ret_idx, ret_valid)],
                             axis=1).astype(kdt),
        "v": jnp.concatenate([gather(v, ring_idx, ring_valid), gather(v, ret_idx, ret_valid)],
                             axis=1).astype(vdt),
        "k_raw": gather(k_raw, ring_idx, ring_valid).astype(cache["k_raw"].dtype),
        "score": jnp.concatenate([gather(score, ring_idx, ring_valid),
                                  gather(score, ret_idx, ret_valid)], axis=1),
        "ret_pos": jnp.where(ret_valid, ordered, -1).astype(jnp.int32),
        "fill": jnp.sum(ret_valid, axis=1).astype(jnp.int32),
        "pos": jnp.asarray(t, jnp.int32),
        # The last L prompt tokens were scored without their right context.
        "scored": jnp.asarray(max(t - cfg.lookahead, 0), jnp.int32),
    }
    return self._output(o), new_cache

  def _rescore(self, cache: dict) -> dict:
    """Run the scorer over the ring in time order; finalise the scores of [scored, pos - L)."""
    cfg, w1 = self.cfg, self.ring_size
    pos = cache["pos"]
    times = pos - w1 + jnp.arange(w1, dtype=jnp.int32)  # ring contents, oldest first
    slots = jnp.mod(times, w1)
    valid = times >= 0
    k_seq = jnp.take(cache["k_raw"], slots, axis=1)
    v_seq = jnp.take(cache["v"][:, :w1], slots, axis=1)
    # Empty slots become padding (id 0) before the prompt's first token: the
    # CNN then zero-pads there, as the full forward does at position 0.
    seg = jnp.broadcast_to(valid.astype(jnp.int32)[None, :], k_seq.shape[:2])
    r = self.scorer(k_seq, v_seq, segment_ids=seg)  # [B, W1, H]
    r = jnp.where((times < cfg.sink_size)[None, :, None], jnp.inf, r)
    final = valid & (times >= cache["scored"]) & (times < pos - cfg.lookahead)
    old = jnp.take(cache["score"], slots, axis=1)
    new = jnp.where(final[None, :, None], r, old)
    score = cache["score"].at[:, slots].set(new)
    return dict(cache, score=score, scored=jnp.maximum(cache["scored"], pos - cfg.lookahead))

  def decode(self, x: jax.Array, cache: dict) -> tuple[jax.Array, dict]:
    """One token x [B, 1, D] at position cache['pos'] -> (y [B, 1, D], cache). Jit-able."""
    positions = self._decode_positions(x, cache)
    bsz = x.shape[0]
    cfg, w1, nb = self.cfg, self.ring_size, self.cfg.budget
    pos = cache["pos"]
    q, k_raw, v = self._project(x)
    q, k = self._rope(q, positions), self._rope(k_raw, positions)

    # 1. Delayed batched scoring, before the oldest unscored token can leave.
    due = pos - cache["scored"] >= w1 - cfg.lookahead
    cache = nnx.cond(due, lambda m, c: m._rescore(c), lambda m, c: c, self, cache)

    # 2. Evict the oldest ring token (position pos - W1) into the retained segment.
    slot = jnp.mod(pos, w1)
    leaving = pos >= w1
    ring_k = cache["k"][:, :w1]
    ring_v = cache["v"][:, :w1]
    ring_score = cache["score"][:, :w1]
    ret_k, ret_v = cache["k"][:, w1:], cache["v"][:, w1:]
    ret_score, ret_pos, fill = cache["score"][:, w1:], cache["ret_pos"], cache["fill"]
    out_k = jax.lax.dynamic_index_in_dim(ring_k, slot, axis=1, keepdims=True)  # [B, 1, H, D]
    out_v = jax.lax.dynamic_index_in_dim(ring_v, slot, axis=1, keepdims=True)
    out_score = jax.lax.dynamic_index_in_dim(ring_score, slot, axis=1, keepdims=False)  # [B, H]
    has_room = fill < nb
    min_score = jnp.min(ret_score, axis=1)  # [B, H]; only used when full
    victim = jnp.argmax(jnp.where(ret_score == min_score[:, None], ret_pos, -1), axis=1)
    target = jnp.where(has_room, fill, victim)
    write = leaving & (out_score > 0) & (has_room | (out_score > min_score))
    hit = (jnp.arange(nb)[None, :, None] == target[:, None, :]) & write[:, None, :]  # [B, b, H]
    ret_k = jnp.where(hit[..., None], out_k, ret_k)
    ret_v = jnp.where(hit[..., None], out_v, ret_v)
    ret_score = jnp.where(hit, out_score[:, None], ret_score)
    ret_pos = jnp.where(hit, pos - w1, ret_pos)
    fill = fill + (write & has_room).astype(jnp.int32)

    # 3. The new token takes the freed ring slot.
    kc, vc = k.astype(ring_k.dtype), v.astype(ring_v.dtype)
    new_score = jnp.where(pos < cfg.sink_size, jnp.inf, 0.0)
    ring_k = jax.lax.dynamic_update_slice_in_dim(ring_k, kc, slot, axis=1)
    ring_v = jax.lax.dynamic_update_slice_in_dim(ring_v, vc, slot, axis=1)
    k_raw_ring = jax.lax.dynamic_update_slice_in_dim(
        cache["k_raw"], k_raw.astype(cache["k_raw"].dtype), slot, axis=1)
    ring_score = jax.lax.dynamic_update_slice_in_dim(
        ring_score, jnp.full((bsz, 1, self.num_kv_heads), new_score, jnp.float32), slot, axis=1)
    new_cache = {
        "k": jnp.concatenate([ring_k, ret_k], axis=1),
        "v": jnp.concatenate([ring_v, ret_v], axis=1),
        "k_raw": k_raw_ring,
        "score": jnp.concatenate([ring_score, ret_score], axis=1),
        "ret_pos": ret_pos,
        "fill": fill,
        "pos": pos + 1,
        "scored": cache["scored"],
    }

    # 4. Attend over the ring (the window incl. this token) and the filled retained slots
    #    (cfg.implementation 'pallas': the split-K decode kernel).
    o = lte_decode_attention(q, new_cache["k"], new_cache["v"], fill, pos + 1, ring_size=w1,
                             implementation=cfg.implementation)
    return self._output(o), new_cache
