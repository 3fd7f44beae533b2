"""The forward state recurrence split into segments of chunks (GPU; Plan.state_segments).

With few (batch x head) sequences the recurrence of state.chunk_states runs few programs,
each walking every chunk in turn: at (1, 16384, 16, 128) that is 32 programs of 256
dependent chunk steps, latency bound. The recurrence is affine in the state,

  h_{n+1} = A_n h_n + B_n,   A_n = hd_n I - (kd K_n)^T W_n,   B_n = (kd K_n)^T U_n,

so with the N chunks cut into S segments of L = N / S:
  1. in parallel over segments s < S - 1: E_s, the state at the segment's end when it
     starts from zero, and P_s = A_{last} ... A_{first}, its transition (the same
     recurrence with U = 0, started from the identity, Dk columns instead of Dv);
  2. in parallel over all segments: each program first folds the segments before it,
     h <- P_s' h + E_s' from h_0, then runs the plain recurrence over its own L chunks,
     writing the per-chunk states, V_new and (last segment) the final state.
About (2 + Dk / Dv) / S of the sequential steps per program, at S times the programs.
Same products, in the same dtypes, as state.chunk_states; the fold's [Dk, Dk] products
are fp32. TPU keeps the one-program-per-sequence grid form (its grid is sequential).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from lte_jax.kernels.gated_delta_rule import backend, chunk_math as cm
from lte_jax.kernels.gated_delta_rule.state import _forward_step


def _walk(w_ref, u_ref, k_ref, kd_ref, hd_ref, h, *, first_chunk, on_values, store=None):
  """Run the recurrence over this program's segment from state h (fp32 [Dk, cols]);
  u_ref None: U = 0. store(i, h_entering, v_new) records chunk i of the segment."""
  length, chunk = w_ref.shape[0], w_ref.shape[1]

  def body(i, h):
    rows = pl.ds(pl.multiple_of((first_chunk + i) * chunk, chunk), chunk)
    u = jnp.zeros((chunk, h.shape[1]), cm.F32) if u_ref is None else u_ref[i]
    v_new, h_next = _forward_step(h, w_ref[i], u, k_ref[rows, :], kd_ref[i], hd_ref[i],
                                  on_values=on_values)
    if store is not None:
      store(i, h, v_new)
    return h_next

  return jax.lax.fori_loop(0, length, body, h)


def _ends_kernel(w_ref, u_ref, k_ref, kd_ref, hd_ref, e_ref, *, on_values):
  """E_s columns block: the segment's end state from a zero start."""
  length = w_ref.shape[0]
  h = jnp.zeros(e_ref.shape, cm.F32)
  e_ref[...] = _walk(w_ref, u_ref, k_ref, kd_ref, hd_ref, h,
                     first_chunk=pl.program_id(2) * length, on_values=on_values)


def _transitions_kernel(w_ref, k_ref, kd_ref, hd_ref, p_ref, *, on_values):
  """P_s columns block j: the identity's columns [j * cols, (j + 1) * cols) carried
  through the segment with U = 0."""
  length = w_ref.shape[0]
  dk, cols = p_ref.shape
  row = jax.lax.broadcasted_iota(jnp.int32, (dk, cols), 0)
  col = jax.lax.broadcasted_iota(jnp.int32, (dk, cols), 1) + pl.program_id(1) * cols
  h = jnp.where(row == col, 1.0, 0.0).astype(cm.F32)
  p_ref[...] = _walk(w_ref, None, k_ref, kd_ref, hd_ref, h,
                     first_chunk=pl.program_id(2) * length, on_values=on_values)


def _states_kernel(w_ref, u_ref, k_ref, kd_ref, hd_ref, h0_ref, p_ref, e_ref,
                   h_ref, v_new_ref, h_last_ref, *, on_values):
  """Fold the earlier segments into the start state, then walk this segment."""
  s = pl.program_id(2)
  length = w_ref.shape[0]

  def fold(i, h):
    return cm.mm(p_ref[i], h) + e_ref[i]

  h = jax.lax.fori_loop(0, s, fold, h0_ref[...].astype(cm.F32))

  def store(i, h_in, v_new):
    h_ref[i] = h_in.astype(h_ref.dtype)
    v_new_ref[i] = v_new.astype(v_new_ref.dtype)

  h = _walk(w_ref, u_ref, k_ref, kd_ref, hd_ref, h, first_chunk=s * length,
            on_values=on_values, store=store)

  @pl.when(s == pl.num_programs(2) - 1)
  def _():
    h_last_ref[...] = h


def chunk_states_segmented(plan: backend.Plan, layout: backend.Layout, w, u, k, kd_col, hd,
                           h0, *, segments: int, state_dtype=jnp.float32):
  """state.chunk_states (same arguments and results, GPU layout) over `segments` segments
  of chunks; segments must divide the chunk count and be >= 2."""
  bh, n, c, dk = w.shape
  dv = u.shape[-1]
  if segments < 2 or n % segments:
    raise ValueError(f"segments must be >= 2 and divide the {n} chunks, got {segments}")
  length = n // segments
  heads = layout.heads
  bv, bk = plan.value_block(dv), plan.value_block(dk)
  on_values = plan.decays_on_values(dk)
  keys = pl.BlockSpec((pl.squeezed, n * c, pl.squeezed, dk),
                      lambda b, j, s: (b // heads, 0, b % heads, 0))

  def seg(*tail, cols=False):          # segment s's chunks (and value block j)
    return pl.BlockSpec((pl.squeezed, length, *tail),
                        lambda b, j, s: (b, s, 0, j if cols else 0))

  def per_segment(cols):               # [BH, S - 1, Dk, .] block (s, j)
    return pl.BlockSpec((pl.squeezed, pl.squeezed, dk, cols), lambda b, j, s: (b, s, 0, j))

  ends = backend.call(
      functools.partial(_ends_kernel, on_values=on_values), plan,
      grid=(bh, dv // bv, segments - 1),
      in_specs=[seg(c, dk), seg(c, bv, cols=True), keys, seg(c, 1), seg(1, 1)],
      out_specs=[per_segment(bv)],
      out_shape=[jax.ShapeDtypeStruct((bh, segments - 1, dk, dv), jnp.float32)],
      name="gdn_segment_ends")(w, u, k, kd_col, hd)[0]
  transitions = backend.call(
      functools.partial(_transitions_kernel, on_values=on_values), plan,
      grid=(bh, dk // bk, segments - 1),
      in_specs=[seg(c, dk), keys, seg(c, 1), seg(1, 1)],
      out_specs=[per_segment(bk)],
      out_shape=[jax.ShapeDtypeStruct((bh, segments - 1, dk, dk), jnp.float32)],
      name="gdn_segment_transitions")(w, k, kd_col, hd)[0]
  state = pl.BlockSpec((pl.squeezed, dk, bv), lambda b, j, s: (b, 0, j))
  out_shape = [jax.ShapeDtypeStruct((bh, n, dk, dv), state_dtype),
               jax.ShapeDtypeStruct((bh, n, c, dv), state_dtype),
               jax.ShapeDtypeStruct((bh, dk, dv), jnp.float32)]
  return backend.call(
      functools.partial(_states_kernel, on_values=on_values), plan,
      grid=(bh, dv // bv, segments),
      in_specs=[seg(c, dk), seg(c, bv, cols=True), keys, seg(c, 1), seg(1, 1), state,
                pl.BlockSpec((pl.squeezed, segments - 1, dk, dk), lambda b, j, s: (b, 0, 0, 0)),
                pl.BlockSpec((pl.squeezed, segments - 1, dk, bv), lambda b, j, s: (b, 0, 0, j))],
      out_specs=[seg(dk, bv, cols=True), seg(c, bv, cols=True), state], out_shape=out_shape,
      name="gdn_chunk_states")(w, u, k, kd_col, hd, h0, transitions, ends)
