"""Kernel 2: the sequential inter-chunk recurrences (forward states, backward dh).

Forward, per chunk n with h the state entering it (PAPER.md section 2, step 5):
  V_new = U - W h;   h <- hd h + (kd K)^T V_new
Backward, in reverse, with dh the gradient of the state leaving chunk n:
  dV = dV_local + (kd K) dh;   dh <- hd dh + scale (qd Q)^T dO - W^T dV
kd_j = [j in the chunk's last document] e^{G_last - G_j}, hd = [one continuing
document] e^{G_last}. Per-chunk states are stored (not per-token ones): the
parallel kernels read them.

Value columns never mix, so the GPU form splits Dv into blocks of
`plan.block_v` programs (more parallel work); the TPU form keeps all of Dv.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from lte_jax.kernels.gated_delta_rule import backend, chunk_math as cm


# Products take the inputs' dtype (bf16 operands into fp32 accumulators, as FLA):
# they sit on the sequential path, where fp32 dots would leave the tensor cores.
# The carried state itself stays fp32.
#
# Where the per-token factors kd, qd go (Plan.decay_on): 'keys' scales the [C, Dk] key /
# query tile in fp32 before its bf16 cast, so the transposed operand reaches the dot
# through registers; 'values' moves the same factor onto the [C, block_v] value-side
# tile ((kd K)^T V = K^T (kd V), (kd K) dh = kd (K dh), (qd Q)^T dO = Q^T (qd dO)), as
# FLA's recurrence does, leaving K and Q as loaded (bf16 straight into the dot).

def _forward_step(h, w, u, k, kd, hd, *, on_values=False):
  """One chunk: -> (V_new, next h)."""
  dtype = k.dtype
  v_new = u.astype(cm.F32) - cm.mm(w, h, dtype=dtype)
  if on_values:
    update = cm.mm(k, kd * v_new, ta=True, dtype=dtype)
  else:
    update = cm.mm(kd * k.astype(cm.F32), v_new, ta=True, dtype=dtype)
  return v_new, hd * h + update


def _backward_step(dh, q, qd, k, kd, hd, w_t, d_o, dv_local, scale, *, on_values=False):
  """One chunk backwards: -> (dV, dh entering it). w_t(dv) -> W^T dV [Dk, bv]."""
  dtype = k.dtype
  if on_values:
    dv = dv_local + kd * cm.mm(k, dh, dtype=dtype)
    from_o = cm.mm(q, qd * d_o.astype(cm.F32), ta=True, dtype=dtype)
  else:
    dv = dv_local + cm.mm(kd * k.astype(cm.F32), dh, dtype=dtype)
    from_o = cm.mm(qd * q.astype(cm.F32), d_o, ta=True, dtype=dtype)
  return dv, hd * dh + scale * from_o - w_t(dv)


def _times_w_transposed(w):
  """W^T dV from a loaded W [C, Dk]."""
  return lambda dv: cm.mm(w, dv, ta=True, dtype=w.dtype)


def _value_side_shared(plan, dk, bv, c, step_tiles, state_dtype, *, backward):
  """backend.call's shared_bytes for a GPU recurrence: in the value-side form the loaded
  [C, D] tiles go into the dots as loaded, so Triton stages every step's loads
  (`step_tiles`: (columns, dtype) of each [C, columns] tile) num_stages deep beside the
  state's [Dk, bv] operand copy; at Dk = 256 three stages overflow shared memory. None
  for the key-side form (its K / Q tiles pass through registers); backend.call applies it
  on the GPU only."""
  if not plan.decays_on_values(dk, backward=backward):
    return None
  return _staged_shared(dk, bv, c, step_tiles, state_dtype)


def _staged_shared(dk, bv, c, step_tiles, state_dtype):
  """(bytes of one step's [C, columns] tiles, bytes of the [Dk, bv] state operand)."""
  step = sum(c * cols * jnp.dtype(dtype).itemsize for cols, dtype in step_tiles)
  return step, dk * bv * jnp.dtype(state_dtype).itemsize


# --- forward -----------------------------------------------------------------------------

def _loop_specs(n, dk, bv):
  """Block specs of the GPU recurrences on a (B*H, value blocks) grid: full(*tail), all N
  chunks of a [BH, N, *tail] array; v_blocked(rows), value block j of a
  [BH, N, rows, Dv] array; state, value block j of a [BH, Dk, Dv] state."""
  full = lambda *tail: pl.BlockSpec((pl.squeezed, n, *tail), lambda b, j: (b, 0, 0, 0))
  v_blocked = lambda rows: pl.BlockSpec((pl.squeezed, n, rows, bv), lambda b, j: (b, 0, 0, j))
  state = pl.BlockSpec((pl.squeezed, dk, bv), lambda b, j: (b, 0, j))
  return full, v_blocked, state


def _out_shapes(bh, n, c, dk, dv, state_dtype, per_token_dtype):
  """Per-chunk states [BH, N, Dk, Dv], a per-token [BH, N, C, Dv] output, and the last
  state [BH, Dk, Dv] fp32: what both recurrences return."""
  return [jax.ShapeDtypeStruct((bh, n, dk, dv), state_dtype),
          jax.ShapeDtypeStruct((bh, n, c, dv), per_token_dtype),
          jax.ShapeDtypeStruct((bh, dk, dv), jnp.float32)]


def _rows(n, chunk):
  """Chunk n's rows of a whole-sequence token block [T, D] (GPU layout)."""
  return pl.ds(pl.multiple_of(n * chunk, chunk), chunk)


def _forward_loop_kernel(w_ref, u_ref, k_ref, kd_ref, hd_ref, h0_ref,
                         h_ref, v_new_ref, h_last_ref, *, on_values):
  """GPU: one program walks all chunks of one (batch*head, value block)."""
  chunk = w_ref.shape[1]

  def body(n, h):
    h_ref[n] = h.astype(h_ref.dtype)
    v_new, h = _forward_step(h, w_ref[n], u_ref[n], k_ref[_rows(n, chunk), :], kd_ref[n],
                             hd_ref[n], on_values=on_values)
    v_new_ref[n] = v_new.astype(v_new_ref.dtype)
    return h

  h_last_ref[...] = jax.lax.fori_loop(0, w_ref.shape[0], body, h0_ref[...].astype(cm.F32))


def _fused_forward_kernel(t_ref, k_ref, v_ref, beta_ref, bqd_ref, kd_ref, hd_ref, h0_ref,
                          h_ref, v_new_ref, h_last_ref, *, t_mm):
  """GPU, Plan.fuse_wy: one program walks all chunks of one (batch*head, value
  block) with V_new = T (beta V - beta qd (K h)), the WY identity U - W h with
  U = T beta V and W = T beta qd K multiplied out: W and U are never formed, and K, loaded
  once a chunk, feeds both K h and the update K^T (kd V_new)."""
  chunk = t_ref.shape[1]
  dtype = k_ref.dtype

  def body(n, h):
    rows = _rows(n, chunk)
    h_ref[n] = h.astype(h_ref.dtype)
    k = k_ref[rows, :]
    r = beta_ref[n] * v_ref[rows, :].astype(cm.F32) - bqd_ref[n] * cm.mm(k, h, dtype=dtype)
    v_new = t_mm(t_ref[n], r)
    v_new_ref[n] = v_new.astype(v_new_ref.dtype)
    return hd_ref[n] * h + cm.mm(k, kd_ref[n] * v_new, ta=True, dtype=dtype)

  h_last_ref[...] = jax.lax.fori_loop(0, t_ref.shape[0], body, h0_ref[...].astype(cm.F32))


def _forward_grid_kernel(w_ref, u_ref, k_ref, kd_ref, hd_ref, h0_ref,
                         h_ref, v_new_ref, h_last_ref, h_scratch, *, on_values):
  """TPU: one grid step per chunk, in order; the state stays in fp32 VMEM."""
  n = pl.program_id(1)

  @pl.when(n == 0)
  def _():
    h_scratch[...] = h0_ref[...].astype(cm.F32)

  h = h_scratch[...]
  h_ref[...] = h.astype(h_ref.dtype)
  v_new, h = _forward_step(h, w_ref[...], u_ref[...], k_ref[...], kd_ref[...], hd_ref[...],
                           on_values=on_values)
  v_new_ref[...] = v_new.astype(v_new_ref.dtype)
  h_scratch[...] = h

  @pl.when(n == pl.num_programs(1) - 1)
  def _():
    h_last_ref[...] = h


def chunk_states(plan: backend.Plan, layout: backend.Layout, w, u, k, kd_col, hd, h0, *,
                 state_dtype=jnp.float32):
  """w [BH, N, C, Dk]; u [BH, N, C, Dv]; k a token tensor (layout); kd_col
  [BH, N, C, 1]; hd [BH, N, 1, 1]; h0 [BH, Dk, Dv] -> (h entering each chunk
  [BH, N, Dk, Dv], V_new [BH, N, C, Dv], final state [BH, Dk, Dv] fp32)."""
  bh, n, c, dk = w.shape
  dv = u.shape[-1]
  out_shape = _out_shapes(bh, n, c, dk, dv, state_dtype, state_dtype)
  args = (w, u, k, kd_col, hd, h0)
  if plan.sequential_in_grid:
    chunk = backend.per_chunk
    whole = pl.BlockSpec((pl.squeezed, dk, dv), lambda b, i: (b, 0, 0))
    return backend.call(
        functools.partial(_forward_grid_kernel, on_values=plan.decays_on_values(dk)), plan,
        grid=(bh, n),
        in_specs=[chunk(c, dk), chunk(c, dv), layout.block(dk), chunk(c, 1), chunk(1, 1),
                  whole],
        out_specs=[chunk(dk, dv), chunk(c, dv), whole], out_shape=out_shape,
        sequential_last=True, scratch_shapes=[backend.vmem((dk, dv))],
        name="gdn_chunk_states")(*args)
  bv = plan.recurrence_value_block(dv, bh, dk, "gdn_chunk_states")
  full, v_blocked, state = _loop_specs(n, dk, bv)
  shared = _value_side_shared(plan, dk, bv, c, [(dk, w.dtype), (bv, u.dtype), (dk, k.dtype),
                                                 (1, kd_col.dtype)], k.dtype, backward=False)
  return backend.call(
      functools.partial(_forward_loop_kernel, on_values=plan.decays_on_values(dk)), plan,
      grid=(bh, dv // bv),
      in_specs=[full(c, dk), v_blocked(c), layout.sequence(dk), full(c, 1), full(1, 1), state],
      out_specs=[v_blocked(dk), v_blocked(c), state], out_shape=out_shape,
      name="gdn_chunk_states", shared_bytes=shared, dk=dk)(*args)


def fused_chunk_states(plan: backend.Plan, layout: backend.Layout, t, k, v, beta_col, bqd_col,
                       kd_col, hd, h0, *, state_dtype=jnp.float32):
  """Plan.fuse_wy (GPU form): the forward recurrence straight from T, without the WY
  transform. t [BH, N, C, C]; k, v token tensors (layout); beta_col, bqd_col (beta * qd),
  kd_col [BH, N, C, 1]; hd [BH, N, 1, 1]; h0 [BH, Dk, Dv] -> as chunk_states."""
  assert layout.native, "the fused forward recurrence is the GPU form"
  bh, n, c, _ = t.shape
  dk, dv = k.shape[-1], v.shape[-1]
  bv = plan.recurrence_value_block(dv, bh, dk, "gdn_chunk_states")
  full, v_blocked, state = _loop_specs(n, dk, bv)
  # Its loads go into the dots as loaded (as the value-side form's): staged in shared memory.
  shared = _staged_shared(dk, bv, c, [(c, t.dtype), (dk, k.dtype), (bv, v.dtype),
                                      (1, beta_col.dtype), (1, bqd_col.dtype),
                                      (1, kd_col.dtype)], k.dtype)
  return backend.call(
      functools.partial(_fused_forward_kernel, t_mm=plan.t_product(k.dtype)), plan,
      grid=(bh, dv // bv),
      in_specs=[full(c, c), layout.sequence(dk), layout.sequence(dv, bv), full(c, 1),
                full(c, 1), full(c, 1), full(1, 1), state],
      out_specs=[v_blocked(dk), v_blocked(c), state],
      out_shape=_out_shapes(bh, n, c, dk, dv, state_dtype, state_dtype),
      name="gdn_chunk_states", shared_bytes=shared, dk=dk)(
          t, k, v, beta_col, bqd_col, kd_col, hd, h0)


# --- backward ----------------------------------------------------------------------------

def _backward_loop_kernel(q_ref, qd_ref, k_ref, kd_ref, hd_ref, *refs, scale, on_values,
                          t_mm=None):
  """GPU: one program walks the chunks of one (batch*head, value block) backwards. refs:
  w, then do, dV_local, dh_last and the outputs; with t_mm (Plan.fuse_wy) t and beta qd in
  place of w, and W^T dV = K^T (beta qd T^T dV) (W = T beta qd K): the K tile the step
  loads anyway and T [C, C] replace W [C, Dk]."""
  *wy_refs, do_ref, dvl_ref, dh_last_ref, dh_ref, dv_ref, dh0_ref = refs
  num_chunks, chunk = wy_refs[0].shape[:2]

  def w_transposed(n, k):
    if t_mm is None:
      return _times_w_transposed(wy_refs[0][n])
    t, bqd = wy_refs[0][n], wy_refs[1][n]
    return lambda dv: cm.mm(k, bqd * t_mm(t, dv, ta=True), ta=True, dtype=k.dtype)

  def body(i, dh):
    n = num_chunks - 1 - i
    rows = _rows(n, chunk)
    dh_ref[n] = dh.astype(dh_ref.dtype)
    k = k_ref[rows, :]
    dv, dh = _backward_step(dh, q_ref[rows, :], qd_ref[n], k, kd_ref[n], hd_ref[n],
                            w_transposed(n, k), do_ref[rows, :], dvl_ref[n], scale,
                            on_values=on_values)
    dv_ref[n] = dv.astype(dv_ref.dtype)
    return dh

  dh0_ref[...] = jax.lax.fori_loop(0, num_chunks, body, dh_last_ref[...].astype(cm.F32))


def _backward_grid_kernel(q_ref, qd_ref, k_ref, kd_ref, hd_ref, w_ref, do_ref, dvl_ref,
                          dh_last_ref, dh_ref, dv_ref, dh0_ref, dh_scratch, *, scale,
                          on_values):
  """TPU: grid step i handles chunk N-1-i (the index maps reverse the order)."""
  i = pl.program_id(1)

  @pl.when(i == 0)
  def _():
    dh_scratch[...] = dh_last_ref[...].astype(cm.F32)

  dh = dh_scratch[...]
  dh_ref[...] = dh.astype(dh_ref.dtype)
  dv, dh = _backward_step(dh, q_ref[...], qd_ref[...], k_ref[...], kd_ref[...], hd_ref[...],
                          _times_w_transposed(w_ref[...]), do_ref[...], dvl_ref[...], scale,
                          on_values=on_values)
  dv_ref[...] = dv.astype(dv_ref.dtype)
  dh_scratch[...] = dh

  @pl.when(i == pl.num_programs(1) - 1)
  def _():
    dh0_ref[...] = dh


def chunk_state_grads(plan: backend.Plan, layout: backend.Layout, q, qd_col, k, kd_col, hd, w,
                      d_o, dv_local, dh_last, *, scale: float, state_dtype=jnp.float32,
                      dv_dtype=jnp.float32, t=None, bqd_col=None):
  """Reverse recurrence. q, k, d_o token tensors (layout); w [BH, N, C, Dk], or None with
  t [BH, N, C, C] and bqd_col (beta * qd) [BH, N, C, 1] (Plan.fuse_wy, GPU form);
  dv_local [BH, N, C, Dv]; dh_last [BH, Dk, Dv] (gradient of the final state)
  -> (dh of the state leaving each chunk [BH, N, Dk, Dv] in state_dtype, total dV_new
  [BH, N, C, Dv] in dv_dtype, dh0 [BH, Dk, Dv] fp32)."""
  bh, n, c = dv_local.shape[:3]
  dk, dv = k.shape[-1], d_o.shape[-1]
  out_shape = _out_shapes(bh, n, c, dk, dv, state_dtype, dv_dtype)
  on_values = plan.decays_on_values(dk, backward=True)
  if plan.sequential_in_grid:
    assert not layout.native, "the reversed index maps assume [BH, N, C, D] token tensors"
    rev = lambda *tail: pl.BlockSpec((pl.squeezed, pl.squeezed, *tail),
                                     lambda b, i: (b, n - 1 - i) + (0,) * len(tail))
    whole = pl.BlockSpec((pl.squeezed, dk, dv), lambda b, i: (b, 0, 0))
    return backend.call(
        functools.partial(_backward_grid_kernel, scale=scale, on_values=on_values), plan,
        grid=(bh, n),
        in_specs=[rev(c, dk), rev(c, 1), rev(c, dk), rev(c, 1), rev(1, 1), rev(c, dk),
                  rev(c, dv), rev(c, dv), whole],
        out_specs=[rev(dk, dv), rev(c, dv), whole], out_shape=out_shape,
        sequential_last=True, scratch_shapes=[backend.vmem((dk, dv))],
        name="gdn_chunk_state_grads")(q, qd_col, k, kd_col, hd, w, d_o, dv_local, dh_last)
  bv = plan.recurrence_value_block(dv, bh, dk, "gdn_chunk_state_grads")
  full, v_blocked, state = _loop_specs(n, dk, bv)
  kernel = functools.partial(_backward_loop_kernel, scale=scale, on_values=on_values)
  if w is None:   # Plan.fuse_wy: T and beta qd in W's place
    wy, wy_specs = (t, bqd_col), [full(c, c), full(c, 1)]
    wy_tiles = [(c, t.dtype), (1, bqd_col.dtype)]
    kernel = functools.partial(kernel, t_mm=plan.t_product(k.dtype))
  else:
    wy, wy_specs, wy_tiles = (w,), [full(c, dk)], [(dk, w.dtype)]
  shared = _value_side_shared(
      plan, dk, bv, c, [(dk, q.dtype), (1, qd_col.dtype), (dk, k.dtype), (1, kd_col.dtype),
                        *wy_tiles, (bv, d_o.dtype), (bv, dv_local.dtype)], k.dtype,
      backward=True)
  return backend.call(
      kernel, plan, grid=(bh, dv // bv),
      in_specs=[layout.sequence(dk), full(c, 1), layout.sequence(dk), full(c, 1), full(1, 1),
                *wy_specs, layout.sequence(dv, bv), v_blocked(c), state],
      out_specs=[v_blocked(dk), v_blocked(c), state], out_shape=out_shape,
      name="gdn_chunk_state_grads", shared_bytes=shared, dk=dk)(
          q, qd_col, k, kd_col, hd, *wy, d_o, dv_local, dh_last)
