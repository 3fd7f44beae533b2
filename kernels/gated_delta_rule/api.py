"""chunk_gated_delta_rule on Pallas kernels: layout glue and the custom VJP.

Pipeline (kernel modules in brackets), per (batch*head, chunk):
  forward:  T = (I + A)^-1 [inverse] -> WY transform [prepare] -> state
            recurrence [state] -> outputs [output]
  backward: W, U and the per-chunk states (kept from the forward, or recomputed),
            dV_local [output], reverse recurrence [state], per-chunk dq, dk, dW
            [qk_grads], WY backward (dv, dbeta, the rest of dk) [wy_grads].
The backward keeps the inputs and T (C values per token) and recomputes W, h and V_new
as FLA does; Plan.keep_states (opt-in) keeps those instead, which the forward writes to
HBM anyway (memory for time).

The glue here is plain jnp, almost all on [B, T, H] scalars (cheap next to the
[B, T, H, D] tensors): padding, the chunk layout [B*H, N, C] of the scalars,
in-chunk cumulative decay G, document indices, and the decays the kernels
consume (qd, kd, hd below). Token tensors keep [B, T, H, D] on GPU and are
transposed to [B*H, N, C, D] for TPU only (backend.Layout). The gradients of
the scalars flow back to g through ordinary autodiff; the custom VJP covers the
kernels only.
"""
from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp

from lte_jax import remat, segments
from lte_jax.kernels.gated_delta_rule import (backend, inverse, output, prepare, qk_grads,
                                              state, wy_grads)
from lte_jax.kernels.gated_delta_rule.chunk_math import masked_exp

F32 = jnp.float32


@dataclasses.dataclass(frozen=True)
class _Static:
  plan: backend.Plan
  layout: backend.Layout
  scale: float
  state_dtype: str = "float32"    # stored per-chunk states, WY factors and V_new


def _col(x):   # [BH, N, C] -> [BH, N, C, 1]
  return x[..., None]


def _row(x):   # [BH, N, C] -> [BH, N, 1, C]
  return x[..., None, :]


def _decays(g_cum, seg):
  """What every kernel takes to build its in-chunk decays: G as columns and rows, in base
  2 (chunk_math.decay_masks uses exp2; the kernels' dG outputs are still d/dG, being
  dD * D sums, so nothing converts back), and the document index likewise."""
  g2 = g_cum * math.log2(math.e)
  return _col(g2), _row(g2), _col(seg), _row(seg)


def _inverse(cfg, k, beta, g_cum, seg):
  return inverse.wy_inverse(cfg.plan, cfg.layout, k, _col(beta), *_decays(g_cum, seg))


def _states(cfg, t, k, v, beta, qd, kd, hd, h0):
  sd = jnp.dtype(cfg.state_dtype)
  w, u = prepare.wy_transform(cfg.plan, cfg.layout, t, k, v, _row(beta), _row(beta * qd),
                              state_dtype=sd)
  h, v_new, h_last = state.chunk_states(cfg.plan, cfg.layout, w, u, k, _col(kd), hd, h0,
                                        state_dtype=sd)
  return w, h, v_new, h_last


def _outputs(cfg, q, k, v, g_cum, seg, qd, h, v_new):
  return output.chunk_outputs(cfg.plan, cfg.layout, q, k, *_decays(g_cum, seg), _col(qd), h,
                              v_new, scale=cfg.scale, out_dtype=v.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _core(cfg: _Static, q, k, v, beta, g_cum, seg, qd, kd, hd, h0):
  """Chunk-layout op. q, k [BH, N, C, Dk]; v [BH, N, C, Dv]; beta, g_cum, seg, qd, kd
  [BH, N, C] fp32; hd [BH, N, 1, 1]; h0 [BH, Dk, Dv] -> (o [BH, N, C, Dv] in v.dtype,
  final state [BH, Dk, Dv] fp32)."""
  o, h_last, _ = _forward(cfg, q, k, v, beta, g_cum, seg, qd, kd, hd, h0)
  return o, h_last


def _fused_states(cfg, t, k, v, beta, qd, kd, hd, h0):
  """Plan.fuse_wy: (h, V_new, h_last) from T directly; no W."""
  return state.fused_chunk_states(cfg.plan, cfg.layout, t, k, v, _col(beta), _col(beta * qd),
                                  _col(kd), hd, h0, state_dtype=jnp.dtype(cfg.state_dtype))


def _forward(cfg, q, k, v, beta, g_cum, seg, qd, kd, hd, h0):
  """-> (o, final state, (T, W, h, V_new)); W is None where the forward never forms it
  (Plan.fuses_wy: the backward recomputes what it needs)."""
  t = _inverse(cfg, k, beta, g_cum, seg)
  if cfg.plan.fuses_wy:
    w = None
    h, v_new, h_last = _fused_states(cfg, t, k, v, beta, qd, kd, hd, h0)
  else:
    w, h, v_new, h_last = _states(cfg, t, k, v, beta, qd, kd, hd, h0)
  return _outputs(cfg, q, k, v, g_cum, seg, qd, h, v_new), h_last, (t, w, h, v_new)


def _core_fwd(cfg, *args):
  o, h_last, (t, *states) = _forward(cfg, *args)
  # Tagged, a block under the 'dots_mixers' remat policy keeps T rather than rerun the
  # inverse kernel in the backward pass (lte_jax.remat).
  (t,) = remat.tag(remat.KERNEL_RESIDUALS, t)
  # Plan.keep_states: the backward reuses W, h, V_new instead of recomputing them.
  return (o, h_last), (t, tuple(states) if cfg.plan.keep_states else None, args)


def _dv_local(cfg, args, d_o):
  q, k, _, _, g_cum, seg, *_ = args
  return output.local_value_grads(cfg.plan, cfg.layout, q, k, *_decays(g_cum, seg), d_o,
                                  scale=cfg.scale)


def _state_grads(cfg, args, w, d_o, dv_local, dh_last, t=None):
  """W, or with w None (Plan.fuse_wy) T, enters the W^T dV term."""
  q, k, _, beta, _, _, qd, kd, hd, _ = args
  # dV_new only enters products rounded to the WY operands' dtype (qk_grads, wy_grads):
  # stored so, it is half the traffic in bf16 and changes no result.
  return state.chunk_state_grads(cfg.plan, cfg.layout, q, _col(qd), k, _col(kd), hd, w, d_o,
                                 dv_local, dh_last, scale=cfg.scale,
                                 state_dtype=jnp.dtype(cfg.state_dtype),
                                 dv_dtype=cfg.plan.wy_dtype(k.dtype), t=t,
                                 bqd_col=None if w is not None else _col(beta * qd))


def _qk_grads(cfg, args, h, dh, v_new, dv_new, d_o):
  q, k, _, _, g_cum, seg, qd, kd, _, _ = args
  return qk_grads.chunk_qk_grads(
      cfg.plan, cfg.layout, q, k, *_decays(g_cum, seg), _col(qd), _col(kd), h, dh, v_new,
      dv_new, d_o, dw_dtype=cfg.plan.wy_dtype(k.dtype), scale=cfg.scale)


def _wy_grads(cfg, args, t, dv_new, dw, dk_part):
  _, k, v, beta, g_cum, seg, qd, *_ = args
  return wy_grads.wy_grads(cfg.plan, cfg.layout, t, k, v, _col(beta), *_decays(g_cum, seg),
                           _col(qd), dv_new, dw, dk_part)


def _core_bwd(cfg, residuals, cotangents):
  t, states, args = residuals
  _, k, v, beta, _, seg, qd, kd, hd, h0 = args
  d_o, dh_last = cotangents
  if states is not None:
    w, h, v_new = states
  elif cfg.plan.fuses_wy:
    # Neither recurrence needs W: the backward skips the WY transform as the forward did.
    w = None
    h, v_new, _ = _fused_states(cfg, t, k, v, beta, qd, kd, hd, h0)
  else:
    w, h, v_new, _ = _states(cfg, t, k, v, beta, qd, kd, hd, h0)
  dv_local = _dv_local(cfg, args, d_o)
  dh, dv_new, dh0 = _state_grads(cfg, args, w, d_o, dv_local, dh_last, t=t)
  dq, dk_part, dw, dqd, dkd, dhd, dg_col, dg_row = _qk_grads(cfg, args, h, dh, v_new, dv_new,
                                                             d_o)
  dk, dv, dbeta, dqd_wy, dg_col_wy, dg_row_wy = _wy_grads(cfg, args, t, dv_new, dw, dk_part)
  dg = dg_col[..., 0] + dg_row[..., 0, :] + dg_col_wy[..., 0] + dg_row_wy[..., 0, :]
  return (dq, dk, dv, dbeta[..., 0], dg, jnp.zeros_like(seg), dqd[..., 0] + dqd_wy[..., 0],
          dkd[..., 0], dhd, dh0)


_core.defvjp(_core_fwd, _core_bwd)


def _dim_for_kernels(d: int) -> int:
  """Head dims padded to a power of two >= 16 (Triton blocks; zero columns are inert)."""
  return max(16, 1 << (d - 1).bit_length())


def core_inputs(q, k, v, g, beta, *, scale: float, initial_state=None, segment_ids=None,
                chunk_size: int = 64, platform: str | None = None, interpret: bool | None = None,
                **plan_options) -> tuple[_Static, tuple]:
  """The kernels' static config and the chunk-layout arguments of `_core` (arguments as
  `chunk_gated_delta_rule_pallas`). Public so benchmarks can time the stages one by one
  (`stage_functions`)."""
  backend.check_plan_options(plan_options)
  if interpret is None:
    interpret = jax.default_backend() == "cpu"
  plan = backend.Plan(platform or backend.default_platform(), interpret=interpret,
                      chunk=chunk_size, **plan_options)
  batch, time, heads, dk = q.shape
  dv = v.shape[-1]
  c = plan.chunk
  n = math.ceil(time / c)
  pad = n * c - time
  dk_p, dv_p = _dim_for_kernels(dk), _dim_for_kernels(dv)

  layout = backend.Layout(batch=batch, heads=heads, chunks=n, chunk=c,
                          native=plan.platform == "gpu")

  def tensor(x, d_pad):   # [B, T, H, D] -> layout.shape(D'); no copy when nothing pads
    if pad or d_pad != x.shape[-1]:
      x = jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, d_pad - x.shape[-1])))
    return x if layout.native else jnp.swapaxes(x, 1, 2).reshape(layout.shape(d_pad))

  def scalar(x):           # [B, T, H] -> [BH, N, C] fp32; padding tokens get 0
    x = jnp.pad(x.astype(F32), ((0, 0), (0, pad), (0, 0)))
    return jnp.swapaxes(x, 1, 2).reshape(batch * heads, n, c)

  # Padding tokens: g = 0, beta = 0, k = 0 and no document start: the state
  # passes through them unchanged.
  g_c, beta_c = scalar(g), scalar(beta)
  if segment_ids is None:
    seg = jnp.zeros_like(g_c)
  else:
    # initial_state belongs to the row's first document: t = 0 is no restart.
    starts = segments.document_starts(segment_ids).at[:, 0].set(False)
    starts = jnp.pad(starts, ((0, 0), (0, pad))).reshape(batch, 1, n, c)
    seg = jnp.cumsum(starts.astype(F32), axis=-1)                  # document index in chunk
    seg = jnp.broadcast_to(seg, (batch, heads, n, c)).reshape(batch * heads, n, c)
  g_cum = jnp.cumsum(g_c, axis=-1)
  g_last, seg_last = g_cum[..., -1:], seg[..., -1:]
  # G_last - G_j summed directly (g_{j+1} + ... + g_last): as a difference, its
  # gradient at j = last would be two O(1) terms cancelling to rounding noise.
  g_after = jnp.flip(jnp.cumsum(jnp.flip(g_c[..., 1:], -1), axis=-1), -1)
  g_after = jnp.pad(g_after, ((0, 0), (0, 0), (0, 1)))
  qd = masked_exp(g_cum, seg == 0)                        # token reads the incoming state
  kd = masked_exp(g_after, seg == seg_last)               # token writes the outgoing state
  hd = masked_exp(g_last, seg_last == 0)[..., None]       # incoming state survives the chunk

  if initial_state is None:
    h0 = jnp.zeros((batch * heads, dk_p, dv_p), F32)
  else:
    h0 = jnp.pad(initial_state.astype(F32), ((0, 0), (0, 0), (0, dk_p - dk), (0, dv_p - dv)))
    h0 = h0.reshape(batch * heads, dk_p, dv_p)

  # bf16 training stores the per-chunk intermediates in bf16, as FLA does: half the
  # traffic, and on CPU (T = 512, D = 128) the errors against the reference stay
  # those of fp32 storage except the final state's (1.6e-3, bound 5e-3).
  low = all(x.dtype == jnp.bfloat16 for x in (q, k, v))
  cfg = _Static(plan=plan, layout=layout, scale=float(scale),
                state_dtype="bfloat16" if low else "float32")
  return cfg, (tensor(q, dk_p), tensor(k, dk_p), tensor(v, dv_p), beta_c, g_cum, seg, qd, kd,
               hd, h0)


def stage_functions(cfg: _Static) -> dict:
  """name -> f(*core args, *extra) for timing each stage on its own (jit them):
  'inverse' (args) -> T; 'states' (args, T) -> (W, h, V_new, h_last) [prepare + recurrence;
  W None under Plan.fuse_wy, which has no prepare];
  'output' (args, h, V_new) -> o; 'backward' (args, T, d_o, dh_last[, W, h, V_new: what
  Plan.keep_states keeps]) -> input grads; and the
  backward's own kernels: 'dv_local' (args, d_o); 'state_grads' (args, W, d_o, dV_local,
  dh_last, T) -> (dh, dV_new, dh0) (T is read where W is None); 'qk_grads' (args, h, dh, V_new, dV_new, d_o) -> (dq,
  dk_part, dW, ...); 'wy_grads' (args, T, dV_new, dW, dk_part)."""
  def inverse(*args):
    _, k, _, beta, g_cum, seg, *_ = args
    return _inverse(cfg, k, beta, g_cum, seg)

  def states(*args_t):
    *args, t = args_t
    _, k, v, beta, _, _, qd, kd, hd, h0 = args
    if cfg.plan.fuses_wy:
      return (None, *_fused_states(cfg, t, k, v, beta, qd, kd, hd, h0))
    return _states(cfg, t, k, v, beta, qd, kd, hd, h0)

  def outputs(*args_h):
    *args, h, v_new = args_h
    q, k, v, _, g_cum, seg, qd, *_ = args
    return _outputs(cfg, q, k, v, g_cum, seg, qd, h, v_new)

  n = 10   # core arguments

  def backward_(*args_rest):
    args, (t, d_o, dh_last, *states) = args_rest[:n], args_rest[n:]
    return _core_bwd(cfg, (t, tuple(states) or None, tuple(args)), (d_o, dh_last))

  return {"inverse": inverse, "states": states, "output": outputs, "backward": backward_,
          "dv_local": lambda *a: _dv_local(cfg, a[:n], *a[n:]),
          "state_grads": lambda *a: _state_grads(cfg, a[:n], *a[n:n + 4], t=a[n + 4]),
          "qk_grads": lambda *a: _qk_grads(cfg, a[:n], *a[n:]),
          "wy_grads": lambda *a: _wy_grads(cfg, a[:n], *a[n:])}


def chunk_gated_delta_rule_pallas(q: jax.Array, k: jax.Array, v: jax.Array, g: jax.Array,
                                  beta: jax.Array, *, scale: float,
                                  initial_state: jax.Array | None = None,
                                  output_final_state: bool = False,
                                  segment_ids: jax.Array | None = None, chunk_size: int = 64,
                                  platform: str | None = None,
                                  interpret: bool | None = None, **plan_options,
                                  ) -> tuple[jax.Array, jax.Array | None]:
  """Same contract as lte_jax.ops.chunk_gated_delta_rule (arguments validated there).

  q, k [B, T, H, Dk]; v [B, T, H, Dv]; g, beta [B, T, H]; initial_state
  [B, H, Dk, Dv]; segment_ids [B, T]. platform: 'gpu' or 'tpu' kernels (None: this
  backend's); interpret: Pallas interpreter (None: on CPU only); plan_options:
  tuning fields of backend.Plan (block_v, num_warps, num_stages, inverse_precision).
  Returns o [B, T, H, Dv] in v.dtype and the final state [B, H, Dk, Dv] fp32 or None.
  """
  cfg, args = core_inputs(q, k, v, g, beta, scale=scale, initial_state=initial_state,
                          segment_ids=segment_ids, chunk_size=chunk_size, platform=platform,
                          interpret=interpret, **plan_options)
  batch, time, heads, dk = q.shape
  dv = v.shape[-1]
  o, h_last = _core(cfg, *args)            # padded: T to whole chunks, D to _dim_for_kernels
  dk_p, dv_p = h_last.shape[-2:]
  if not cfg.layout.native:
    o = jnp.swapaxes(o.reshape(batch, heads, -1, dv_p), 1, 2)
  if o.shape[1] != time or dv_p != dv:
    o = o[:, :time, :, :dv]
  if not output_final_state:
    return o, None
  return o, h_last.reshape(batch, heads, dk_p, dv_p)[..., :dk, :dv]
