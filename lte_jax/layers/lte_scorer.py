"""LTE scorer: a small CNN per KV head that decides which tokens to retain.

PAPER.md section 3. For each KV head h, the input at token t is
concat(key before RoPE, value) [D + Dv] (128 channels with head_dim 64). Three
dilated 1-D convolutions over time (kernel 3, dilation 2, centred "same"
padding) halve the channels each (128 -> 64 -> 32 -> 16), then a 1x1
projection gives one logit; r = sigmoid(logit) - 0.5, retained iff r > 0.
Each layer is ``dropout -> conv -> SiLU -> padding-mask multiply``. The heads
do not share weights: it is a grouped convolution with one group per KV head,
written here as per-tap einsums over a head axis so that a tap can be masked
where it would read another document.

Initialisation follows the reference: conv and projection weights
Kaiming-normal as torch ``kaiming_normal_(a=0, mode='fan_in',
nonlinearity='relu')`` (untruncated normal, std = sqrt(2 / fan_in), fan_in =
input channels per group x kernel size), projection bias ``score_bias_init``
(0.5: every token is retained at the start of training). Conv biases start at
zero here; ModelConfig.init = 'reference' redraws them as the reference has them,
PyTorch's default U(+-1/sqrt(fan_in)) (lte_jax.layers.reference_init).
"""
from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from lte_jax import _checks
from lte_jax import configs as configs_lib
from lte_jax import segments
from lte_jax import sharding as sh
from lte_jax.layers.common import partitioned

_HIGHEST = jax.lax.Precision.HIGHEST


def scorer_channels(in_channels: int, num_convs: int) -> tuple[int, ...]:
  """Channel widths in, after conv 1, ..., after conv n (each halves the previous)."""
  channels = [in_channels]
  for _ in range(num_convs):
    channels.append(channels[-1] // 2)
  if channels[-1] < 1:
    raise ValueError(f"the scorer input of {in_channels} channels cannot be halved "
                     f"{num_convs} times; use a larger head_dim or fewer kernel_sizes")
  return tuple(channels)


def kaiming_normal(fan_in: int, names: tuple):
  """torch kaiming_normal_(mode='fan_in', nonlinearity='relu'): N(0, 2 / fan_in), untruncated."""
  std = math.sqrt(2.0 / fan_in)

  def init(key, shape, dtype=jnp.float32):
    return (std * jax.random.normal(key, shape, jnp.float32)).astype(dtype)

  return partitioned(init, names)


def _document_index(segment_ids: jax.Array) -> jax.Array:
  """[B, T] int32 running count of document starts: equal iff same document."""
  return jnp.cumsum(segments.document_starts(segment_ids).astype(jnp.int32), axis=1)


def _shift(x: jax.Array, offset: int, fill: Any) -> jax.Array:
  """y[:, t] = x[:, t + offset] along axis 1, ``fill`` where t + offset is outside [0, T)."""
  t = x.shape[1]
  if offset == 0:
    return x
  pad = [(0, 0)] * x.ndim
  if abs(offset) >= t:
    return jnp.full_like(x, fill)
  if offset > 0:
    pad[1] = (0, offset)
    return jnp.pad(x[:, offset:], pad, constant_values=fill)
  pad[1] = (-offset, 0)
  return jnp.pad(x[:, :t + offset], pad, constant_values=fill)


class LTEScorer(nnx.Module):
  """``scorer(k_raw [B,T,Hkv,D], v [B,T,Hkv,Dv], segment_ids=None) -> r [B,T,Hkv] f32``.

  With ``segment_ids`` every convolution is computed per document with zero
  padding at the document's edges (a tap never reads another document), and
  padding tokens (id 0) are zeroed after each layer. Dropout (rate
  ``cfg.dropout``) is active in ``train()`` mode, off in ``eval()`` mode.
  """

  def __init__(self, cfg: configs_lib.LTEConfig, *, rngs: nnx.Rngs, head_v_dim: int | None = None,
               dtype: Any = None, param_dtype: Any = jnp.float32):
    if not isinstance(cfg, configs_lib.LTEConfig):
      raise ValueError(f"cfg must be a lte_jax.configs.LTEConfig, got {type(cfg).__name__}")
    self.num_kv_heads = cfg.num_kv_heads
    self.head_dim = cfg.head_dim
    self.head_v_dim = cfg.head_dim if head_v_dim is None else head_v_dim
    _checks.check_positive_int("head_v_dim", self.head_v_dim)
    self.kernel_sizes = tuple(cfg.kernel_sizes)
    self.dilations = tuple(cfg.dilations)
    self.lookahead = cfg.lookahead
    self.channels = scorer_channels(self.head_dim + self.head_v_dim, len(self.kernel_sizes))
    h = cfg.num_kv_heads
    kernels, biases = [], []
    for ksize, c_in, c_out in zip(self.kernel_sizes, self.channels[:-1], self.channels[1:]):
      kinit = kaiming_normal(c_in * ksize, (sh.CONV, sh.KV_HEADS, None, sh.SCORER))
      kernels.append(nnx.Param(kinit(rngs.params(), (ksize, h, c_in, c_out), param_dtype)))
      binit = partitioned(nnx.initializers.zeros_init(), (sh.KV_HEADS, sh.SCORER))
      biases.append(nnx.Param(binit(rngs.params(), (h, c_out), param_dtype)))
    self.conv_kernels = nnx.List(kernels)  # each [K, Hkv, C_in, C_out]
    self.conv_biases = nnx.List(biases)    # each [Hkv, C_out]
    pinit = kaiming_normal(self.channels[-1], (sh.KV_HEADS, sh.SCORER))
    self.proj_kernel = nnx.Param(pinit(rngs.params(), (h, self.channels[-1]), param_dtype))
    bias_init = partitioned(nnx.initializers.constant(cfg.score_bias_init), (sh.KV_HEADS,))
    self.proj_bias = nnx.Param(bias_init(rngs.params(), (h,), param_dtype))
    self.dropout = nnx.Dropout(cfg.dropout, rngs=rngs)
    # None follows the layer's compute dtype, as autocast would.
    low = dtype is not None and jnp.dtype(dtype) == jnp.bfloat16
    self.operand_dtype = jnp.dtype(cfg.scorer_dtype or ("bfloat16" if low else "float32"))

  def _matmul(self, spec: str, x: jax.Array, w: jax.Array) -> jax.Array:
    """fp32 einsum of operands in `operand_dtype` (fp32: full precision; bf16: tensor-core /
    MXU products whose result is rounded to bf16, as under PyTorch's bf16 autocast; XLA's
    CPU dots do not take bf16 operands with an fp32 result)."""
    if self.operand_dtype == jnp.float32:
      return jnp.einsum(spec, x, w.astype(jnp.float32), precision=_HIGHEST)
    low = self.operand_dtype
    return jnp.einsum(spec, x.astype(low), w.astype(low)).astype(jnp.float32)

  def _conv(self, x, kernel, bias, dilation, doc):
    """Centred dilated conv over time, per head. x [B,T,H,Cin] -> [B,T,H,Cout].

    conv(x)[t] = sum over taps of x[t + offset] W_tap = sum of (x W_tap)[t + offset]: one
    product with the taps' weights side by side ([Cin, K * Cout]), then each tap's slice
    of the result shifted in time. Shifting the products rather than the inputs moves
    Cout channels per tap instead of Cin (Cout = Cin / 2 in this CNN) and makes one wide
    matmul of K narrow ones; the document masks are per-token scalars, so they commute
    with the product too. Same rounding points as K separate products (each tap's
    product is rounded to the operand dtype, then the taps are summed in fp32)."""
    ksize, h, c_in, c_out = kernel.shape
    w = jnp.transpose(kernel, (1, 2, 0, 3)).reshape(h, c_in, ksize * c_out)
    y = self._matmul("bthc,hcd->bthd", x, w)               # [B, T, H, K * Cout]
    out = None
    for tap in range(ksize):
      offset = dilation * (tap - (ksize - 1) // 2)
      ys = _shift(y[..., tap * c_out:(tap + 1) * c_out], offset, 0.0)
      if doc is not None and offset != 0:
        same_doc = _shift(doc, offset, -1) == doc  # [B, T]
        ys = ys * same_doc[:, :, None, None].astype(ys.dtype)
      out = ys if out is None else out + ys
    return out + bias.astype(jnp.float32)

  def __call__(self, k_raw: jax.Array, v: jax.Array, *,
               segment_ids: jax.Array | None = None) -> jax.Array:
    _checks.check_rank("k_raw", k_raw, 4, "[batch, time, kv_heads, head_dim]")
    b, t = k_raw.shape[:2]
    _checks.check_shape("k_raw", k_raw, (b, t, self.num_kv_heads, self.head_dim),
                        "[batch, time, kv_heads, head_dim]")
    _checks.check_shape("v", v, (b, t, self.num_kv_heads, self.head_v_dim),
                        "[batch, time, kv_heads, head_v_dim]")
    _checks.check_float_dtype("k_raw", k_raw)
    _checks.check_float_dtype("v", v)
    _checks.check_segment_ids(segment_ids, b, t)
    x = jnp.concatenate([k_raw.astype(jnp.float32), v.astype(jnp.float32)], axis=-1)
    if segment_ids is None:
      doc, keep = None, None
    else:
      doc = _document_index(segment_ids)
      keep = (segment_ids != 0).astype(jnp.float32)[:, :, None, None]
      x = x * keep
    for kernel, bias, dilation in zip(self.conv_kernels, self.conv_biases, self.dilations):
      x = self.dropout(x)
      x = jax.nn.silu(self._conv(x, kernel[...], bias[...], dilation, doc))
      if keep is not None:
        x = x * keep
    logit = (self._matmul("bthc,hc->bth", x, self.proj_kernel[...])
             + self.proj_bias[...].astype(jnp.float32))
    return jax.nn.sigmoid(logit) - 0.5
