"""Causal softmax attention: the blockwise XLA path against the fp32 reference, forward and grads."""
from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lte_jax.ops.attention import attention, masked_attention
from lte_jax.ops.attention import reference as attn_reference
from lte_jax.ops.attention import xla as attn_xla
from tests import helpers
from tests.helpers import rel_rms
from tests.quick_compile import quick_compile  # noqa: F401  (autouse fixture)


def packed_segment_ids(rng, batch, time):
  return jnp.asarray(helpers.packed_segment_ids(rng, batch, time))


def make_qkv(seed, batch, time, num_heads, num_kv_heads, head_dim, head_dim_v, dtype):
  # numpy draws: jax.random would compile a sampler for every shape.
  rng = np.random.default_rng(seed)
  shapes = [(batch, time, num_heads, head_dim), (batch, time, num_kv_heads, head_dim),
            (batch, time, num_kv_heads, head_dim_v), (batch, time, num_heads, head_dim_v)]
  return tuple(jnp.asarray(rng.standard_normal(shape, np.float32), dtype) for shape in shapes)


def value_and_grads(fn, q, k, v, do):
  """(o, (dq, dk, dv)) of fn under the loss sum(o * do), compiled (eager dispatch is slower)."""
  def loss(q, k, v):
    o = fn(q, k, v)
    return jnp.sum(o.astype(jnp.float32) * do.astype(jnp.float32)), o

  @jax.jit
  def run(q, k, v):
    (_, o), grads = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(q, k, v)
    return o, grads
  return run(q, k, v)


# (batch, time, Hq, Hkv, D, Dv, window, documents, dtype, block_q)
CASES = [
    (2, 1, 4, 2, 100, 20, 0, True, jnp.bfloat16, 512),
    (2, 75, 4, 2, 100, 48, 7, True, jnp.float32, 16),
    (1, 75, 2, 2, 32, 32, 1, False, jnp.bfloat16, 512),
    (2, 130, 4, 2, 32, 20, None, True, jnp.float32, 32),
    (1, 130, 4, 2, 100, 64, 0, True, jnp.bfloat16, 32),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"T{c[1]}-H{c[2]}/{c[3]}-D{c[4]}/{c[5]}-w{c[6]}-"
                         f"seg{int(c[7])}-{jnp.dtype(c[8]).name}-bq{c[9]}")
def test_xla_matches_reference(case):
  batch, time, hq, hkv, d, dv, window, docs, dtype, block_q = case
  q, k, v, do = make_qkv(time + d, batch, time, hq, hkv, d, dv, dtype)
  seg = packed_segment_ids(np.random.default_rng(time), batch, time) if docs else None
  scale = d ** -0.5

  def ref(q, k, v):
    return attention(q, k, v, window_size=window, segment_ids=seg, implementation="reference")

  def fast(q, k, v):
    return attn_xla.attention_xla(q, k, v, window_size=window, segment_ids=seg, scale=scale,
                                  block_q=block_q)

  o_ref, g_ref = value_and_grads(ref, q, k, v, do)
  o_xla, g_xla = value_and_grads(fast, q, k, v, do)
  assert o_xla.dtype == dtype and o_xla.shape == (batch, time, hq, dv)
  tol_o, tol_g = (2e-5, 5e-5) if dtype == jnp.float32 else (1e-2, 2e-2)
  assert rel_rms(o_xla, o_ref) < tol_o
  for name, got, want in zip("qkv", g_xla, g_ref):
    assert got.dtype == dtype, name
    assert rel_rms(got, want) < tol_g, name


def test_public_api_under_jit():
  q, k, v, _ = make_qkv(3, 2, 75, 4, 2, 32, 24, jnp.float32)
  seg = packed_segment_ids(np.random.default_rng(1), 2, 75)
  fn = jax.jit(attention, static_argnames=("window_size", "scale", "implementation"))
  want = fn(q, k, v, window_size=7, segment_ids=seg, implementation="reference")
  got = fn(q, k, v, window_size=7, segment_ids=seg, implementation="xla")
  np.testing.assert_allclose(got, want, atol=2e-5, rtol=2e-5)
  if jax.default_backend() != "gpu":  # elsewhere the default is the XLA path
    np.testing.assert_array_equal(fn(q, k, v, window_size=7, segment_ids=seg), got)


def test_window_and_documents_are_exact():
  """Keys outside the window or the document must have exactly zero weight."""
  time = 40
  seg = packed_segment_ids(np.random.default_rng(5), 1, time)
  q, k, _, _ = make_qkv(0, 1, time, 2, 1, 32, 8, jnp.float32)
  v = jnp.eye(time, dtype=jnp.float32)[None, :, None, :]  # v_j = e_j: o reads out the weights
  for window in (3, None):
    o = jax.jit(attn_xla.attention_xla, static_argnames=("window_size", "scale", "block_q"))(
        q * 0.1, k, v, window_size=window, segment_ids=seg, scale=32 ** -0.5, block_q=16)
    ids = np.asarray(seg[0])
    i, j = np.arange(time)[:, None], np.arange(time)[None, :]
    want = (j <= i) & (ids[:, None] == ids[None, :])
    if window is not None:
      want &= i - j <= window
    for h in range(2):
      np.testing.assert_array_equal(np.asarray(o[0, :, h]) > 0, want)


def test_blockwise_never_builds_full_logits():
  """The memory-aware path keeps [.., T, T] fp32 out of forward and backward."""
  time, block = 1024, 128
  q, k, v, do = make_qkv(0, 1, time, 1, 1, 16, 16, jnp.bfloat16)

  def loss(q, k, v, window):
    o = attn_xla.attention_xla(q, k, v, window_size=window, segment_ids=None, scale=0.25,
                               block_q=block)
    return jnp.sum(o.astype(jnp.float32) * do.astype(jnp.float32))

  for window in (None, 64):
    text = str(jax.make_jaxpr(jax.grad(loss, argnums=(0, 1, 2)), static_argnums=3)(q, k, v,
                                                                                   window))
    assert not re.search(rf"{time},{time}\]", text)
    if window is not None:  # sliding window: each block reads block + window keys only
      assert not re.search(rf"{block},{time}\]", text)


def test_masked_attention_matches_reference_and_empty_rows_are_zero():
  batch, tq, s, hq, hkv, d, dv = 2, 21, 30, 4, 2, 32, 12
  q, _, _, do = make_qkv(7, batch, tq, hq, hkv, d, dv, jnp.float32)
  _, k, v, _ = make_qkv(8, batch, s, hq, hkv, d, dv, jnp.float32)
  scale = d ** -0.5
  # Per-KV-head mask through the blocked path; one shared mask through the public entry.
  for heads, block_q in ((hkv, 8), (1, None)):
    mask = np.random.default_rng(heads).random((batch, heads, tq, s)) < 0.4
    mask[0, :, 3] = False  # rows with no key
    mask[1, 0, tq - 1] = False
    mask = jnp.asarray(mask)
    if block_q is None:
      fast = lambda q, k, v, mask=mask: masked_attention(q, k, v, mask)
    else:
      fast = lambda q, k, v, mask=mask: attn_xla.masked_attention_xla(q, k, v, mask, scale=scale,
                                                                      block_q=block_q)
    o_ref, g_ref = value_and_grads(
        lambda q, k, v, mask=mask: attn_reference.masked_attention_reference(q, k, v, mask,
                                                                             scale=scale),
        q, k, v, do)
    o, grads = value_and_grads(fast, q, k, v, do)
    assert rel_rms(o, o_ref) < 2e-5
    np.testing.assert_array_equal(o[0, 3], 0.0)
    np.testing.assert_array_equal(o[1, tq - 1, : hq // heads], 0.0)
    for got, want in zip(grads, g_ref):
      assert np.all(np.isfinite(got))
      assert rel_rms(got, want) < 5e-5
    np.testing.assert_array_equal(grads[0][0, 3], 0.0)


def test_masked_attention_bf16_has_no_nan():
  q, k, v, do = make_qkv(1, 1, 4, 2, 2, 16, 16, jnp.bfloat16)
  mask = jnp.zeros((1, 1, 4, 4), bool).at[0, 0, 2, :2].set(True)
  o, grads = value_and_grads(lambda q, k, v: masked_attention(q, k, v, mask), q, k, v, do)
  assert o.dtype == jnp.bfloat16
  np.testing.assert_array_equal(np.asarray(o, np.float32)[0, [0, 1, 3]], 0.0)
  for g in grads:
    assert np.all(np.isfinite(np.asarray(g, np.float32)))


def test_implementation_choice():
  q, k, v, _ = make_qkv(0, 1, 8, 2, 2, 16, 16, jnp.bfloat16)
  if jax.default_backend() != "gpu":
    with pytest.raises(ValueError, match="cudnn.*GPU backend"):
      attention(q, k, v, implementation="cudnn")
  with pytest.raises(ValueError, match="implementation must be one of.*'reference'"):
    attention(q, k, v, implementation="flash")
  with pytest.raises(ValueError, match="plan_options is only accepted with implementation='pallas'"):
    attention(q, k, v, implementation="xla", plan_options={"block_q": 16})


def test_cudnn_reason_names_requirements():
  from lte_jax.ops.attention.api import cudnn_unsupported_reason
  q, k, v, _ = make_qkv(0, 1, 8, 2, 2, 16, 16, jnp.float32)
  assert cudnn_unsupported_reason(q, k, v, None) is not None


@pytest.mark.parametrize("kwargs,match", [
    (dict(q=jnp.zeros((1, 4, 2))), "q must have rank 4"),
    (dict(k=jnp.zeros((1, 4, 2, 8))), "k must have shape"),
    (dict(k=jnp.zeros((1, 5, 1, 16)), v=jnp.zeros((1, 5, 1, 16))), "k must have shape"),
    (dict(v=jnp.zeros((1, 4, 2, 16))), "v must have shape"),
    (dict(k=jnp.zeros((1, 4, 3, 16)), v=jnp.zeros((1, 4, 3, 16))), "multiple of k/v heads"),
    (dict(v=jnp.zeros((1, 4, 1, 16), jnp.bfloat16)), "share one dtype"),
    (dict(q=jnp.zeros((1, 4, 2, 16), jnp.int32)), "q must have dtype"),
    (dict(window_size=-1), "window_size must be an integer >= 0"),
    (dict(window_size=2.5), "window_size must be an integer >= 0"),
    (dict(segment_ids=jnp.zeros((1, 3), jnp.int32)), "segment_ids must have shape"),
    (dict(segment_ids=jnp.zeros((1, 4), jnp.float32)), "segment_ids must have an integer"),
    (dict(scale=-1.0), "scale must be None or a positive number"),
])
def test_bad_input_raises(kwargs, match):
  args = dict(q=jnp.zeros((1, 4, 2, 16)), k=jnp.zeros((1, 4, 1, 16)), v=jnp.zeros((1, 4, 1, 16)))
  args.update(kwargs)
  q, k, v = args.pop("q"), args.pop("k"), args.pop("v")
  with pytest.raises(ValueError, match=match):
    attention(q, k, v, **args)


@pytest.mark.parametrize("mask,match", [
    (jnp.ones((1, 4, 6), bool), "mask must have rank 4"),
    (jnp.ones((1, 2, 4, 6), bool), "kv_heads or 1"),
    (jnp.ones((1, 1, 4, 5), bool), "mask must have shape"),
    (jnp.ones((1, 1, 4, 6), jnp.float32), "mask must have dtype bool"),
])
def test_masked_attention_bad_mask(mask, match):
  q, k, v = jnp.zeros((1, 4, 2, 8)), jnp.zeros((1, 6, 1, 8)), jnp.zeros((1, 6, 1, 8))
  with pytest.raises(ValueError, match=match):
    masked_attention(q, k, v, mask)
