"""The decode kernel: one NSA step's selected-block and sliding-window branches.

One program (GPU), or one run of an ordered grid axis (TPU), per (batch, KV head) walks
`steps`, a table of cache blocks: first the selected blocks (-1: an unused slot), then
the blocks the window touches, in order. Each step reads one block of block_size rows
and updates that branch's online softmax (running max m, sum l, accumulator acc, all
fp32) for the G query heads of the KV head, padded to R rows (Plan.min_rows). The last
step normalises both branches and writes the gated sum

    o = base + g_slc * o_slc + g_swa * o_swa      (base = g_cmp * o_cmp, from plain JAX).

Visibility comes from the block index, its row iota and the position, never from a
mask array: a selected block's token t is visible iff t <= position; a window block's
iff position - window_size <= t <= position (and t inside the cache). A block may be
read by both branches: each branch is its own softmax, as in nsa_attention.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from lte_jax.kernels.lte_decode.kernel import dot
from lte_jax.kernels.nsa_decode import backend

F32 = jnp.float32


def _visible(block, position, shape, axis, *, block_size, cache_len, window):
  """Which tokens of `block` the branch reads, as a row [1, bs] or column [bs, 1]:
  window None is the selected branch (block -1: none), else the sliding window."""
  tok = block * block_size + jax.lax.broadcasted_iota(jnp.int32, shape, axis)
  if window is None:
    return (block >= 0) & (tok <= position)
  return (tok <= position) & (tok >= position - window) & (tok < cache_len)


def _update(state, q, k, v, visible, scale):
  """One block into an online softmax: q [R, D], k [bs, D], v [bs, Dv], visible [1, bs]."""
  m, l, acc = state
  logits = jnp.where(visible, dot(q, k, tb=True) * scale, -jnp.inf)
  m_new = jnp.maximum(m, jnp.max(logits, axis=1, keepdims=True))
  m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)         # nothing visible yet
  p = jnp.where(visible, jnp.exp(logits - m_safe), 0.0)
  alpha = jnp.exp(m - m_safe)
  l = alpha * l + jnp.sum(p, axis=1, keepdims=True)
  acc = alpha * acc + dot(p.astype(v.dtype), v)
  return m_new, l, acc


def _normalised(state):
  """acc / l; a branch that saw no visible token gives zeros (as nsa_decode_xla)."""
  _, l, acc = state
  return acc / jnp.where(l > 0, l, 1.0)


def _initial(rows, dv):
  return (jnp.full((rows, 1), -jnp.inf, F32), jnp.zeros((rows, 1), F32),
          jnp.zeros((rows, dv), F32))


def _block_step(plan, refs, head, block, position, q, state, *, window, geometry, scale):
  """Read `block` of k/v for this head and fold it into `state` (one branch)."""
  k_ref, v_ref = refs
  block_size, cache_len = geometry
  vis = functools.partial(_visible, block_size=block_size, cache_len=cache_len, window=window)
  readable = vis(block, position, (block_size, 1), 0)
  start = jnp.clip(block, 0, cache_len // block_size - 1) * block_size
  k = backend.load_block(plan, k_ref, head, start, block_size, readable).astype(q.dtype)
  v = backend.load_block(plan, v_ref, head, start, block_size, readable)
  return _update(state, q, k, v, vis(block, position, (1, block_size), 1), scale)


def _gpu_kernel(meta_ref, steps_ref, q_ref, k_ref, v_ref, base_ref, gates_ref, o_ref, *,
                plan, top, window, geometry, scale):
  b, h = pl.program_id(0), pl.program_id(1)
  position = meta_ref[0]
  q = q_ref[...]
  step = functools.partial(_block_step, plan, (k_ref, v_ref), h, geometry=geometry,
                           scale=scale)

  def branch(lo, hi, window):
    body = lambda s, state: step(steps_ref[b, h, s], position, q, state, window=window)
    return _normalised(jax.lax.fori_loop(lo, hi, body, _initial(*o_ref.shape)))

  o = base_ref[...] + gates_ref[0] * branch(0, top, None)
  if window is not None:
    o = o + gates_ref[1] * branch(top, steps_ref.shape[-1], window)
  o_ref[...] = o.astype(o_ref.dtype)


def _tpu_kernel(meta_ref, steps_ref, q_ref, k_ref, v_ref, base_ref, gates_ref, o_ref,
                *scratch, plan, top, window, geometry, scale):
  b, h, s = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  position = meta_ref[0]
  branches = [scratch[i:i + 3] for i in range(0, len(scratch), 3)]   # slc, then swa

  @pl.when(s == 0)
  def _():
    for refs in branches:
      for ref, value in zip(refs, _initial(*o_ref.shape)):
        ref[...] = value

  def fold(refs, window):
    state = tuple(ref[...] for ref in refs)
    state = _block_step(plan, (k_ref, v_ref), h, steps_ref[b, h, s], position, q_ref[...],
                        state, window=window, geometry=geometry, scale=scale)
    for ref, value in zip(refs, state):
      ref[...] = value

  pl.when(s < top)(lambda: fold(branches[0], None))
  if window is not None:
    pl.when(s >= top)(lambda: fold(branches[1], window))

  @pl.when(s == pl.num_programs(2) - 1)
  def _():
    read = lambda refs: tuple(ref[...] for ref in refs)
    o = base_ref[...] + gates_ref[0] * _normalised(read(branches[0]))
    if window is not None:
      o = o + gates_ref[1] * _normalised(read(branches[1]))
    o_ref[...] = o.astype(o_ref.dtype)


def attend(plan: backend.Plan, meta, steps, q, k, v, base, gates, *, block_size: int,
           top: int, window: int | None, scale: float, out_dtype):
  """The selected and window branches, gated and added to `base`.

  meta [1] int32 (the position); steps [B, Hkv, S] int32 block table (top selected slots,
  then the window's blocks); q [B, Hkv, R, D]; k [B, L, Hkv, D], v [B, L, Hkv, Dv] the
  cache; base [B, Hkv, R, Dv] fp32; gates [B, Hkv, 2, R, 1] fp32 (g_slc, g_swa)
  -> o [B, Hkv, R, Dv] in out_dtype.
  """
  batch, heads, rows, dk = q.shape
  cache_len, dv = k.shape[1], v.shape[-1]
  num_steps = steps.shape[-1]
  sq = pl.squeezed
  kw = dict(plan=plan, top=top, window=window, geometry=(block_size, cache_len), scale=scale)
  out_shape = [jax.ShapeDtypeStruct((batch, heads, rows, dv), out_dtype)]
  if plan.platform == "gpu":
    strip = lambda d: pl.BlockSpec((sq, cache_len, sq, d), lambda b, h: (b, 0, h, 0))
    per_head = lambda *shape: pl.BlockSpec((sq, sq, *shape),
                                           lambda b, h: (b, h) + (0,) * len(shape))
    return backend.call(
        functools.partial(_gpu_kernel, **kw), plan, grid=(batch, heads),
        in_specs=[backend.scalar_spec(), backend.scalar_spec(), per_head(rows, dk),
                  strip(dk), strip(dv), per_head(rows, dv), per_head(2, rows, 1)],
        out_specs=[per_head(rows, dv)], out_shape=out_shape)(
            meta, steps, q, k, v, base, gates)[0]

  num_blocks = cache_len // block_size

  def block_index(b, h, s, meta_ref, steps_ref):
    # Window steps past the current block repeat it: an unchanged index is not re-fetched.
    # (lax.div truncates: `//` on signed ints lowers through sign, which needs a TPU.)
    current = jax.lax.div(jnp.maximum(meta_ref[0], 0), block_size)
    block = jnp.minimum(steps_ref[b, h, s], current)
    return b, jnp.clip(block, 0, num_blocks - 1), 0, 0

  cache = lambda d: pl.BlockSpec((sq, block_size, heads, d), block_index)
  per_head = lambda *shape: pl.BlockSpec(
      (sq, sq, *shape), lambda b, h, s, *_: (b, h) + (0,) * len(shape))
  scratch = [backend.vmem((rows, 1)), backend.vmem((rows, 1)), backend.vmem((rows, dv))]
  return backend.call(
      functools.partial(_tpu_kernel, **kw), plan, grid=(batch, heads, num_steps),
      in_specs=[per_head(rows, dk), cache(dk), cache(dv), per_head(rows, dv),
                per_head(2, rows, 1)],
      out_specs=[per_head(rows, dv)], out_shape=out_shape,
      scratch_shapes=scratch * (1 if window is None else 2), num_scalar_prefetch=2)(
          meta, steps, q, k, v, base, gates)[0]
