"""Layers: RoPE, norms, SwiGLU, short conv, Gated DeltaNet and attention mixers.

The mixers are checked three ways: prefill + token-by-token decode equals the
full-sequence call, a packed batch equals its documents run one by one, and
hand-written formulas (RoPE, norms, conv, attention window) match.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lte_jax import sharding as sh
from lte_jax.configs import AttentionConfig, GDNConfig
from lte_jax.layers import (Attention, GatedDeltaNet, GatedRMSNorm, RMSNorm, ShortConv, SwiGLU,
                            apply_rope, dtype_of, linear, output_std)
from tests.quick_compile import quick_compile  # noqa: F401  (autouse fixture)

D_MODEL = 32
TOL = dict(rtol=1e-5, atol=1e-5)


def _x(seed: int, shape) -> jax.Array:
  # numpy draws: a jax.random call would compile once per shape.
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def _gdn(seed: int = 0) -> GatedDeltaNet:
  # Odd head dims and a chunk that does not divide T exercise the awkward paths;
  # a large init_std makes the layer far from identity-like so errors show.
  cfg = GDNConfig(num_heads=2, head_dim=12, expand_v=1.5, chunk_size=8)
  return GatedDeltaNet(cfg, D_MODEL, num_layers=2, init_std=0.2, rngs=nnx.Rngs(seed))


def _attn(window_size=None, seed: int = 0) -> Attention:
  cfg = AttentionConfig(num_heads=4, num_kv_heads=2, head_dim=8, window_size=window_size)
  return Attention(cfg, D_MODEL, num_layers=2, init_std=0.2, rngs=nnx.Rngs(seed))


# Compiled entry points: one compile per shape beats op-by-op dispatch by far.
_call = nnx.jit(lambda m, x, seg: m(x, segment_ids=seg))
_rope = jax.jit(apply_rope, static_argnums=2)
_prefill = nnx.jit(lambda m, x, cache: m.prefill(x, cache))
_decode = nnx.jit(lambda m, x, cache: m.decode(x, cache))


def _prefill_then_decode(mixer, x, prompt_len, max_len):
  cache = mixer.init_cache(x.shape[0], max_len)
  y, cache = _prefill(mixer, x[:, :prompt_len], cache)
  outs = [y]
  for t in range(prompt_len, x.shape[1]):
    y, cache = _decode(mixer, x[:, t:t + 1], cache)
    outs.append(y)
  assert int(cache["pos"]) == x.shape[1]
  return jnp.concatenate(outs, axis=1), cache


def _packed_segment_ids(lengths):
  """segment_ids [1, sum(lengths)] with ids 1, 2, ... per document."""
  ids = []
  for i, n in enumerate(lengths):
    ids += [i + 1] * n
  return jnp.asarray([ids], jnp.int32)


def _check_packed_equals_alone(mixer, x, seg, lengths):
  """Packed row x [1, T] vs each document alone at the start of its own row.

  Each document is run without segment_ids as the prefix of a row padded with
  zeros; causality (tested separately) makes that prefix equal to the document
  run by itself, and one batched call keeps the test fast.
  """
  packed, _ = _call(mixer, x, seg)
  t = x.shape[1]
  starts = np.cumsum((0,) + tuple(lengths))
  rows = jnp.stack([jnp.pad(x[0, a:a + n], ((0, t - n), (0, 0)))
                    for a, n in zip(starts, lengths)])
  alone, _ = _call(mixer, rows, None)
  for r, (a, n) in enumerate(zip(starts, lengths)):
    np.testing.assert_allclose(np.asarray(packed[0, a:a + n]), np.asarray(alone[r, :n]), **TOL)


# ---------------------------------------------------------------- helpers

def test_common_helpers():
  assert output_std(0.006, 24) == pytest.approx(0.006 / math.sqrt(48))
  assert dtype_of("bfloat16") == jnp.bfloat16 and dtype_of("float32") == jnp.float32
  with pytest.raises(ValueError, match="dtype"):
    dtype_of("float64")
  with pytest.raises(ValueError, match="num_layers"):
    output_std(0.02, 0)
  lin = linear(64, 128, names=(sh.EMBED, sh.MLP), std=0.05, rngs=nnx.Rngs(0))
  assert lin.kernel.get_metadata()["out_sharding"] == (sh.EMBED, sh.MLP)
  assert float(jnp.std(lin.kernel[...])) == pytest.approx(0.05, rel=0.05)
  assert lin.bias is None


# ---------------------------------------------------------------- RoPE

def test_rope_matches_complex_rotation():
  b, t, h, d, theta = 2, 7, 3, 10, 500.0
  x = _x(0, (b, t, h, d))
  pos = jnp.asarray(np.random.default_rng(1).integers(0, 3000, (b, t)), jnp.int32)
  got = np.asarray(_rope(x, pos, theta))
  xn = np.asarray(x, np.float64)
  # Non-interleaved layout: feature i pairs with i + d/2 as one complex number.
  z = xn[..., : d // 2] + 1j * xn[..., d // 2:]
  freqs = theta ** (-np.arange(0, d, 2) / d)
  z = z * np.exp(1j * np.asarray(pos, np.float64)[..., None, None] * freqs)
  want = np.concatenate([z.real, z.imag], axis=-1)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_rope_dot_products_depend_on_offset_only():
  q, k = _x(0, (1, 1, 1, 16)), _x(1, (1, 1, 1, 16))

  def dot(pq, pk):
    rq = _rope(q, jnp.full((1, 1), pq, jnp.int32), 10000.0)
    rk = _rope(k, jnp.full((1, 1), pk, jnp.int32), 10000.0)
    return float(np.sum(np.asarray(rq, np.float64) * np.asarray(rk, np.float64)))

  assert dot(5, 2) == pytest.approx(dot(103, 100), abs=1e-4)
  assert dot(0, 0) == pytest.approx(float(np.sum(np.asarray(q) * np.asarray(k))), abs=1e-5)
  assert dot(9, 3) != pytest.approx(dot(9, 4), abs=1e-3)


def test_rope_keeps_dtype_and_validates():
  x = _x(0, (1, 4, 2, 8)).astype(jnp.bfloat16)
  assert _rope(x, jnp.zeros((1, 4), jnp.int32), 10000.0).dtype == jnp.bfloat16
  with pytest.raises(ValueError, match="x must have rank 4"):
    apply_rope(x[0], jnp.zeros((1, 4), jnp.int32))
  with pytest.raises(ValueError, match="positions"):
    apply_rope(x, jnp.zeros((1, 5), jnp.int32))
  with pytest.raises(ValueError, match="head_dim must be even"):
    apply_rope(x[..., :7], jnp.zeros((1, 4), jnp.int32))


# ---------------------------------------------------------------- norms and MLP

def test_rmsnorm_and_gated_rmsnorm_match_formula():
  x = _x(0, (2, 5, 3, 6))
  gate = _x(1, (2, 5, 3, 6))
  norm = RMSNorm(6, eps=1e-6)
  norm.weight[...] = jnp.arange(1.0, 7.0)
  xn = np.asarray(x, np.float64)
  normed = xn / np.sqrt(np.mean(xn ** 2, -1, keepdims=True) + 1e-6) * np.arange(1.0, 7.0)
  np.testing.assert_allclose(np.asarray(norm(x)), normed, **TOL)
  gated = GatedRMSNorm(6, eps=1e-6)
  gated.weight[...] = jnp.arange(1.0, 7.0)
  g = np.asarray(gate, np.float64)
  np.testing.assert_allclose(np.asarray(gated(x, gate)), normed * g / (1 + np.exp(-g)), **TOL)
  assert norm(x.astype(jnp.bfloat16)).dtype == jnp.bfloat16
  with pytest.raises(ValueError, match="x must have last axis 6"):
    norm(x[..., :5])
  with pytest.raises(ValueError, match="gate"):
    gated(x, gate[..., :1, :])


def test_swiglu_matches_formula_and_scales_down_proj():
  mlp = SwiGLU(64, 256, num_layers=8, init_std=0.05, rngs=nnx.Rngs(0))
  x = _x(0, (2, 3, 64))
  gate, up = x @ mlp.gate_proj.kernel[...], x @ mlp.up_proj.kernel[...]
  want = (jax.nn.silu(gate) * up) @ mlp.down_proj.kernel[...]
  np.testing.assert_allclose(np.asarray(mlp(x)), np.asarray(want), **TOL)
  assert float(jnp.std(mlp.down_proj.kernel[...])) == pytest.approx(0.05 / 4, rel=0.05)
  with pytest.raises(ValueError, match="d_model=64"):
    mlp(x[..., :32])


# ---------------------------------------------------------------- short conv

def _conv_numpy(x, w, seg=None):
  b, t, c = x.shape
  k = w.shape[0]
  y = np.zeros((b, t, c))
  for bi in range(b):
    for ti in range(t):
      for tap in range(k):
        src = ti - (k - 1) + tap
        if src < 0:
          continue
        if seg is not None and np.any(seg[bi, src + 1: ti + 1] != seg[bi, src: ti]):
          continue  # a document boundary lies between src and ti
        y[bi, ti] += w[tap] * x[bi, src]
  return y / (1 + np.exp(-y))


def test_short_conv_matches_direct_sum_with_segments():
  conv = ShortConv(5, 4, init_std=0.5, rngs=nnx.Rngs(0))
  x = _x(0, (2, 11, 5))
  seg = jnp.asarray([[1, 1, 2, 2, 2, 2, 2, 3, 0, 0, 0], [4] * 11], jnp.int32)
  w = np.asarray(conv.weight[...], np.float64)
  np.testing.assert_allclose(np.asarray(_call(conv, x, None)), _conv_numpy(np.asarray(x), w),
                             **TOL)
  np.testing.assert_allclose(np.asarray(_call(conv, x, seg)),
                             _conv_numpy(np.asarray(x), w, np.asarray(seg)), **TOL)
  # A repeated id after a different one is a new document.
  seg2 = jnp.asarray([[1, 1, 2, 1, 1, 1, 1, 1, 1, 1, 1]] * 2, jnp.int32)
  np.testing.assert_allclose(np.asarray(_call(conv, x, seg2)),
                             _conv_numpy(np.asarray(x), w, np.asarray(seg2)), **TOL)


@pytest.mark.parametrize("prompt_len", [1, 2, 6])
def test_short_conv_prefill_and_step_match_full(prompt_len):
  conv = ShortConv(3, 4, init_std=0.5, rngs=nnx.Rngs(1))
  x = _x(2, (2, 9, 3))
  y, state = _prefill(conv, x[:, :prompt_len], conv.init_state(2))
  outs = [y]
  step = nnx.jit(lambda m, x_t, s: m.step(x_t, s))
  for t in range(prompt_len, 9):
    y, state = step(conv, x[:, t:t + 1], state)
    outs.append(y)
  np.testing.assert_allclose(np.asarray(jnp.concatenate(outs, 1)),
                             np.asarray(_call(conv, x, None)), **TOL)
  np.testing.assert_allclose(np.asarray(state), np.asarray(x[:, -3:]))
  with pytest.raises(ValueError, match="conv_state"):
    conv.step(x[:, :1], state[:, :2])


# ---------------------------------------------------------------- Gated DeltaNet

def test_gdn_init_ranges_and_param_names():
  cfg = GDNConfig(num_heads=512, head_dim=4)
  layer = GatedDeltaNet(cfg, 8, num_layers=2, init_std=0.02, rngs=nnx.Rngs(3))
  a = np.exp(np.asarray(layer.A_log[...]))
  assert np.all(a > 0) and np.all(a <= 16) and a.max() > 12 and a.min() < 4
  dt = np.asarray(jax.nn.softplus(layer.dt_bias[...]))
  assert np.all(dt >= 1e-4 * (1 - 1e-5)) and np.all(dt <= 0.1 * (1 + 1e-5))
  assert dt.min() < 2e-3 and dt.max() > 5e-2  # log-uniform spread over [1e-3, 0.1]
  paths = {"/".join(map(str, p)) for p, _ in nnx.to_flat_state(nnx.state(layer, nnx.Param))}
  assert "A_log" in paths and "dt_bias" in paths
  assert layer.o_norm.weight.shape == (4,)


@pytest.mark.parametrize("prompt_len", [1, 13])
def test_gdn_prefill_decode_matches_full(prompt_len):
  layer = _gdn()
  x = _x(5, (2, 19, D_MODEL))
  want, aux = _call(layer, x, None)
  assert aux == {}
  got, cache = _prefill_then_decode(layer, x, prompt_len, max_len=32)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), **TOL)
  assert cache["state"].shape == (2, 2, 12, 18) and cache["state"].dtype == jnp.float32
  assert cache["conv_v"].shape == (2, 3, 36)


def test_gdn_packed_batch_equals_documents_one_by_one():
  layer = _gdn(seed=1)
  lengths = (9, 1, 14, 4)
  x = _x(6, (1, sum(lengths), D_MODEL))
  seg = _packed_segment_ids(lengths)
  seg = seg.at[:, -4:].set(0)  # trailing padding is its own document
  _check_packed_equals_alone(layer, x, seg, lengths)


def test_gdn_validates_inputs():
  layer = _gdn()
  with pytest.raises(ValueError, match="x must have"):
    layer(_x(0, (2, 5, D_MODEL + 1)))
  with pytest.raises(ValueError, match="x must have rank 3"):
    layer(_x(0, (5, D_MODEL)))
  with pytest.raises(ValueError, match="segment_ids"):
    layer(_x(0, (2, 5, D_MODEL)), segment_ids=jnp.zeros((2, 4), jnp.int32))
  with pytest.raises(ValueError, match="cache"):
    layer.decode(_x(0, (2, 1, D_MODEL)), layer.init_cache(3, 8))
  with pytest.raises(ValueError, match="cfg must be"):
    GatedDeltaNet(AttentionConfig(), D_MODEL, num_layers=2, init_std=0.02, rngs=nnx.Rngs(0))


# ---------------------------------------------------------------- attention

def test_attention_window_counts_visible_tokens():
  """Config window W: output i depends on x_j iff 0 <= i - j <= W - 1."""
  w, t, i = 4, 12, 9
  layer = _attn(window_size=w)
  x = _x(7, (1, t, D_MODEL))
  # Row 0 is x; row 1 + j bumps token j.
  rows = jnp.concatenate([x] + [x.at[:, j].add(1.0) for j in range(t)])
  out, _ = _call(layer, rows, None)
  for j in range(t):
    changed = not np.allclose(np.asarray(out[1 + j, i]), np.asarray(out[0, i]), atol=1e-6)
    assert changed == (0 <= i - j <= w - 1), j


@pytest.mark.parametrize("window_size,prompt_len", [
    (None, 1), (None, 11), (5, 3), (5, 11), (30, 11)])
def test_attention_prefill_decode_matches_full(window_size, prompt_len):
  layer = _attn(window_size)
  x = _x(8, (2, 20, D_MODEL))
  want, aux = _call(layer, x, None)
  assert aux == {}
  got, cache = _prefill_then_decode(layer, x, prompt_len, max_len=24)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), **TOL)
  slots = 24 if window_size is None else window_size
  assert cache["k"].shape == (2, slots, 2, 8)


def test_swa_cache_size_does_not_depend_on_max_len():
  layer = _attn(window_size=6)
  small, large = layer.init_cache(2, 8), layer.init_cache(2, 100_000)
  assert jax.tree.map(jnp.shape, small) == jax.tree.map(jnp.shape, large)
  assert small["k"].shape == (2, 6, 2, 8) and small["slot_pos"].shape == (6,)


def test_attention_packed_batch_equals_documents_one_by_one():
  for window_size in (None, 4):
    layer = _attn(window_size, seed=2)
    lengths = (7, 1, 10)
    x = _x(9, (1, sum(lengths), D_MODEL))
    _check_packed_equals_alone(layer, x, _packed_segment_ids(lengths), lengths)


def test_attention_validates_inputs():
  layer = _attn(None)
  with pytest.raises(ValueError, match="x must have"):
    layer(_x(0, (2, 5, D_MODEL - 1)))
  with pytest.raises(ValueError, match="positions"):
    layer(_x(0, (2, 5, D_MODEL)), positions=jnp.zeros((2, 5), jnp.float32))
  with pytest.raises(ValueError, match="max_len"):
    layer.prefill(_x(0, (1, 9, D_MODEL)), layer.init_cache(1, 8))
  with pytest.raises(ValueError, match="x must have shape"):
    layer.decode(_x(0, (1, 2, D_MODEL)), layer.init_cache(1, 8))
  with pytest.raises(ValueError, match="cache"):
    _attn(4).decode(_x(0, (1, 1, D_MODEL)), layer.init_cache(1, 8))
  with pytest.raises(ValueError, match="head_dim must be even"):
    Attention(AttentionConfig(num_heads=2, num_kv_heads=2, head_dim=7), D_MODEL, num_layers=2,
              init_std=0.02, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="max_len"):
    layer.init_cache(1, 0)
