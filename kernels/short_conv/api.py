"""The short conv on the Pallas kernels: padding glue and the custom VJP."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from lte_jax import segments
from lte_jax.kernels.short_conv import kernel
from lte_jax.kernels.short_conv.kernel import F32, Plan


def _round_up(n: int, m: int) -> int:
  return -(-n // m) * m


def _pad(a: jax.Array, front: int, back: int, channels: int = 0) -> jax.Array:
  """Zero rows before/after the time axis (1) and columns after the last axis."""
  if not (front or back or channels):
    return a
  return jnp.pad(a, ((0, 0), (front, back), (0, channels)))


def _geometry(plan: Plan, x: jax.Array, weight: jax.Array):
  """(taps K, padded taps, rows: T up to whole tiles, padded channels)."""
  taps, (_, t, c) = weight.shape[0], x.shape
  if taps - 1 > plan.block_t:
    raise ValueError(f"kernel_size - 1 = {taps - 1} must not exceed block_t={plan.block_t}")
  bc = plan.channel_block(c)
  return taps, 1 << (taps - 1).bit_length(), _round_up(t, plan.block_t), _round_up(c, bc)


def _operands(plan: Plan, x, weight, pos, dy=None):
  """x with K-1 zero rows in front and one tile's rows behind the last whole tile (the
  backward's forward-shifted windows and the split backward's extra dz tile read there),
  w as fp32 [Kp, Cp], pos as [B, rows + block_t, 1]; with dy, also dy padded behind like x
  (zero past the sequence)."""
  taps, kp, rows, cp = _geometry(plan, x, weight)
  t, c = x.shape[1:]
  back = rows - t + plan.block_t
  x_pad = _pad(x, taps - 1, back, cp - c)
  w_pad = jnp.pad(weight.astype(F32), ((0, kp - taps), (0, cp - c)))
  pos_pad = None if pos is None else _pad(pos[..., None], 0, back)
  if dy is None:
    return x_pad, w_pad, pos_pad
  return x_pad, w_pad, pos_pad, _pad(dy.astype(x.dtype), 0, back, cp - c)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _short_conv(plan: Plan, x, weight, pos):
  taps, _, rows, _ = _geometry(plan, x, weight)
  y = kernel.forward(plan, *_operands(plan, x, weight, pos), taps=taps, rows=rows,
                     out_dtype=x.dtype)
  return y[:, :x.shape[1], :x.shape[2]]


def _short_conv_fwd(plan, x, weight, pos):
  # Residuals are the inputs: the backward recomputes z per row shift.
  return _short_conv(plan, x, weight, pos), (x, weight, pos)


def _short_conv_bwd(plan, residuals, dy):
  x, weight, pos = residuals
  taps, _, rows, _ = _geometry(plan, x, weight)
  t, c = x.shape[1:]
  dx, dw = kernel.backward(plan, *_operands(plan, x, weight, pos, dy), taps=taps, rows=rows)
  dw = jnp.sum(dw, axis=(0, 1))[:taps, :c]
  return dx[:, :t, :c], dw.astype(weight.dtype), None


_short_conv.defvjp(_short_conv_fwd, _short_conv_bwd)


def short_conv_pallas(x: jax.Array, weight: jax.Array, segment_ids: jax.Array | None = None, *,
                      interpret: bool | None = None, **plan_options) -> jax.Array:
  """Same contract as lte_jax.ops.short_conv (arguments validated there).

  x [B, T, C]; weight [K, C]; segment_ids [B, T] or None -> silu(causal depthwise
  conv) [B, T, C] in x.dtype, fp32 inside. interpret: Pallas interpreter (None: on CPU
  only); plan_options: fields of Plan (block_t, block_c, backward, num_warps, num_stages).
  """
  if interpret is None:
    interpret = jax.default_backend() == "cpu"
  plan = Plan(interpret=interpret, **plan_options)
  pos = None if segment_ids is None else segments.positions_from_segment_ids(segment_ids)
  return _short_conv(plan, x, weight, pos)
