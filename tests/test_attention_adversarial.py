"""Attention-family ops on adversarial values, forward and backward, against float64.

Every implementation (attention, LTE attention: 'xla' and interpreted 'pallas'; LTE
decode: 'xla' and 'pallas'; NSA: 'xla' and its decode step) is compared with the op's
own reference run in float64 (jax.enable_x64). Each batch row holds one pattern, so
one compilation covers them all:

  random      normal inputs, two documents
  tied_large  one key repeated, q and k x 20: every logit equal and ~1e2-1e3, so the
              weights are exactly uniform and dq = 0
  large       q and k x 25: logits ~1e3, the softmax saturates
  run         one token repeated over most of the row (q, k and v)
  self        every token its own document: a query's only visible key is itself
  padding     a tail of padding (id 0); LTE: every score <= 0 as well
  all_padding the whole row is padding; LTE: every score <= 0

Error model: |got - want| <= tol * |want| + tol * magnitude (the row's q / k scale,
for results that are exactly 0), RMS per row and tensor. The interpreted Pallas
kernels recompute each probability in the backward from a saved fp32 log-sum-exp
with a transposed product, so their probabilities are off by ~|logit| * 2^-24
relative; their tolerance grows by that much. 'xla' and the references normalise
exp(logit - row max) by its sum and are held to the plain tolerance.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lte_jax.ops.attention import reference as attention_reference
from lte_jax.ops.attention import xla as attention_xla
from lte_jax.ops.attention.pallas import attention_pallas
from lte_jax.ops.lte_attention import reference as lte_reference
from lte_jax.ops.lte_attention import xla as lte_xla
from lte_jax.ops.lte_attention.pallas import lte_attention_pallas
from lte_jax.ops.lte_decode import lte_decode_attention
from lte_jax.ops.lte_decode.reference import lte_decode_attention_reference
from lte_jax.ops.nsa_attention import nsa_decode
from lte_jax.ops.nsa_attention import reference as nsa_reference
from lte_jax.ops.nsa_attention import xla as nsa_xla
from tests.quick_compile import quick_compile  # noqa: F401  (autouse fixture)

ROWS = ("random", "tied_large", "large", "run", "self", "padding", "all_padding")
TIME, HQ, HKV, D = 60, 2, 1, 16     # T not a multiple of 16: padded rows in every kernel
SCALE = D ** -0.5
MAGNITUDE = np.array([1.0, 20.0, 25.0, 1.0, 1.0, 1.0, 1.0])   # per row: q / k scale
TOL = {jnp.float32: 1e-4, jnp.bfloat16: 3e-2}
EPS32 = 2.0 ** -24
SMALL = dict(block_q=16, block_k=16)


def adversarial_inputs(dtype, seed=0):
  """q [7, T, Hq, D], k, v [7, T, Hkv, D], scores [7, T, Hkv], do [7, T, Hq, D] in dtype,
  segment_ids [7, T] int32: one ROWS pattern per batch row."""
  rng = np.random.default_rng(seed)
  batch = len(ROWS)
  q = rng.standard_normal((batch, TIME, HQ, D))
  k = rng.standard_normal((batch, TIME, HKV, D))
  v = rng.standard_normal((batch, TIME, HKV, D))
  r = rng.standard_normal((batch, TIME, HKV))
  do = rng.standard_normal((batch, TIME, HQ, D))
  seg = np.ones((batch, TIME), np.int32)
  seg[0, 40:] = 2
  k[1] = k[1, :1]
  q[1], k[1] = 20 * q[1], 20 * k[1]
  q[2], k[2] = 25 * q[2], 25 * k[2]
  for x in (q, k, v):
    x[3, 6:56] = x[3, 6:7]
  seg[4] = np.arange(1, TIME + 1)
  seg[5, 30:] = 0
  seg[6] = 0
  r[5:] = -np.abs(r[5:])
  cast = lambda x: jnp.asarray(x, dtype)
  return cast(q), cast(k), cast(v), cast(r), cast(do), jnp.asarray(seg)


def max_logits(q, k):
  """[B] largest |q . k| * scale of each row (a bound on the logits' size)."""
  q, k = np.asarray(q, np.float64), np.asarray(k, np.float64)
  qn = np.linalg.norm(q, axis=-1).max(axis=(1, 2))
  kn = np.linalg.norm(k, axis=-1).max(axis=(1, 2))
  return qn * kn * SCALE


def value_and_grads(fn, args, do):
  """(o, grads of every array in args) under sum(o * do), compiled."""
  def loss(*a):
    o = fn(*a)
    return jnp.sum(o.astype(jnp.float32) * do.astype(jnp.float32)), o

  (_, o), grads = jax.jit(jax.value_and_grad(loss, argnums=tuple(range(len(args))),
                                             has_aux=True))(*args)
  return o, grads


def value_and_grads64(fn, args, do):
  """value_and_grads of fn with every float input (and the loss) in float64."""
  with jax.enable_x64(True):
    args64 = [jnp.asarray(np.asarray(x, np.float64)) for x in args]
    do64 = jnp.asarray(np.asarray(do, np.float64))

    def loss(*a):
      o = fn(*a)
      return jnp.sum(o * do64), o

    (_, o), grads = jax.jit(jax.value_and_grad(loss, argnums=tuple(range(len(args))),
                                               has_aux=True))(*args64)
    return np.asarray(o), [np.asarray(g) for g in grads]


def assert_close(got, want, tol, names):
  """got, want: sequences of [B, ...] arrays; tol: scalar or [B] per-row tolerance."""
  tol = np.broadcast_to(np.asarray(tol, np.float64), (len(ROWS),))
  for name, a, b in zip(names, got, want):
    a = np.asarray(a, np.float64)
    finite = np.isfinite(a).reshape(len(ROWS), -1).all(axis=1)
    assert finite.all(), (name, "not finite in rows", [r for r, f in zip(ROWS, finite) if not f])
    for row in range(len(ROWS)):
      err = np.sqrt(np.mean((a[row] - b[row]) ** 2))
      size = np.sqrt(np.mean(b[row] ** 2))
      bound = tol[row] * (size + MAGNITUDE[row])
      assert err <= bound, (name, ROWS[row], f"err {err:.3g} > {bound:.3g} (|want| {size:.3g})")


def tolerance(impl, dtype, q, k):
  """Per row: TOL, plus |logit| * 2^-24 relative for the interpreted kernels."""
  extra = 8 * EPS32 * max_logits(q, k) if impl == "pallas" else 0.0
  return TOL[dtype] + extra


# ---- attention (full causal, sliding window) ----

def _attention(impl, window):
  kw = dict(window_size=window, scale=SCALE)
  if impl == "reference":
    return lambda q, k, v, seg: attention_reference.attention_reference(q, k, v, segment_ids=seg,
                                                                       **kw)
  if impl == "xla":   # blocks of 16 queries: the last one has padded rows
    return lambda q, k, v, seg: attention_xla.attention_xla(q, k, v, segment_ids=seg,
                                                            block_q=16, **kw)
  return lambda q, k, v, seg: attention_pallas(q, k, v, segment_ids=seg, plan_options=SMALL,
                                               **kw)


# Interpreted Pallas compiles slowly on CPU: one case per kernel family, f32 where the
# error model is tight, bf16 where NaN-freeness of the casts is the question.
@pytest.mark.parametrize("impl,window,dtype", [
    ("xla", None, jnp.float32), ("xla", 5, jnp.bfloat16), ("pallas", 5, jnp.bfloat16)])
def test_attention_adversarial(impl, window, dtype):
  q, k, v, _, do, seg = adversarial_inputs(dtype)
  fn, ref = _attention(impl, window), _attention("reference", window)
  o, grads = value_and_grads(lambda q, k, v: fn(q, k, v, seg), (q, k, v), do)
  o64, grads64 = value_and_grads64(lambda q, k, v: ref(q, k, v, seg), (q, k, v), do)
  assert o.dtype == dtype
  assert_close((o, *grads), (o64, *grads64), tolerance(impl, dtype, q, k), ("o", "dq", "dk", "dv"))


def test_tied_large_logits_give_uniform_weights():
  """One key repeated, logits ~1e2-1e3: the weights are exactly 1/n, so o is the mean
  of the visible values and dq is 0. An fp32 lse = max + log(n) rounds at the logit's
  size; 'xla' normalises by the sum instead."""
  q, k, v, _, do, _ = adversarial_inputs(jnp.float32)
  q, k, v, do = q[1:2], k[1:2], v[1:2], do[1:2]
  o, (dq, _, _) = value_and_grads(
      lambda q, k, v: attention_xla.attention_xla(q, k, v, window_size=None, segment_ids=None,
                                                  scale=SCALE), (q, k, v), do)
  want = np.cumsum(np.asarray(v, np.float64), axis=1) / np.arange(1, TIME + 1)[:, None, None]
  err = np.abs(np.asarray(o, np.float64) - np.repeat(want, HQ // HKV, axis=2)).max()
  assert err < 1e-6, err
  assert np.abs(np.asarray(dq)).max() < 1e-4


# ---- LTE attention ----

def _lte(impl, sink, window, budget):
  kw = dict(sink_size=sink, window_size=window, budget=budget, scale=SCALE)
  if impl == "reference":
    return lambda q, k, v, r, seg: lte_reference.lte_attention_reference(q, k, v, r,
                                                                         segment_ids=seg, **kw)
  if impl == "xla":
    return lambda q, k, v, r, seg: lte_xla.lte_attention_xla(q, k, v, r, segment_ids=seg,
                                                             block_q=16, block_k=16, **kw)
  return lambda q, k, v, r, seg: lte_attention_pallas(q, k, v, r, segment_ids=seg,
                                                      plan_options=SMALL, **kw)


@pytest.mark.parametrize("impl,sink,window,budget,dtype", [
    ("xla", 2, 5, 12, jnp.float32), ("xla", 0, 0, None, jnp.bfloat16),
    ("pallas", 2, 5, None, jnp.float32)])
def test_lte_attention_adversarial(impl, sink, window, budget, dtype):
  """Window 0 without sinks: a query whose scores are all <= 0 reads itself only."""
  q, k, v, r, do, seg = adversarial_inputs(dtype)
  fn, ref = _lte(impl, sink, window, budget), _lte("reference", sink, window, budget)
  o, grads = value_and_grads(lambda *a: fn(*a, seg), (q, k, v, r), do)
  o64, grads64 = value_and_grads64(lambda *a: ref(*a, seg), (q, k, v, r), do)
  assert_close((o, *grads), (o64, *grads64), tolerance(impl, dtype, q, k),
               ("o", "dq", "dk", "dv", "dscores"))


# ---- LTE decode (inference only: forward) ----

RING, BUDGET = 8, 6


@pytest.mark.parametrize("impl,dtype", [("xla", jnp.bfloat16), ("pallas", jnp.float32)])
def test_lte_decode_adversarial(impl, dtype):
  """Cache rows of every pattern; fills from empty to full; num_tokens from the first
  token (one visible slot) to a wrapped ring; 2 queries."""
  q, k, v, _, _, _ = adversarial_inputs(dtype)
  q, k, v = q[:, :2], k[:, :RING + BUDGET], v[:, :RING + BUDGET]
  fill = jnp.asarray([[0], [BUDGET], [3], [BUDGET], [1], [0], [2]], jnp.int32)
  options = {"plan_options": {"block_k": 16}} if impl == "pallas" else {}
  fn = jax.jit(lambda q, k, v, n: lte_decode_attention(q, k, v, fill, n, ring_size=RING,
                                                       implementation=impl, **options))
  for num_tokens in (2, 5, 21):
    o = fn(q, k, v, jnp.asarray(num_tokens, jnp.int32))
    with jax.enable_x64(True):
      want = lte_decode_attention_reference(
          *(jnp.asarray(np.asarray(x, np.float64)) for x in (q, k, v)), fill, num_tokens,
          ring_size=RING, scale=SCALE)
    assert o.dtype == dtype
    assert_close((o,), (np.asarray(want),), tolerance(impl, dtype, q, k), (f"o@{num_tokens}",))


# ---- NSA ----

NSA = dict(block_size=8, block_count=3, window_size=5, scale=SCALE)


def test_nsa_adversarial():
  dtype = jnp.float32
  q, k, v, _, do, seg = adversarial_inputs(dtype)
  gates = jnp.asarray(np.random.default_rng(1).uniform(size=q.shape[:3] + (3,)), dtype)
  o, grads = value_and_grads(
      lambda *a: nsa_xla.nsa_attention_xla(*a, segment_ids=seg, **NSA),
      (q, k, v, gates), do)
  o64, grads64 = value_and_grads64(
      lambda *a: nsa_reference.nsa_attention_reference(*a, segment_ids=seg, **NSA),
      (q, k, v, gates), do)
  assert_close((o, *grads), (o64, *grads64), TOL[dtype], ("o", "dq", "dk", "dv", "dgates"))


def test_nsa_decode_adversarial():
  """nsa_decode at several positions equals those rows of the float64 reference
  (one document per row, so the rows' segment patterns are not used)."""
  q, k, v, _, _, _ = adversarial_inputs(jnp.float32)
  gates = jnp.asarray(np.random.default_rng(1).uniform(size=q.shape[:3] + (3,)), jnp.float32)
  length, bs = 64, NSA["block_size"]
  pad = lambda x: jnp.pad(x, ((0, 0), (0, length - TIME), (0, 0), (0, 0)))
  k_cache, v_cache = pad(k), pad(v)
  means = lambda x: jnp.mean(x.reshape(x.shape[0], length // bs, bs, *x.shape[2:]), axis=2)
  kw = {n: NSA[n] for n in ("block_size", "block_count", "window_size", "scale")}
  step = jax.jit(lambda qi, gi, p: nsa_decode(qi, k_cache, v_cache, means(k_cache),
                                              means(v_cache), gi, p, **kw))
  with jax.enable_x64(True):
    f64 = lambda x: jnp.asarray(np.asarray(x, np.float64))
    want = np.asarray(nsa_reference.nsa_attention_reference(
        f64(q), f64(k), f64(v), f64(gates), segment_ids=None, **NSA))
  for position in (0, 7, 23, 59):
    o = step(q[:, position:position + 1], gates[:, position:position + 1],
             jnp.asarray(position, jnp.int32))
    assert_close((o,), (want[:, position:position + 1],), TOL[jnp.float32], (f"o@{position}",))
