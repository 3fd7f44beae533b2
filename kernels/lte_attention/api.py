"""LTE and sliding-window attention on Pallas kernels: glue and the custom VJP.

Pipeline (modules in brackets):
  plain JAX [sets]: document bounds, band starts lo_i, far keys compacted per
    (batch, KV head) with their last readers, loop bounds of every kernel;
  forward [forward]: one program per (batch, query head, query tile), band tiles
    then reachable compact tiles, one online softmax -> o, lse;
  backward: dq [forward], dk/dv of band tiles and of compact tiles [backward], the
    compact ones scatter-added back to the sequence here, or (Plan.far_gather='kernel',
    GPU) added into the band's dk/dv in place by the far kernel, which like the forward
    and dq kernels then reads the far keys' rows from K and V by index (no compact copies).
The custom VJP covers q, k and v (after padding and, on TPU, the [B, H, T, D]
transpose, which JAX differentiates). LTE's semantics (which keys are far, the
budget, the straight-through estimator on v) live in lte_jax.ops.lte_attention.pallas:
the kernels know only a band and a set of far keys with their last readers.
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from lte_jax import remat
from lte_jax.kernels.lte_attention import backend, backward, forward, sets

F32 = jnp.float32


class _Sets(NamedTuple):
  """Integer inputs of the kernels (no gradient). far_* are None without far keys."""
  lo: jax.Array                  # [B, Tp] first band key of each query
  query_bounds: jax.Array        # sets.query_bounds
  band_bounds: jax.Array         # sets.band_key_bounds
  far_idx: jax.Array | None      # [B, Hkv, Tp] compact slot -> index
  far_last: jax.Array | None     # [B, Hkv, Tp] compact slot -> last reader
  far_bounds: jax.Array | None   # sets.far_key_bounds


def _compact(cfg: forward.Static, x, idx):
  """Rows idx [B, Hkv, Tp] of a KV tensor in the kernel layout -> [B, Hkv, Tp, d]."""
  b = jnp.arange(x.shape[0])[:, None, None]
  h = jnp.arange(cfg.heads_kv)[None, :, None]
  t = jnp.minimum(idx, cfg.padded - 1)     # empty slots: any row, the kernels mask them
  return x[b, t, h] if cfg.plan.native_layout else x[b, h, t]


def _scatter_add(cfg: forward.Static, x, idx, rows):
  """x (kernel layout) += rows [B, Hkv, Tp, d] at idx; empty slots (idx = Tp) drop."""
  b = jnp.arange(x.shape[0])[:, None, None]
  h = jnp.arange(cfg.heads_kv)[None, :, None]
  at = x.at[b, idx, h] if cfg.plan.native_layout else x.at[b, h, idx]
  return at.add(rows, mode="drop")


def _rows(x, block):   # [B, H, Tp] -> [B, H, Tp / block, 1, block], a free reshape
  return x.reshape(*x.shape[:2], x.shape[2] // block, 1, block)


def _far_inputs(cfg, k, v, s: _Sets):
  """The far refs of the query-side kernels: (kc, vc, idx rows, last rows), or only the
  rows when the kernels gather K and V themselves (Plan.far_gather)."""
  if not cfg.far:
    return None
  block = cfg.plan.block_k
  rows = (_rows(s.far_idx, block), _rows(s.far_last, block))
  if cfg.plan.gathers_far_rows:
    return rows
  return (_compact(cfg, k, s.far_idx), _compact(cfg, v, s.far_idx)) + rows


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _core(cfg: forward.Static, q, k, v, s: _Sets):
  """q [layout, Hq, D], k [.., Hkv, D], v [.., Hkv, Dv] with Tp rows -> o [.., Hq, Dv]."""
  return _core_fwd(cfg, q, k, v, s)[0]


def _forward(cfg, q, k, v, s):
  """-> (o, lse)."""
  return forward.attention_forward(cfg, q, k, v, s.lo, s.query_bounds,
                                   _far_inputs(cfg, k, v, s))


def _core_fwd(cfg, q, k, v, s):
  o, lse = _forward(cfg, q, k, v, s)
  # Tagged, a block under the 'dots_mixers' remat policy keeps o and lse rather than rerun
  # the forward kernel in the backward pass (lte_jax.remat).
  o_res, lse = remat.tag(remat.KERNEL_RESIDUALS, o, lse)
  return o, (q, k, v, s, o_res, lse)


def _delta(cfg, d_o, o):
  """delta_i = rowsum(dO_i * O_i) in fp32, as a column [B, Hq, Tp, 1] like lse."""
  delta = jnp.sum(d_o.astype(F32) * o.astype(F32), axis=-1)
  return (delta.transpose(0, 2, 1) if cfg.plan.native_layout else delta)[..., None]


def _dq(cfg, q, k, v, s, far, d_o, lse, delta):
  """far: _far_inputs (the compact K/V gathers, shared with _far_key_grads)."""
  return forward.attention_dq(cfg, q, k, v, d_o, lse, delta, s.lo, s.query_bounds, far)


def _band_key_grads(cfg, q, k, v, s, d_o, lse, delta):
  return backward.band_key_grads(cfg, q, k, v, d_o, lse, delta, s.lo, s.band_bounds)


def _far_key_grads(cfg, q, k, v, s, far, d_o, lse, delta, dk=None, dv=None):
  """The far keys' dk, dv; far as _dq's. Compact copies: (dkc, dvc) per compact slot,
  for the caller to scatter back. Gathered rows (Plan.far_gather): dk, dv (kernel layout,
  fp32; None: zeros) with the far keys' gradients added in place."""
  if cfg.plan.gathers_far_rows:
    zeros = lambda x: jnp.zeros(x.shape, F32)
    into = (zeros(k) if dk is None else dk, zeros(v) if dv is None else dv)
    return backward.far_key_grads(cfg, q, d_o, lse, delta, k, v, s.far_idx, s.far_last,
                                  s.far_bounds, into=into)
  kc, vc, *_ = far
  return backward.far_key_grads(cfg, q, d_o, lse, delta, kc, vc, s.far_idx, s.far_last,
                                s.far_bounds)


def _core_bwd(cfg, residuals, d_o):
  q, k, v, s, o, lse = residuals
  d_o = d_o.astype(o.dtype)
  delta = _delta(cfg, d_o, o)
  far = _far_inputs(cfg, k, v, s)
  dq = _dq(cfg, q, k, v, s, far, d_o, lse, delta)
  dk, dv = _band_key_grads(cfg, q, k, v, s, d_o, lse, delta)
  if cfg.far and cfg.plan.gathers_far_rows:
    dk, dv = _far_key_grads(cfg, q, k, v, s, far, d_o, lse, delta, dk, dv)
  elif cfg.far:
    dkc, dvc = _far_key_grads(cfg, q, k, v, s, far, d_o, lse, delta)
    dk = _scatter_add(cfg, dk, s.far_idx, dkc)
    dv = _scatter_add(cfg, dv, s.far_idx, dvc)
  return dq, dk.astype(k.dtype), dv.astype(v.dtype), None


_core.defvjp(_core_fwd, _core_bwd)


def _dim_for_kernels(d: int) -> int:
  """Head dims padded to a power of two >= 16 (Triton blocks; zero columns are inert)."""
  return max(16, 1 << (d - 1).bit_length())


def core_inputs(plan: backend.Plan, q, k, v, keep, last, segment_ids, window_size, scale
                ) -> tuple[forward.Static, tuple, _Sets]:
  """The kernels' static config, q, k, v padded into the kernel layout, and the integer
  sets (arguments as `_attend`). Public so benchmarks can time the stages one by one
  (`stage_functions`)."""
  batch, time, num_heads, d = q.shape
  num_kv_heads, dv = k.shape[2], v.shape[-1]
  # A window of T or more is the whole causal range (and keeps int32 sums small).
  window = time if window_size is None else min(int(window_size), time)
  padded = -(-time // plan.time_multiple) * plan.time_multiple
  docs = sets.documents(segment_ids, batch, time, padded)
  lo = sets.band_starts(docs, window)
  far = None if keep is None else sets.far_keys(keep, last, docs, window, plan.far_compaction)
  s = _Sets(
      lo=lo,
      query_bounds=sets.query_bounds(lo, docs, far, window=window, time=time,
                                     block_q=plan.block_q, block_k=plan.block_k,
                                     last_is_document_end=last is None),
      band_bounds=sets.band_key_bounds(lo, docs, window=window, block_q=plan.block_q_dkv,
                                       block_k=plan.block_k_dkv),
      far_idx=None if far is None else far.idx,
      far_last=None if far is None else far.last,
      far_bounds=None if far is None else sets.far_key_bounds(
          far, window=window, block_q=plan.block_q_dkv, block_k=plan.block_k_dkv))

  tokens = backend.Tokens(plan.native_layout)
  dk_pad = _dim_for_kernels(d) - d if plan.pad_head_dim else 0
  dv_pad = _dim_for_kernels(dv) - dv if plan.pad_head_dim else 0
  prep = lambda x, extra: tokens.to_kernel(
      jnp.pad(x, ((0, 0), (0, padded - time), (0, 0), (0, extra))))
  cfg = forward.Static(plan=plan, scale=float(scale), window=window, time=time, padded=padded,
                       heads_kv=num_kv_heads, group=num_heads // num_kv_heads,
                       far=far is not None)
  return cfg, (prep(q, dk_pad), prep(k, dk_pad), prep(v, dv_pad)), s


def _attend(plan: backend.Plan, q, k, v, keep, last, segment_ids, window_size, scale):
  """Band (i - w <= j <= i) plus far keys (keep [B, T, Hkv] bool, last [B, T, Hkv] int32
  or None; keep None: none). Shapes as the public functions."""
  cfg, args, s = core_inputs(plan, q, k, v, keep, last, segment_ids, window_size, scale)
  o = _core(cfg, *args, s)
  return cfg.tokens.from_kernel(o)[:, :cfg.time, :, :v.shape[-1]]


def stage_functions(cfg: forward.Static) -> dict:
  """name -> f(q, k, v, s, *extra) on core_inputs' outputs, for timing each part of the
  op alone (jit them): 'forward' () -> (o, lse) [far-key compaction + kernel]; 'dq',
  'dkv_band', 'dkv_far' (d_o, lse, delta) -> that kernel's gradients ['dkv_far' with the
  compaction, without the scatter back; with Plan.far_gather='kernel', into zeroed dk, dv]; 'delta' (d_o, o) -> rowsum(dO * O); 'backward'
  (o, lse, d_o) -> (dq, dk, dv)."""
  # The gradient kernels alone each gather their compact K/V (the backward shares one).
  with_far = lambda fn: lambda q, k, v, s, *extra: fn(cfg, q, k, v, s,
                                                      _far_inputs(cfg, k, v, s), *extra)
  stages = {
      "forward": functools.partial(_forward, cfg),
      "dq": with_far(_dq),
      "dkv_band": functools.partial(_band_key_grads, cfg),
      "delta": lambda q, k, v, s, d_o, o: _delta(cfg, d_o, o),
      "backward": lambda q, k, v, s, o, lse, d_o: _core_bwd(cfg, (q, k, v, s, o, lse), d_o)[:3],
  }
  if cfg.far:
    stages["dkv_far"] = with_far(_far_key_grads)
  return stages


def attention_with_far_keys(q: jax.Array, k: jax.Array, v: jax.Array, *, keep: jax.Array,
                            last: jax.Array | None, window_size: int,
                            segment_ids: jax.Array | None, scale: float,
                            platform: str | None = None, interpret: bool | None = None,
                            plan_options: dict | None = None) -> jax.Array:
  """Causal attention over the band [i - window_size, i] plus far keys (LTE's sinks and
  retained tokens; lte_jax.ops.lte_attention.pallas turns scores into keep / last).

  Query i reads key j < i - window_size of its document iff keep[j] and i <= last[j].
  q [B, T, Hq, D], k [B, T, Hkv, D], v [B, T, Hkv, Dv]; keep [B, T, Hkv] bool; last
  [B, T, Hkv] int32 or None (no limit) -> o [B, T, Hq, Dv] in v.dtype; gradients for
  q, k, v. platform: 'gpu' or 'tpu' (None: the default backend's); interpret: None
  runs interpreted on CPU only; plan_options: Plan fields.
  """
  plan = backend.make_plan(platform, interpret, plan_options)
  return _attend(plan, q, k, v, keep, last, segment_ids, window_size, scale).astype(v.dtype)


def sliding_window_attention_pallas(q: jax.Array, k: jax.Array, v: jax.Array, *,
                                    window_size: int | None, segment_ids: jax.Array | None,
                                    scale: float, platform: str | None = None,
                                    interpret: bool | None = None,
                                    plan_options: dict | None = None) -> jax.Array:
  """Causal attention over [i - window_size, i] (None: the whole causal range) on the
  band kernels alone (lte_jax.ops.attention semantics, arguments validated there).

  q [B, T, Hq, D], k [B, T, Hkv, D], v [B, T, Hkv, Dv] -> o [B, T, Hq, Dv] in v.dtype.
  """
  plan = backend.make_plan(platform, interpret, plan_options)
  return _attend(plan, q, k, v, None, None, segment_ids, window_size, scale).astype(v.dtype)
