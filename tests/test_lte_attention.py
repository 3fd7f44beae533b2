"""LTE attention: the exact attention set Z_{i,h}, the budget rule, the straight-through gradient."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lte_jax.ops.lte_attention import lte_attention
from lte_jax.ops.lte_attention import xla as lte_xla
from tests import helpers
from tests.helpers import rel_rms
from tests.quick_compile import quick_compile  # noqa: F401  (autouse fixture)

STATIC = ("sink_size", "window_size", "budget", "scale", "implementation")


def packed_segment_ids(rng, batch, time):
  """Random documents, many of one token, and a padding tail (id 0)."""
  return helpers.packed_segment_ids(rng, batch, time, lengths=(1, 1, 2, 4, 9, 25), padding=2,
                                    pad_if_longer_than=0)


def doc_positions(seg_row):
  pos, start = [], 0
  for t, s in enumerate(seg_row):
    if t > 0 and s != seg_row[t - 1]:
      start = t
    pos.append(t - start)
  return pos


def expected_mask(r, seg, sink, window, budget):
  """[B, H, T, T] from the set definition; with a budget, a plain streaming cache per head.

  The cache takes each token as it leaves the window (in time order, restarting
  at each document): appended if there is room, else it replaces the
  lowest-scored entry (the latest of equal lowest) only when strictly higher.
  """
  batch, time, heads = r.shape
  want = np.zeros((batch, heads, time, time), bool)
  for b in range(batch):
    pos = doc_positions(seg[b])
    for h in range(heads):
      cache, fed = [], 0
      for i in range(time):
        if pos[i] == 0:
          cache, fed = [], i
        if budget is not None:
          while fed <= i - window - 1:
            j, fed = fed, fed + 1
            if pos[j] < sink or r[b, j, h] <= 0:
              continue
            if len(cache) < budget - sink:
              cache.append(j)
              continue
            worst = min(cache, key=lambda x: (r[b, x, h], -x))
            if r[b, j, h] > r[b, worst, h]:
              cache[cache.index(worst)] = j
        for j in range(i - pos[i], i + 1):
          if budget is None:
            late = r[b, j, h] > 0
          else:
            late = j in cache
          want[b, h, i, j] = pos[j] < sink or i - j <= window or late
  return want


@functools.partial(jax.jit, static_argnames=STATIC + ("block",))
def attention_weights(q, k, scores, segment_ids, *, sink_size, window_size, budget, scale,
                      implementation, block):
  """[B, T, Hq, T]: v_j = e_j, so each output row is the query's attention weights."""
  batch, time, num_kv_heads = scores.shape
  v = jnp.broadcast_to(jnp.eye(time, dtype=jnp.float32)[None, :, None, :],
                       (batch, time, num_kv_heads, time))
  kwargs = dict(sink_size=sink_size, window_size=window_size, budget=budget,
                segment_ids=segment_ids, scale=scale)
  if implementation == "xla-blocked":
    return lte_xla.lte_attention_xla(q, k, v, scores, block_q=block, block_k=block, **kwargs)
  return lte_attention(q, k, v, scores, implementation=implementation, **kwargs)


# (Hq, Hkv, sink, window, budget, documents, score levels)
PATTERNS = [
    (4, 2, 0, 0, None, False, (-0.3, 0.0, 0.2)),
    (2, 2, 1, 1, None, True, (-0.3, 0.0, 0.2)),
    (4, 1, 3, 4, None, True, (-0.2, 0.1)),
    (4, 2, 2, 50, None, False, (-0.2, 0.1)),
    (4, 2, 0, 0, 3, False, (-0.2, 0.0, 0.1, 0.2, 0.3)),
    (2, 2, 2, 3, 5, True, (-0.2, 0.0, 0.1, 0.2, 0.3)),
    (4, 1, 1, 1, 2, True, (-0.1, 0.1, 0.3)),
    (4, 2, 4, 2, 40, True, (0.1, 0.2)),
]


@pytest.mark.parametrize("pattern", PATTERNS, ids=lambda p: f"H{p[0]}/{p[1]}-s{p[2]}-w{p[3]}-"
                         f"b{p[4]}-seg{int(p[5])}")
def test_attention_set_is_exact(pattern):
  num_heads, num_kv_heads, sink, window, budget, docs, levels = pattern
  batch, time, dim = 2, 40, 16
  rng = np.random.default_rng(sink * 100 + window)
  q = jnp.asarray(0.1 * rng.standard_normal((batch, time, num_heads, dim)), jnp.float32)
  k = jnp.asarray(rng.standard_normal((batch, time, num_kv_heads, dim)), jnp.float32)
  r = rng.choice(np.asarray(levels, np.float32), (batch, time, num_kv_heads))
  seg = packed_segment_ids(rng, batch, time) if docs else None
  want = expected_mask(r, seg if docs else np.zeros((batch, time), np.int32), sink, window,
                       budget)
  group = num_heads // num_kv_heads
  for impl in ("reference", "xla", "xla-blocked"):
    w = attention_weights(q, k, jnp.asarray(r), None if seg is None else jnp.asarray(seg),
                          sink_size=sink, window_size=window, budget=budget, scale=0.25,
                          implementation=impl, block=16)
    got = np.transpose(np.asarray(w) > 0, (0, 2, 1, 3))  # [B, Hq, T, T]
    for h in range(num_heads):
      np.testing.assert_array_equal(got[:, h], want[:, h // group], err_msg=f"{impl} head {h}")


def test_budget_keeps_top_scores_with_earlier_ties():
  """One head, no documents: hand-checked budget decisions."""
  r = np.asarray([0.5, -1, 0.2, 0.2, 0.3, 0.2, 0.4, 0.1, 0.1, 0.1], np.float32)
  time = len(r)
  # sink 1, window 1, budget 3 -> 2 slots. Query 9 sees j <= 7 as candidates:
  # {2: .2, 3: .2, 4: .3, 5: .2, 6: .4, 7: .1} -> top two are 6 and 4.
  # Query 5 sees j <= 3: {2: .2, 3: .2} -> both. Query 6 sees j <= 4: 4 beats 3 (tie 2 < 3 kept).
  q = jnp.zeros((1, time, 1, 4))
  k = jnp.zeros((1, time, 1, 4))
  for impl in ("reference", "xla", "xla-blocked"):
    w = attention_weights(q, k, jnp.asarray(r)[None, :, None], None, sink_size=1, window_size=1,
                          budget=3, scale=1.0, implementation=impl, block=4)
    seen = np.asarray(w)[0, :, 0] > 0
    assert set(np.flatnonzero(seen[9])) == {0, 4, 6, 8, 9}, impl
    assert set(np.flatnonzero(seen[5])) == {0, 2, 3, 4, 5}, impl
    assert set(np.flatnonzero(seen[6])) == {0, 2, 4, 5, 6}, impl


def make_inputs(seed, batch, time, num_heads, num_kv_heads, dim, dim_v, dtype):
  rng = np.random.default_rng(seed)
  shapes = [(batch, time, num_heads, dim), (batch, time, num_kv_heads, dim),
            (batch, time, num_kv_heads, dim_v), (batch, time, num_heads, dim_v)]
  q, k, v, do = (jnp.asarray(rng.standard_normal(s, np.float32), dtype) for s in shapes)
  r = jnp.asarray(0.3 * rng.standard_normal((batch, time, num_kv_heads)), jnp.float32)
  return q, k, v, r, do


def grads_of(fn, q, k, v, r, do):
  """(o, (dq, dk, dv, dr)) under the loss sum(o * do)."""
  def loss(q, k, v, r):
    o = fn(q, k, v, r)
    return jnp.sum(o.astype(jnp.float32) * do.astype(jnp.float32)), o

  @jax.jit
  def run(q, k, v, r):
    (_, o), grads = jax.value_and_grad(loss, argnums=(0, 1, 2, 3), has_aux=True)(q, k, v, r)
    return o, grads
  return run(q, k, v, r)


# (batch, time, Hq, Hkv, D, Dv, sink, window, budget, documents, dtype, block)
CASES = [
    (2, 75, 4, 2, 100, 48, 2, 7, None, True, jnp.float32, 16),
    (1, 130, 2, 2, 32, 20, 4, 0, 9, False, jnp.bfloat16, 32),
    (1, 130, 4, 2, 32, 32, 0, 1, None, True, jnp.bfloat16, 512),
    (2, 75, 4, 2, 100, 20, 3, 5, 6, True, jnp.float32, 512),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"T{c[1]}-H{c[2]}/{c[3]}-D{c[4]}/{c[5]}-"
                         f"s{c[6]}-w{c[7]}-b{c[8]}-{jnp.dtype(c[10]).name}-blk{c[11]}")
def test_xla_matches_reference(case):
  batch, time, hq, hkv, d, dv, sink, window, budget, docs, dtype, block = case
  q, k, v, r, do = make_inputs(time + d, batch, time, hq, hkv, d, dv, dtype)
  seg = jnp.asarray(packed_segment_ids(np.random.default_rng(time), batch, time)) if docs else None
  kwargs = dict(sink_size=sink, window_size=window, budget=budget, segment_ids=seg)
  o_ref, g_ref = grads_of(
      lambda q, k, v, r: lte_attention(q, k, v, r, implementation="reference", **kwargs),
      q, k, v, r, do)
  o_xla, g_xla = grads_of(
      lambda q, k, v, r: lte_xla.lte_attention_xla(q, k, v, r, scale=d ** -0.5, block_q=block,
                                                   block_k=block, **kwargs),
      q, k, v, r, do)
  assert o_xla.dtype == dtype and o_xla.shape == (batch, time, hq, dv)
  tol_o, tol_g = (2e-5, 5e-5) if dtype == jnp.float32 else (1e-2, 2e-2)
  assert rel_rms(o_xla, o_ref) < tol_o
  for name, got, want in zip(("q", "k", "v", "scores"), g_xla, g_ref):
    assert got.dtype == (jnp.float32 if name == "scores" else dtype), name
    assert rel_rms(got, want) < tol_g, name


@pytest.mark.parametrize("implementation", ["reference", "xla"])
def test_straight_through_gradient(implementation):
  """Forward ignores how scores are differentiated; d scores = sum_d v * dL/dv'."""
  q, k, v, r, do = make_inputs(0, 2, 37, 4, 2, 16, 12, jnp.float32)
  seg = jnp.asarray(packed_segment_ids(np.random.default_rng(0), 2, 37))
  op = functools.partial(lte_attention, sink_size=2, window_size=3, segment_ids=seg,
                         implementation=implementation)
  loss = lambda q, k, v, r: jnp.sum(op(q, k, v, r) * do)

  o = jax.jit(op)(q, k, v, r)
  np.testing.assert_array_equal(o, jax.jit(op)(q, k, v, jax.lax.stop_gradient(r)))
  np.testing.assert_allclose(o, lte_attention(q, k, v, r, sink_size=2, window_size=3,
                                              segment_ids=seg, implementation="reference"),
                             atol=2e-5, rtol=2e-5)

  grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))(q, k, v, r)
  # v' as an explicit input: with r held constant the op is plain masked attention of v'.
  dv_prime = jax.jit(jax.grad(lambda vp: loss(q, k, vp, jax.lax.stop_gradient(r))))(v)
  want_dr = np.sum(np.asarray(v, np.float64) * np.asarray(dv_prime, np.float64), axis=-1)
  np.testing.assert_allclose(grads[3], want_dr, atol=1e-5, rtol=1e-4)
  np.testing.assert_allclose(grads[2], dv_prime, atol=1e-6, rtol=1e-6)
  assert np.abs(np.asarray(grads[3])).max() > 1e-3  # the check above is not vacuous

  # The hard mask carries no gradient: with v = 0 nothing reaches the scores.
  dr_zero_v = jax.jit(jax.grad(loss, argnums=3))(q, k, jnp.zeros_like(v), r)
  np.testing.assert_array_equal(dr_zero_v, 0.0)


def test_bf16_scores_and_values():
  q, k, v, r, do = make_inputs(1, 1, 24, 2, 1, 16, 16, jnp.bfloat16)
  r = r.astype(jnp.bfloat16)
  fn = jax.jit(jax.grad(lambda r: jnp.sum(lte_attention(q, k, v, r, sink_size=1, window_size=2)
                                          .astype(jnp.float32) * do.astype(jnp.float32))))
  dr = fn(r)
  assert dr.dtype == jnp.bfloat16 and np.all(np.isfinite(np.asarray(dr, np.float32)))


def test_implementation_choice():
  q, k, v, r, _ = make_inputs(0, 1, 8, 2, 2, 16, 16, jnp.float32)
  with pytest.raises(ValueError, match="implementation must be one of.*'xla', 'pallas'"):
    lte_attention(q, k, v, r, sink_size=1, window_size=2, implementation="cudnn")
  with pytest.raises(ValueError, match="plan_options is only accepted with implementation='pallas'"):
    lte_attention(q, k, v, r, sink_size=1, window_size=2, plan_options={"block_q": 16})


def test_plan_options_follow_the_resolved_default(monkeypatch):
  """implementation=None with plan_options, where the default is 'pallas' (a GPU): the
  options reach the kernels (model configs tune the default this way)."""
  from lte_jax.ops.lte_attention import api
  q, k, v, r, _ = make_inputs(0, 1, 8, 2, 2, 16, 16, jnp.float32)
  monkeypatch.setitem(api.DEFAULT_IMPLEMENTATIONS, jax.default_backend(), "pallas")
  kw = dict(sink_size=1, window_size=2, plan_options={"block_q": 16, "block_k": 16})
  np.testing.assert_array_equal(lte_attention(q, k, v, r, **kw),
                                lte_attention(q, k, v, r, implementation="pallas", **kw))
  with pytest.raises(ValueError, match="block_q must be"):
    lte_attention(q, k, v, r, sink_size=1, window_size=2, plan_options={"block_q": 24})


@pytest.mark.parametrize("kwargs,match", [
    (dict(scores=jnp.zeros((1, 8, 2))), "scores must have shape"),
    (dict(scores=jnp.zeros((1, 8))), "scores must have rank 3"),
    (dict(scores=jnp.zeros((1, 8, 1), jnp.int32)), "scores must have dtype"),
    (dict(sink_size=-1), "sink_size must be an integer >= 0"),
    (dict(sink_size=1.0), "sink_size must be an integer >= 0"),
    (dict(window_size=None), "window_size must be an integer >= 0"),
    (dict(window_size=-2), "window_size must be an integer >= 0"),
    (dict(budget=2), "budget must be None or an integer > sink_size=2"),
    (dict(budget=0), "budget must be an integer >= 1"),
    (dict(budget=4.0), "budget must be an integer >= 1"),
    (dict(segment_ids=jnp.zeros((2, 8), jnp.int32)), "segment_ids must have shape"),
    (dict(scale=0.0), "scale must be None or a positive number"),
    (dict(k=jnp.zeros((1, 8, 3, 16)), v=jnp.zeros((1, 8, 3, 16)),
          scores=jnp.zeros((1, 8, 3))), "multiple of k/v heads"),
    (dict(v=jnp.zeros((1, 7, 1, 16))), "v must have shape"),
])
def test_bad_input_raises(kwargs, match):
  args = dict(q=jnp.zeros((1, 8, 2, 16)), k=jnp.zeros((1, 8, 1, 16)), v=jnp.zeros((1, 8, 1, 16)),
              scores=jnp.zeros((1, 8, 1)), sink_size=2, window_size=3)
  args.update(kwargs)
  q, k, v, scores = (args.pop(n) for n in ("q", "k", "v", "scores"))
  with pytest.raises(ValueError, match=match):
    lte_attention(q, k, v, scores, **args)


def test_default_implementation_per_backend():
  from lte_jax.ops.lte_attention.api import default_implementation
  assert default_implementation("cpu") == "xla"
  assert default_implementation("gpu") == "pallas"   # timed on an H200 (BENCHMARKS.md)
  assert default_implementation("tpu") == "xla"      # Mosaic kernels only lowered so far
