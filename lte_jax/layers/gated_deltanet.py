"""Gated DeltaNet mixer (PAPER.md section 2; the reference's GatedDeltaNet layer).

Data flow, x [B, T, D]:
  q, k = L2norm(silu(conv(q_proj x))), L2norm(silu(conv(k_proj x)))   [B, T, H, Dk]
  v    = silu(conv(v_proj x))                                         [B, T, H, Dv]
  beta = sigmoid(b_proj x);  g = -exp(A_log) * softplus(a_proj x + dt_bias)   [B, T, H]
  o    = gated_delta_rule(q, k, v, g, beta, scale=Dk^-1/2)            [B, T, H, Dv]
  y    = o_proj(RMSNorm_Dv(o) * silu(g_proj x))                       [B, T, D]
"""
from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from lte_jax import _checks
from lte_jax import remat
from lte_jax import sharding as sh
from lte_jax.configs import GDNConfig
from lte_jax.kernels.gated_delta_rule import parse_options
from lte_jax.layers.common import kernel_plan_options, linear, output_std, partitioned
from lte_jax.layers.norm import GatedRMSNorm
from lte_jax.layers.short_conv import ShortConv
from lte_jax.ops.gated_delta_rule import (chunk_gated_delta_rule, default_implementation,
                                          recurrent_gated_delta_rule)

# Decay initialisation of the reference (Mamba-2 style).
A_INIT_RANGE = (0.0, 16.0)
DT_MIN, DT_MAX, DT_FLOOR = 1e-3, 0.1, 1e-4
L2_EPS = 1e-6


def l2_normalize(x: jax.Array, eps: float = L2_EPS) -> jax.Array:
  """x / sqrt(sum(x^2) + eps) over the last axis, in float32, back to x's dtype."""
  xf = x.astype(jnp.float32)
  return (xf * jax.lax.rsqrt(jnp.sum(xf * xf, axis=-1, keepdims=True) + eps)).astype(x.dtype)


def init_A_log(key: jax.Array, shape, dtype=jnp.float32) -> jax.Array:
  """log(A), A ~ U(0, 16], kept away from 0 so the log is finite."""
  lo, hi = A_INIT_RANGE
  a = jax.random.uniform(key, shape, jnp.float32, minval=lo, maxval=hi)
  a = jnp.where(a > 0, a, hi)  # a draw of exactly 0 would give log(0) = -inf
  return jnp.log(a).astype(dtype)


def init_dt_bias(key: jax.Array, shape, dtype=jnp.float32) -> jax.Array:
  """inverse_softplus(dt), dt log-uniform in [1e-3, 0.1], floored at 1e-4."""
  u = jax.random.uniform(key, shape, jnp.float32)
  dt = jnp.exp(u * (math.log(DT_MAX) - math.log(DT_MIN)) + math.log(DT_MIN))
  dt = jnp.maximum(dt, DT_FLOOR)
  # softplus(dt + log(1 - exp(-dt))) == dt; expm1 keeps it exact for small dt.
  return (dt + jnp.log(-jnp.expm1(-dt))).astype(dtype)


class GatedDeltaNet(nnx.Module):
  """Gated DeltaNet mixer; implements the mixer protocol (see WORKSPACE.md).

  Parameters ``A_log`` [H] and ``dt_bias`` [H] take no weight decay (select them
  by name). Cache: {'conv_q', 'conv_k', 'conv_v': [B, K-1, C], 'state':
  [B, H, Dk, Dv] float32, 'pos': int32 scalar}.
  """

  def __init__(self, cfg: GDNConfig, d_model: int, *, num_layers: int, init_std: float,
               dtype: Any = None, param_dtype: Any = jnp.float32, rngs: nnx.Rngs):
    if not isinstance(cfg, GDNConfig):
      raise ValueError(f"cfg must be a lte_jax.configs.GDNConfig, got {type(cfg).__name__}")
    _checks.check_positive_int("d_model", d_model)
    _checks.check_positive_int("num_layers", num_layers)
    self.cfg, self.d_model, self.dtype = cfg, d_model, dtype
    try:
      parse_options(cfg.plan_options)    # a bad field fails here, not at the first call
    except ValueError as err:
      raise ValueError(f"GDNConfig.plan_options={cfg.plan_options!r}: {err}") from None
    h, dk, dv = cfg.num_heads, cfg.head_dim, cfg.head_v_dim
    self.num_heads, self.head_k_dim, self.head_v_dim = h, dk, dv
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.q_proj = linear(d_model, h * dk, names=(sh.EMBED, sh.HEADS), std=init_std, **kw)
    self.k_proj = linear(d_model, h * dk, names=(sh.EMBED, sh.HEADS), std=init_std, **kw)
    self.v_proj = linear(d_model, h * dv, names=(sh.EMBED, sh.HEADS), std=init_std, **kw)
    self.a_proj = linear(d_model, h, names=(sh.EMBED, sh.HEADS), std=init_std, **kw)
    self.b_proj = linear(d_model, h, names=(sh.EMBED, sh.HEADS), std=init_std, **kw)
    self.g_proj = linear(d_model, h * dv, names=(sh.EMBED, sh.HEADS), std=init_std, **kw)
    self.o_proj = linear(h * dv, d_model, names=(sh.HEADS, sh.EMBED),
                         std=output_std(init_std, num_layers), **kw)
    conv_kw = dict(init_std=init_std, implementation=cfg.conv_implementation, **kw)
    self.q_conv = ShortConv(h * dk, cfg.conv_size, **conv_kw)
    self.k_conv = ShortConv(h * dk, cfg.conv_size, **conv_kw)
    self.v_conv = ShortConv(h * dv, cfg.conv_size, **conv_kw)
    self.A_log = nnx.Param(partitioned(init_A_log, (sh.HEADS,))(rngs.params(), (h,),
                                                                 param_dtype))
    self.dt_bias = nnx.Param(partitioned(init_dt_bias, (sh.HEADS,))(rngs.params(), (h,),
                                                                     param_dtype))
    self.o_norm = GatedRMSNorm(dv, eps=cfg.norm_eps, dtype=dtype, param_dtype=param_dtype)

  # ---- pieces shared by the training and decoding paths ----

  def _check_x(self, x: jax.Array, name: str = "x") -> None:
    _checks.check_shape(name, x, (None, None, self.d_model), "[batch, time, d_model]")
    _checks.check_float_dtype(name, x)

  def _heads(self, x: jax.Array, dim: int) -> jax.Array:
    out = x.reshape(*x.shape[:2], self.num_heads, dim)
    return sh.constrain(out, (sh.BATCH, sh.LENGTH, sh.ACT_HEADS, None))

  def _gates(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(g, beta), both [B, T, H] float32; g <= 0 is the per-token log decay."""
    beta = jax.nn.sigmoid(self.b_proj(x).astype(jnp.float32))
    a = self.a_proj(x).astype(jnp.float32) + self.dt_bias[...].astype(jnp.float32)
    g = -jnp.exp(self.A_log[...].astype(jnp.float32)) * jax.nn.softplus(a)
    return g, beta

  def _qkv(self, q, k, v):
    q = l2_normalize(self._heads(q, self.head_k_dim))
    k = l2_normalize(self._heads(k, self.head_k_dim))
    return q, k, self._heads(v, self.head_v_dim)

  def _output(self, o: jax.Array, x: jax.Array) -> jax.Array:
    gate = self._heads(self.g_proj(x), self.head_v_dim)
    o = self.o_norm(o.astype(gate.dtype), gate)
    y = self.o_proj(o.reshape(*o.shape[:2], -1))
    return sh.constrain(y, (sh.BATCH, sh.LENGTH, sh.ACT_EMBED))

  @property
  def scale(self) -> float:
    return self.head_k_dim ** -0.5

  @property
  def _plan_options(self) -> dict | None:
    """GDNConfig.plan_options as the op's plan_options (common.kernel_plan_options)."""
    return kernel_plan_options(self.cfg.plan_options, self.cfg.implementation,
                               default_implementation, parse_options)

  # ---- mixer protocol ----

  def __call__(self, x: jax.Array, *, segment_ids: jax.Array | None = None,
               positions: jax.Array | None = None) -> tuple[jax.Array, dict]:
    """x [B, T, D] -> (y [B, T, D], {}). ``positions`` is unused (no RoPE here)."""
    del positions
    self._check_x(x)
    _checks.check_segment_ids(segment_ids, x.shape[0], x.shape[1])
    x = sh.constrain(x, (sh.BATCH, sh.LENGTH, sh.ACT_EMBED))
    q = self.q_conv(self.q_proj(x), segment_ids=segment_ids)
    k = self.k_conv(self.k_proj(x), segment_ids=segment_ids)
    v = self.v_conv(self.v_proj(x), segment_ids=segment_ids)
    # Tagged before and after the L2 norm: the norm's backward needs its input, which
    # would otherwise be recomputed through the convs (lte_jax.remat).
    q, k, v = remat.tag(remat.MIXER_INPUTS, q, k, v)
    q, k, v = self._qkv(q, k, v)
    g, beta = self._gates(x)
    q, k, g, beta = remat.tag(remat.MIXER_INPUTS, q, k, g, beta)
    o, _ = chunk_gated_delta_rule(q, k, v, g, beta, scale=self.scale, initial_state=None,
                                  output_final_state=False, segment_ids=segment_ids,
                                  chunk_size=self.cfg.chunk_size,
                                  implementation=self.cfg.implementation,
                                  plan_options=self._plan_options)
    (o,) = remat.tag(remat.MIXER_OUTPUT, o)
    return self._output(o, x), {}

  def init_cache(self, batch_size: int, max_len: int, dtype: Any = jnp.float32) -> dict:
    """Empty cache. Its size does not depend on ``max_len`` (checked positive only)."""
    _checks.check_positive_int("batch_size", batch_size)
    _checks.check_positive_int("max_len", max_len)
    return {
        "conv_q": self.q_conv.init_state(batch_size, dtype),
        "conv_k": self.k_conv.init_state(batch_size, dtype),
        "conv_v": self.v_conv.init_state(batch_size, dtype),
        "state": jnp.zeros((batch_size, self.num_heads, self.head_k_dim, self.head_v_dim),
                           jnp.float32),
        "pos": jnp.zeros((), jnp.int32),
    }

  def _check_cache(self, cache: Any, batch: int) -> None:
    keys = ("conv_q", "conv_k", "conv_v", "state", "pos")
    if not isinstance(cache, dict) or set(cache) != set(keys):
      raise ValueError(f"cache must be the dict made by init_cache with keys {keys}, got "
                       f"{sorted(cache) if isinstance(cache, dict) else type(cache).__name__}")
    _checks.check_shape("cache['state']", cache["state"],
                        (batch, self.num_heads, self.head_k_dim, self.head_v_dim),
                        "[batch, heads, head_k_dim, head_v_dim]")

  def prefill(self, x: jax.Array, cache: dict) -> tuple[jax.Array, dict]:
    """Continue from ``cache`` over x [B, T, D] (one document per row) -> (y, cache).

    Works from any cache (a fresh one, or one after earlier prefill/decode
    calls): the recurrence continues from cache['state'] and the short convs
    from their last inputs.
    """
    self._check_x(x)
    self._check_cache(cache, x.shape[0])
    q_in, cq = self.q_conv.prefill(self.q_proj(x), cache["conv_q"])
    k_in, ck = self.k_conv.prefill(self.k_proj(x), cache["conv_k"])
    v_in, cv = self.v_conv.prefill(self.v_proj(x), cache["conv_v"])
    q, k, v = self._qkv(q_in, k_in, v_in)
    g, beta = self._gates(x)
    o, state = chunk_gated_delta_rule(q, k, v, g, beta, scale=self.scale,
                                      initial_state=cache["state"], output_final_state=True,
                                      segment_ids=None, chunk_size=self.cfg.chunk_size,
                                      implementation=self.cfg.implementation,
                                      plan_options=self._plan_options)
    new_cache = {"conv_q": cq, "conv_k": ck, "conv_v": cv, "state": state.astype(jnp.float32),
                 "pos": cache["pos"] + x.shape[1]}
    return self._output(o, x), new_cache

  def decode(self, x: jax.Array, cache: dict) -> tuple[jax.Array, dict]:
    """One token x [B, 1, D] -> (y [B, 1, D], cache): the fused recurrent step."""
    _checks.check_shape("x", x, (None, 1, self.d_model), "[batch, 1, d_model]")
    _checks.check_float_dtype("x", x)
    self._check_cache(cache, x.shape[0])
    q_in, cq = self.q_conv.step(self.q_proj(x), cache["conv_q"])
    k_in, ck = self.k_conv.step(self.k_proj(x), cache["conv_k"])
    v_in, cv = self.v_conv.step(self.v_proj(x), cache["conv_v"])
    q, k, v = self._qkv(q_in, k_in, v_in)
    g, beta = self._gates(x)
    o, state = recurrent_gated_delta_rule(q, k, v, g, beta, scale=self.scale,
                                          initial_state=cache["state"],
                                          output_final_state=True, segment_ids=None)
    new_cache = {"conv_q": cq, "conv_k": ck, "conv_v": cv, "state": state.astype(jnp.float32),
                 "pos": cache["pos"] + 1}
    return self._output(o, x), new_cache
