"""The state recurrences split into segments of chunks (GPU; Plan.state_segments).

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

The backward's dh recurrence (state.chunk_state_grads) is affine too, run in reverse:
dh_prev = (hd I - W^T (kd K)) dh + (scale (qd Q)^T dO - W^T dV_local), so
chunk_state_grads_segmented does the same with the segments taken from the last: summaries
of segments 1 .. S-1 (from a zero dh at each segment's end), then every segment folds the
later ones into dh_last and walks its own chunks backwards.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from lte_jax.kernels.gated_delta_rule import backend, chunk_math as cm
from lte_jax.kernels.gated_delta_rule.state import _backward_step, _forward_step, _rows


def _walk(w_ref, u_ref, k_ref, kd_ref, hd_ref, h, *, first_chunk, on_values, store=None):
  """Run the recurrence over this program's segment from state h (fp32 [Dk, cols]);
  u_ref None: U = 0. store(i, h_entering, v_new) records chunk i of the segment."""
  length, chunk = w_ref.shape[0], w_ref.shape[1]

  def body(i, h):
    rows = _rows(first_chunk + i, chunk)
    u = None if u_ref is None else u_ref[i]
    v_new, h_next = _forward_step(h, w_ref[i], u, k_ref[rows, :], kd_ref[i], hd_ref[i],
                                  on_values=on_values)
    if store is not None:
      store(i, h, v_new)
    return h_next

  return jax.lax.fori_loop(0, length, body, h)


def _identity_columns(shape) -> jax.Array:
  """Columns [j * cols, (j + 1) * cols) of the [Dk, Dk] identity, j = program_id(1): the
  start of a transition's column block."""
  row = jax.lax.broadcasted_iota(jnp.int32, shape, 0)
  col = jax.lax.broadcasted_iota(jnp.int32, shape, 1) + pl.program_id(1) * shape[1]
  return jnp.where(row == col, 1.0, 0.0).astype(cm.F32)


class _Specs:
  """Block specs of the segmented kernels on a (B*H, column block j, segment s) grid."""

  def __init__(self, plan: backend.Plan, layout: backend.Layout, w_shape, dv: int,
               segments: int):
    bh, n, c, dk = w_shape
    if segments < 2 or n % segments:
      raise ValueError(f"segments must be >= 2 and divide the {n} chunks, got {segments}")
    self.bh, self.n, self.c, self.dk, self.dv, self.segments = bh, n, c, dk, dv, segments
    self.length = n // segments
    self.heads = layout.heads
    self.bv, self.bk = plan.value_block(dv), plan.value_block(dk)
    self.on_values = plan.decays_on_values(dk)

  def tokens(self, d: int, cols: bool = False) -> pl.BlockSpec:
    """All rows of a [B, T, H, d] token tensor (or value block j of them)."""
    heads = self.heads
    return pl.BlockSpec((pl.squeezed, self.n * self.c, pl.squeezed, d),
                        lambda b, j, s: (b // heads, 0, b % heads, j if cols else 0))

  def seg(self, *tail, cols: bool = False, shift: int = 0) -> pl.BlockSpec:
    """Segment s + shift's chunks of a [B*H, N, ...] tensor (and value block j)."""
    return pl.BlockSpec((pl.squeezed, self.length, *tail),
                        lambda b, j, s: (b, s + shift, 0, j if cols else 0))

  def summary(self, cols: int) -> pl.BlockSpec:
    """Block (s, j) of a [B*H, S - 1, Dk, .] summary (end states, transitions)."""
    return pl.BlockSpec((pl.squeezed, pl.squeezed, self.dk, cols),
                        lambda b, j, s: (b, s, 0, j))

  def summaries(self, cols: int) -> list:
    """(all transitions [S - 1, Dk, Dk], all end states [S - 1, Dk, cols] of block j): what
    the states kernels fold."""
    return [pl.BlockSpec((pl.squeezed, self.segments - 1, self.dk, self.dk),
                         lambda b, j, s: (b, 0, 0, 0)),
            pl.BlockSpec((pl.squeezed, self.segments - 1, self.dk, cols),
                         lambda b, j, s: (b, 0, 0, j))]

  @property
  def state(self) -> pl.BlockSpec:
    return pl.BlockSpec((pl.squeezed, self.dk, self.bv), lambda b, j, s: (b, 0, j))

  def summary_shape(self, cols: int) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct((self.bh, self.segments - 1, self.dk, cols), jnp.float32)

  def outputs(self, state_dtype, second_dtype) -> tuple[list, list]:
    """Specs and shapes of (per-chunk states [B*H, N, Dk, Dv], a per-chunk [B*H, N, C, Dv]
    tensor, the final state [B*H, Dk, Dv] fp32)."""
    specs = [self.seg(self.dk, self.bv, cols=True), self.seg(self.c, self.bv, cols=True),
             self.state]
    shapes = [jax.ShapeDtypeStruct((self.bh, self.n, self.dk, self.dv), state_dtype),
              jax.ShapeDtypeStruct((self.bh, self.n, self.c, self.dv), second_dtype),
              jax.ShapeDtypeStruct((self.bh, self.dk, self.dv), jnp.float32)]
    return specs, shapes


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
  p_ref[...] = _walk(w_ref, None, k_ref, kd_ref, hd_ref, _identity_columns(p_ref.shape),
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
  sp = _Specs(plan, layout, w.shape, u.shape[-1], segments)
  c, dk, bv, bk = sp.c, sp.dk, sp.bv, sp.bk
  ends = backend.call(
      functools.partial(_ends_kernel, on_values=sp.on_values), plan,
      grid=(sp.bh, sp.dv // bv, segments - 1),
      in_specs=[sp.seg(c, dk), sp.seg(c, bv, cols=True), sp.tokens(dk), sp.seg(c, 1),
                sp.seg(1, 1)],
      out_specs=[sp.summary(bv)], out_shape=[sp.summary_shape(sp.dv)],
      name="gdn_segment_ends")(w, u, k, kd_col, hd)[0]
  transitions = backend.call(
      functools.partial(_transitions_kernel, on_values=sp.on_values), plan,
      grid=(sp.bh, dk // bk, segments - 1),
      in_specs=[sp.seg(c, dk), sp.tokens(dk), sp.seg(c, 1), sp.seg(1, 1)],
      out_specs=[sp.summary(bk)], out_shape=[sp.summary_shape(dk)],
      name="gdn_segment_transitions")(w, k, kd_col, hd)[0]
  out_specs, out_shape = sp.outputs(state_dtype, state_dtype)
  return backend.call(
      functools.partial(_states_kernel, on_values=sp.on_values), plan,
      grid=(sp.bh, sp.dv // bv, segments),
      in_specs=[sp.seg(c, dk), sp.seg(c, bv, cols=True), sp.tokens(dk), sp.seg(c, 1),
                sp.seg(1, 1), sp.state] + sp.summaries(bv),
      out_specs=out_specs, out_shape=out_shape,
      name="gdn_chunk_states")(w, u, k, kd_col, hd, h0, transitions, ends)


# --- backward: the dh recurrence -----------------------------------------------------------

def _walk_back(refs, dh, *, first_chunk, scale, on_values, store=None):
  """Run the dh recurrence backwards over this program's segment from dh (fp32
  [Dk, cols]). refs: (q, qd, k, kd, hd, w, d_o, dv_local); q, qd, d_o and dv_local None:
  the homogeneous recurrence (dO = 0, dV_local = 0). store(i, dh_leaving, dv) records local
  chunk i."""
  q_ref, qd_ref, k_ref, kd_ref, hd_ref, w_ref, do_ref, dvl_ref = refs
  length, chunk = w_ref.shape[0], w_ref.shape[1]
  homogeneous = q_ref is None

  def body(step, dh):
    i = length - 1 - step
    rows = _rows(first_chunk + i, chunk)
    terms = (None,) * 4 if homogeneous else (q_ref[rows, :], qd_ref[i], do_ref[rows, :],
                                               dvl_ref[i])
    q, qd, d_o, dv_local = terms
    dv, dh_prev = _backward_step(dh, q, qd, k_ref[rows, :], kd_ref[i], hd_ref[i], w_ref[i],
                                 d_o, dv_local, scale, on_values=on_values)
    if store is not None:
      store(i, dh, dv)
    return dh_prev

  return jax.lax.fori_loop(0, length, body, dh)


def _grad_ends_kernel(*refs, scale, on_values):
  """dh at the start of segment program_id(2) + 1 from a zero dh at its end."""
  *ins, e_ref = refs
  length = ins[5].shape[0]
  e_ref[...] = _walk_back(ins, jnp.zeros(e_ref.shape, cm.F32),
                          first_chunk=(pl.program_id(2) + 1) * length, scale=scale,
                          on_values=on_values)


def _grad_transitions_kernel(k_ref, kd_ref, hd_ref, w_ref, p_ref, *, on_values):
  """Columns block j of segment program_id(2) + 1's backward transition."""
  length = w_ref.shape[0]
  refs = (None, None, k_ref, kd_ref, hd_ref, w_ref, None, None)
  p_ref[...] = _walk_back(refs, _identity_columns(p_ref.shape),
                          first_chunk=(pl.program_id(2) + 1) * length, scale=0.0,
                          on_values=on_values)


def _grad_states_kernel(*refs, scale, on_values):
  """Fold the later segments into dh_last, then walk this segment backwards."""
  ins, (dh_last_ref, p_ref, e_ref), (dh_ref, dv_ref, dh0_ref) = refs[:8], refs[8:11], refs[11:]
  s, segments = pl.program_id(2), pl.num_programs(2)
  length = ins[5].shape[0]

  def fold(step, dh):           # segments S-1 down to s+1; their summaries sit at index - 1
    later = segments - 2 - step
    return cm.mm(p_ref[later], dh) + e_ref[later]

  dh = jax.lax.fori_loop(0, segments - 1 - s, fold, dh_last_ref[...].astype(cm.F32))

  def store(i, dh_out, dv):
    dh_ref[i] = dh_out.astype(dh_ref.dtype)
    dv_ref[i] = dv.astype(dv_ref.dtype)

  dh = _walk_back(ins, dh, first_chunk=s * length, scale=scale, on_values=on_values,
                  store=store)

  @pl.when(s == 0)
  def _():
    dh0_ref[...] = dh


def chunk_state_grads_segmented(plan: backend.Plan, layout: backend.Layout, q, qd_col, k,
                                kd_col, hd, w, d_o, dv_local, dh_last, *, scale: float,
                                segments: int, state_dtype=jnp.float32,
                                dv_dtype=jnp.float32):
  """state.chunk_state_grads (same arguments and results, GPU layout) over `segments`
  segments of chunks; segments must divide the chunk count and be >= 2."""
  sp = _Specs(plan, layout, w.shape, d_o.shape[-1], segments)
  c, dk, bv, bk = sp.c, sp.dk, sp.bv, sp.bk

  def inputs(shift):                  # q, qd, k, kd, hd, w, d_o, dv_local
    return [sp.tokens(dk), sp.seg(c, 1, shift=shift), sp.tokens(dk), sp.seg(c, 1, shift=shift),
            sp.seg(1, 1, shift=shift), sp.seg(c, dk, shift=shift), sp.tokens(bv, cols=True),
            sp.seg(c, bv, cols=True, shift=shift)]

  args = (q, qd_col, k, kd_col, hd, w, d_o, dv_local)
  ends = backend.call(
      functools.partial(_grad_ends_kernel, scale=scale, on_values=sp.on_values), plan,
      grid=(sp.bh, sp.dv // bv, segments - 1), in_specs=inputs(1),
      out_specs=[sp.summary(bv)], out_shape=[sp.summary_shape(sp.dv)],
      name="gdn_segment_grad_ends")(*args)[0]
  transitions = backend.call(
      functools.partial(_grad_transitions_kernel, on_values=sp.on_values), plan,
      grid=(sp.bh, dk // bk, segments - 1),
      in_specs=[sp.tokens(dk), sp.seg(c, 1, shift=1), sp.seg(1, 1, shift=1),
                sp.seg(c, dk, shift=1)],
      out_specs=[sp.summary(bk)], out_shape=[sp.summary_shape(dk)],
      name="gdn_segment_grad_transitions")(k, kd_col, hd, w)[0]
  out_specs, out_shape = sp.outputs(state_dtype, dv_dtype)
  return backend.call(
      functools.partial(_grad_states_kernel, scale=scale, on_values=sp.on_values), plan,
      grid=(sp.bh, sp.dv // bv, segments),
      in_specs=inputs(0) + [sp.state] + sp.summaries(bv),
      out_specs=out_specs, out_shape=out_shape,
      name="gdn_chunk_state_grads")(*args, dh_last, transitions, ends)
