"""Kernels of the depthwise causal conv + SiLU (GPU form: the Triton lowering).

Forward, per output row t and channel c (lag = K-1-tap):
  z_t = sum_tap w[tap] m_lag(t) x_{t-lag},   y_t = silu(z_t),   m_lag(t) = [pos_t >= lag]
pos_t is the token's position in its document, so a tap never reads across a document
start; without segment ids every m is 1 and the front zero padding plays that role.
Backward, with dz_t = dy_t silu'(z_t):
  dx_s = sum_lag w[K-1-lag] m_lag(s+lag) dz_{s+lag},   dw[tap] = sum_t m_lag(t) dz_t x_{t-lag}.

Why: in the 0.4B GDN step XLA's conv fusions (forward, remat recompute, weight-gradient
reductions) cost about 40 ms of 295 (the H200 profile, BENCHMARKS.md) where one pass over
the data would take about 5. Each program reads its rows once per shift (the shifted
windows of one tile overlap, so they come from L1/L2) and the backward recomputes z for
the K row shifts it needs instead of storing anything. Alone it is slower than XLA's
fusions (H100, 8 x 4096 x 1024: 0.52 against 0.36 ms fwd+bwd device time), but inside the
step XLA's conv backward is a 1.5 ms-a-layer fusion and these kernels take the 0.4B GDN
step from 0.325 to 0.306 s, so they are the GPU default (BENCHMARKS.md).

The x array arrives padded (api.py): K-1 zero rows in front, so row t of x is row
t + K-1 of the ref and every window start is >= 0; zero rows behind cover the last
tile's forward-shifted reads. dy and pos are padded behind the same way.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from lte_jax.kernels import lowering

F32 = jnp.float32


@dataclasses.dataclass(frozen=True)
class Plan:
  """Static choices for one call (hashable).

  interpret: run with the Pallas interpreter (CPU tests).
  block_t: rows per program (power of two >= 16).
  block_c: channels per program (power of two >= 16; fewer channels are padded to 16).
  backward: 'fused' (one kernel recomputes z at the K row shifts dx needs: K^2 x-window and
    K dy-window loads per tile, mostly L1 hits, nothing stored) or 'split' (one kernel writes
    dz in fp32 and the dw partials from K x windows, a second reads K dz windows for dx:
    fewer loads, one fp32 round trip). Which is faster on a GPU is not measured yet.
  num_warps, num_stages: Triton launch parameters.
  """
  interpret: bool = False
  block_t: int = 32
  block_c: int = 128
  backward: str = "fused"
  num_warps: int = 4
  num_stages: int = 1

  def __post_init__(self):
    lowering.check_block_sizes(self, "block_t", "block_c")
    lowering.check_counts(self, "num_warps", "num_stages")
    if self.backward not in ("fused", "split"):
      raise ValueError(f"backward must be 'fused' or 'split', got {self.backward!r}")

  def channel_block(self, channels: int) -> int:
    return min(self.block_c, max(16, 1 << (channels - 1).bit_length()))


def _rows(ref, start, size):
  return ref[pl.ds(start, size), :]


def _tap_weight(w_ref, tap):
  return w_ref[pl.ds(tap, 1), :]                                 # [1, bc] fp32


def _silu_parts(z):
  sig = 1.0 / (1.0 + jnp.exp(-z))
  return z * sig, sig


def _windows(x_ref, start, size, taps):
  """The K shifted x windows z needs for rows start + [0, size), in x's dtype (half the
  registers of fp32 while they stay live for the weight gradient); tap `tap` reads padded
  rows start + tap. Windows of one tile overlap, so all but one come from L1."""
  return [_rows(x_ref, start + tap, size) for tap in range(taps)]


def _pre_activation(windows, w_ref, pos, *, has_segments):
  """z from the K windows, each tap masked at document starts (pos: in-document positions of
  the rows)."""
  taps, z = len(windows), None
  for tap, window in enumerate(windows):
    lag = taps - 1 - tap
    term = window.astype(F32) * _tap_weight(w_ref, tap)
    if has_segments and lag > 0:
      term = jnp.where(pos >= lag, term, 0.0)
    z = term if z is None else z + term
  return z


def _refs(refs, has_segments, pos_at):
  """The kernel's refs with None in pos's place when there are no segment ids."""
  refs = list(refs)
  if not has_segments:
    refs.insert(pos_at, None)
  return refs


def _grad_pre_activation(windows, w_ref, dy_ref, pos, start, size, *, has_segments):
  """dz = dy silu'(z) for rows start + [0, size), z recomputed from the windows."""
  z = _pre_activation(windows, w_ref, pos, has_segments=has_segments)
  _, sig = _silu_parts(z)
  return _rows(dy_ref, start, size).astype(F32) * sig * (1.0 + z * (1.0 - sig))


def _forward_kernel(*refs, taps, block_t, has_segments):
  x_ref, w_ref, pos_ref, y_ref = _refs(refs, has_segments, 2)
  t0 = pl.program_id(1) * block_t
  pos = _rows(pos_ref, t0, block_t) if has_segments else None
  z = _pre_activation(_windows(x_ref, t0, block_t, taps), w_ref, pos,
                      has_segments=has_segments)
  y_ref[...] = _silu_parts(z)[0].astype(y_ref.dtype)


def _backward_kernel(*refs, taps, block_t, has_segments):
  x_ref, w_ref, pos_ref, dy_ref, dx_ref, dw_ref = _refs(refs, has_segments, 2)
  s0 = pl.program_id(1) * block_t
  dx = None
  for lag in range(taps):
    # dz at rows s + lag, which read x_s through tap K-1-lag.
    pos = _rows(pos_ref, s0 + lag, block_t) if has_segments else None
    windows = _windows(x_ref, s0 + lag, block_t, taps)
    dz = _grad_pre_activation(windows, w_ref, dy_ref, pos, s0 + lag, block_t,
                              has_segments=has_segments)
    if lag == 0:
      _weight_grads(dw_ref, windows, dz, pos, has_segments=has_segments)
    term = dz * _tap_weight(w_ref, taps - 1 - lag)
    if has_segments and lag > 0:
      term = jnp.where(pos >= lag, term, 0.0)
    dx = term if dx is None else dx + term
  dx_ref[...] = dx.astype(dx_ref.dtype)


def _weight_grads(dw_ref, windows, dz, pos, *, has_segments):
  """This tile's dw[tap] = sum over its rows t of m_lag(t) dz_t x_{t-lag}, from the windows
  that gave its z."""
  taps, width = len(windows), dw_ref.shape[1]
  for tap in range(dw_ref.shape[0]):
    if tap >= taps:                                              # power-of-two padding
      dw_ref[pl.ds(tap, 1), :] = jnp.zeros((1, width), dw_ref.dtype)
      continue
    prod = dz * windows[tap].astype(F32)
    if has_segments and taps - 1 - tap > 0:
      prod = jnp.where(pos >= taps - 1 - tap, prod, 0.0)
    dw_ref[pl.ds(tap, 1), :] = jnp.sum(prod, axis=0, keepdims=True)


def _dz_kernel(*refs, taps, block_t, has_segments):
  """Split backward, first half: dz and the dw partials of one tile (one set of windows)."""
  x_ref, w_ref, pos_ref, dy_ref, dz_ref, dw_ref = _refs(refs, has_segments, 2)
  s0 = pl.program_id(1) * block_t
  pos = _rows(pos_ref, s0, block_t) if has_segments else None
  windows = _windows(x_ref, s0, block_t, taps)
  dz = _grad_pre_activation(windows, w_ref, dy_ref, pos, s0, block_t,
                            has_segments=has_segments)
  dz_ref[...] = dz
  _weight_grads(dw_ref, windows, dz, pos, has_segments=has_segments)


def _dx_kernel(*refs, taps, block_t, has_segments):
  """Split backward, second half: dx_s = sum_lag w[K-1-lag] m_lag(s+lag) dz_{s+lag}."""
  dz_ref, w_ref, pos_ref, dx_ref = _refs(refs, has_segments, 2)
  s0 = pl.program_id(1) * block_t
  dx = None
  for lag in range(taps):
    term = _rows(dz_ref, s0 + lag, block_t) * _tap_weight(w_ref, taps - 1 - lag)
    if has_segments and lag > 0:
      term = jnp.where(_rows(pos_ref, s0 + lag, block_t) >= lag, term, 0.0)
    dx = term if dx is None else dx + term
  dx_ref[...] = dx.astype(dx_ref.dtype)


def _call(kernel, plan: Plan, *, grid, in_specs, out_specs, out_shape, name) -> Any:
  return lowering.call(kernel, platform="gpu", interpret=plan.interpret, grid=grid,
                       in_specs=in_specs, out_specs=out_specs, out_shape=out_shape, name=name,
                       num_warps=plan.num_warps, num_stages=plan.num_stages)


def _whole_time(length: int, width: int) -> pl.BlockSpec:
  """All rows of one (batch, channel block): the kernels slice their own windows."""
  return pl.BlockSpec((pl.squeezed, length, width), lambda b, i, j: (b, 0, j))


def _tile(rows: int, width: int) -> pl.BlockSpec:
  return pl.BlockSpec((pl.squeezed, rows, width), lambda b, i, j: (b, i, j))


def _common_specs(x_pad, w, pos, bc: int) -> tuple[list, list]:
  """Specs and arguments the two kernels share: x (and pos) whole in time, w by channels."""
  in_specs = [_whole_time(x_pad.shape[1], bc),
              pl.BlockSpec((w.shape[0], bc), lambda b, i, j: (0, j))]
  args = [x_pad, w]
  if pos is not None:
    in_specs.append(pl.BlockSpec((pl.squeezed, pos.shape[1], 1), lambda b, i, j: (b, 0, 0)))
    args.append(pos)
  return in_specs, args


def forward(plan: Plan, x_pad, w, pos, *, taps: int, rows: int, out_dtype) -> jax.Array:
  """x_pad [B, K-1 + rows + pad, C]; w [Kp, C] fp32; pos [B, rows + pad, 1] int32 or None
  -> y [B, rows, C] (rows a multiple of block_t, C of the channel block)."""
  batch, length, channels = x_pad.shape
  bt, bc = plan.block_t, plan.channel_block(channels)
  in_specs, args = _common_specs(x_pad, w, pos, bc)
  kernel = functools.partial(_forward_kernel, taps=taps, block_t=bt,
                             has_segments=pos is not None)
  return _call(kernel, plan, grid=(batch, rows // bt, channels // bc), in_specs=in_specs,
               out_specs=[_tile(bt, bc)],
               out_shape=[jax.ShapeDtypeStruct((batch, rows, channels), out_dtype)],
               name="short_conv_fwd")(*args)[0]


def backward(plan: Plan, x_pad, w, pos, dy_pad, *, taps: int, rows: int
             ) -> tuple[jax.Array, jax.Array]:
  """x_pad as `forward`; dy_pad [B, rows + block_t, C], zero past the sequence
  -> (dx [B, rows, C] in x's dtype, dw partials [B, tiles, Kp, C] fp32)."""
  batch, _, channels = x_pad.shape
  bt, bc = plan.block_t, plan.channel_block(channels)
  kp, tiles = w.shape[0], rows // bt
  has_segments = pos is not None
  dw_spec = pl.BlockSpec((pl.squeezed, pl.squeezed, kp, bc), lambda b, i, j: (b, i, 0, j))
  in_specs, args = _common_specs(x_pad, w, pos, bc)
  if plan.backward == "fused":
    kernel = functools.partial(_backward_kernel, taps=taps, block_t=bt, has_segments=has_segments)
    return _call(
        kernel, plan, grid=(batch, tiles, channels // bc),
        in_specs=in_specs + [_whole_time(dy_pad.shape[1], bc)],
        out_specs=[_tile(bt, bc), dw_spec],
        out_shape=[jax.ShapeDtypeStruct((batch, rows, channels), x_pad.dtype),
                   jax.ShapeDtypeStruct((batch, tiles, kp, channels), F32)],
        name="short_conv_bwd")(*args, dy_pad)
  # Split: dz over one tile more than the output, so the dx kernel's forward-shifted windows
  # of the last tile read zeros (dy is zero there) rather than past the buffer.
  kernel = functools.partial(_dz_kernel, taps=taps, block_t=bt, has_segments=has_segments)
  dz, dw = _call(
      kernel, plan, grid=(batch, tiles + 1, channels // bc),
      in_specs=in_specs + [_whole_time(dy_pad.shape[1], bc)],
      out_specs=[_tile(bt, bc), dw_spec],
      out_shape=[jax.ShapeDtypeStruct((batch, rows + bt, channels), F32),
                 jax.ShapeDtypeStruct((batch, tiles + 1, kp, channels), F32)],
      name="short_conv_bwd_dz")(*args, dy_pad)
  dx_specs = [_whole_time(rows + bt, bc), in_specs[1]] + in_specs[2:]
  kernel = functools.partial(_dx_kernel, taps=taps, block_t=bt, has_segments=has_segments)
  dx = _call(kernel, plan, grid=(batch, tiles, channels // bc), in_specs=dx_specs,
             out_specs=[_tile(bt, bc)],
             out_shape=[jax.ShapeDtypeStruct((batch, rows, channels), x_pad.dtype)],
             name="short_conv_bwd_dx")(dz, *args[1:])[0]
  return dx, dw
