"""LTE scorer and LTE attention layer: init, receptive field, isolation, STE, cache parity."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lte_jax import configs
from lte_jax.layers.lte import LTEAttention, ring_positions
from lte_jax.layers.lte_scorer import LTEScorer
from lte_jax.ops.attention.reference import masked_attention_reference
from lte_jax.ops.lte_attention.reference import lte_mask_reference
from tests.quick_compile import quick_compile  # noqa: F401  (autouse fixture)

D_MODEL = 32

# Compiled once per module structure: eager op-by-op dispatch is far slower on CPU.
_score = nnx.jit(lambda s, k, v, seg=None: s(k, v, segment_ids=seg))
_forward = nnx.jit(lambda m, x, seg=None: m(x, segment_ids=seg))
_prefill = nnx.jit(lambda m, x, c: m.prefill(x, c))
_decode = nnx.jit(lambda m, x, c: m.decode(x, c))


def _cfg(**kw):
  base = dict(num_heads=4, num_kv_heads=2, head_dim=8, sink_size=2, window_size=12, budget=7,
              dropout=0.1, score_bias_init=0.0, target_kept=7, target_seq_len=90)
  base.update(kw)
  return configs.LTEConfig(**base)


def _layer(cfg, seed=0, init_std=0.3):
  layer = LTEAttention(cfg, D_MODEL, num_layers=2, init_std=init_std, rngs=nnx.Rngs(seed))
  layer.eval()
  return layer


def _normal(seed, *shape):
  # numpy draws: every jax.random shape would cost a compilation.
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def _kv(seed, b, t, h=2, d=8):
  return _normal(seed, b, t, h, d), _normal(seed + 1000, b, t, h, d)


# ---- scorer ----

def test_scorer_param_count_matches_paper():
  cfg = configs.LTEConfig(num_heads=16, num_kv_heads=16, head_dim=64)
  scorer = nnx.eval_shape(lambda: LTEScorer(cfg, rngs=nnx.Rngs(0)))
  n = sum(x.size for x in jax.tree.leaves(nnx.state(scorer, nnx.Param)))
  # 128->64->32->16 kernel-3 convs with bias, then 16->1 with bias: 32,385 per head.
  per_head = 128 * 64 * 3 + 64 + 64 * 32 * 3 + 32 + 32 * 16 * 3 + 16 + 16 + 1
  assert per_head == 32385
  assert n == 16 * per_head


@functools.cache
def _tiny_scorer() -> LTEScorer:
  """One scorer shared by the tests below (building one compiles its initialisers)."""
  return LTEScorer(_cfg(), rngs=nnx.Rngs(params=1, dropout=2))


@nnx.jit
def _grouped_conv_scorer(scorer, k, v):
  """Independent scorer: lax grouped convolutions (feature_group_count = Hkv), one document."""
  x = jnp.concatenate([k, v], axis=-1)
  bsz, t, h, _ = x.shape
  x = x.reshape(bsz, t, -1)  # channels head-major: group g = head g
  for kernel, bias, dil in zip(scorer.conv_kernels, scorer.conv_biases, scorer.dilations):
    ksize, _, c_in, c_out = kernel.shape
    rhs = jnp.transpose(kernel[...], (0, 2, 1, 3)).reshape(ksize, c_in, h * c_out)
    pad = dil * (ksize - 1) // 2
    x = jax.lax.conv_general_dilated(x, rhs, (1,), [(pad, pad)], rhs_dilation=(dil,),
                                     dimension_numbers=("NWC", "WIO", "NWC"),
                                     feature_group_count=h,
                                     precision=jax.lax.Precision.HIGHEST)
    x = jax.nn.silu(x + bias[...].reshape(-1))
  x = x.reshape(bsz, t, h, -1)
  logit = jnp.einsum("bthc,hc->bth", x, scorer.proj_kernel[...]) + scorer.proj_bias[...]
  return jax.nn.sigmoid(logit) - 0.5


def test_bf16_scorer_operands_stay_close_to_fp32():
  """scorer_dtype='bfloat16' (bf16 operands and products) on the same parameters:
  scores within bf16 rounding of the fp32 scorer's, still fp32 out; a bad name is refused."""
  fp32 = _tiny_scorer()
  bf16 = LTEScorer(_cfg(scorer_dtype="bfloat16"), rngs=nnx.Rngs(params=1, dropout=2))
  nnx.update(bf16, nnx.state(fp32, nnx.Param))
  fp32.eval(), bf16.eval()
  k, v = _kv(3, 2, 33)
  want, got = _score(fp32, k, v), _score(bf16, k, v)
  assert got.dtype == jnp.float32
  assert not np.array_equal(got, want)             # the operands really are rounded
  np.testing.assert_allclose(got, want, atol=2e-2)
  with pytest.raises(ValueError, match="LTEConfig.scorer_dtype"):
    _cfg(scorer_dtype="float16")
  # None (the default) follows the layer's compute dtype, as autocast would.
  follow = lambda dtype: LTEScorer(_cfg(), rngs=nnx.Rngs(0), dtype=dtype).operand_dtype
  assert follow(None) == follow(jnp.float32) == jnp.float32
  assert follow(jnp.bfloat16) == jnp.bfloat16


def test_scorer_shapes_init_and_zero_input():
  scorer = _tiny_scorer()
  scorer.eval()
  k, v = _kv(0, 3, 17)
  r = _score(scorer, k, v)
  assert r.shape == (3, 17, 2) and r.dtype == jnp.float32
  assert np.all(np.abs(np.asarray(r)) < 0.5)
  np.testing.assert_allclose(r, _grouped_conv_scorer(scorer, k, v), rtol=1e-5, atol=1e-6)
  # Kaiming normal (fan_in, relu gain): std sqrt(2 / (C_in x 3)); biases zero; proj bias 0.5.
  assert scorer.channels == (16, 8, 4, 2)
  for kernel, bias, rtol in zip(scorer.conv_kernels, scorer.conv_biases, (0.1, 0.2)):
    kern = np.asarray(kernel[...])
    assert kern.shape[:2] == (3, 2)
    np.testing.assert_allclose(kern.std(), np.sqrt(2 / (kern.shape[2] * 3)), rtol=rtol)
  assert all(np.all(np.asarray(b[...]) == 0) for b in scorer.conv_biases)
  np.testing.assert_allclose(scorer.proj_bias[...], 0.0)  # _cfg sets score_bias_init = 0
  big = nnx.eval_shape(lambda: LTEScorer(configs.LTEConfig(), rngs=nnx.Rngs(0)))
  assert [tuple(kk.shape) for kk in big.conv_kernels] == [(3, 16, 128, 64), (3, 16, 64, 32),
                                                          (3, 16, 32, 16)]
  zero = jnp.zeros((2, 9, 2, 8))
  with_bias = LTEScorer(_cfg(score_bias_init=0.5), rngs=nnx.Rngs(1))
  np.testing.assert_allclose(_score(with_bias, zero, zero), jax.nn.sigmoid(0.5) - 0.5, rtol=1e-6)
  assert float(jax.nn.sigmoid(0.5) - 0.5) > 0  # retain-all at the start of training


def test_scorer_generalises_to_value_dim():
  cfg = configs.LTEConfig(num_heads=2, num_kv_heads=2, head_dim=16)

  scorer = nnx.eval_shape(lambda: LTEScorer(cfg, rngs=nnx.Rngs(0), head_v_dim=32))
  assert scorer.channels == (48, 24, 12, 6)
  r = nnx.eval_shape(lambda: LTEScorer(cfg, rngs=nnx.Rngs(0), head_v_dim=32)(
      jnp.ones((1, 10, 2, 16)), jnp.ones((1, 10, 2, 32))))
  assert r.shape == (1, 10, 2)
  with pytest.raises(ValueError, match="v must have shape"):
    nnx.eval_shape(lambda: LTEScorer(cfg, rngs=nnx.Rngs(0), head_v_dim=32)(
        jnp.ones((1, 10, 2, 16)), jnp.ones((1, 10, 2, 16))))


def test_scorer_receptive_field_is_13():
  scorer = _tiny_scorer()
  scorer.eval()
  k, v = _kv(2, 1, 40)
  base = np.asarray(_score(scorer, k, v))
  t = 20
  changed = np.abs(np.asarray(_score(scorer, k.at[:, t].add(3.0), v)) - base).max(axis=(0, 2)) > 0
  idx = np.flatnonzero(changed)
  assert idx.min() == t - 6 and idx.max() == t + 6
  # Three kernel-3 convs of dilation 2 only read even offsets: 7 of the 13 positions.
  assert set(idx.tolist()) == {t + o for o in range(-6, 7, 2)}


def test_scorer_documents_are_isolated_and_padding_masked():
  scorer = _tiny_scorer()
  scorer.eval()
  runs = [(1, 9), (2, 14), (1, 5), (0, 4)]  # the second run of id 1 is a new document
  seg = np.concatenate([np.full(n, i) for i, n in runs])[None].astype(np.int32)
  k, v = _kv(4, 1, seg.shape[1])
  r = np.asarray(_score(scorer, k, v, jnp.asarray(seg)))
  start = 0
  for _, n in runs[:3]:
    alone = _grouped_conv_scorer(scorer, k[:, start:start + n], v[:, start:start + n])
    np.testing.assert_allclose(r[:, start:start + n], alone, rtol=1e-5, atol=1e-6)
    start += n
  # Padding: its input is zeroed, so its score is the bias' and its content is ignored.
  np.testing.assert_allclose(r[:, start:], jax.nn.sigmoid(0.0) - 0.5, atol=1e-7)
  r2 = _score(scorer, k.at[:, start:].set(5.0), v.at[:, start:].set(-5.0), jnp.asarray(seg))
  np.testing.assert_array_equal(r2, r)


def test_scorer_dropout_only_in_train_mode():
  scorer = _tiny_scorer()
  k, v = _kv(5, 1, 40)
  scorer.train()
  try:
    assert not np.allclose(_score(scorer, k, v), _score(scorer, k, v))
  finally:
    scorer.eval()
  np.testing.assert_array_equal(_score(scorer, k, v), _score(scorer, k, v))


# ---- layer: forward and straight-through gradient ----

def _ste_expectations(layer, x, w):
  """Layer output, scores, actual scorer grads and the grads the STE rule predicts."""
  bsz, t, _ = x.shape
  y, aux = layer(x)
  r = aux["retention"]
  q = layer.q_proj(x).reshape(bsz, t, 4, 8)
  k_raw = layer.k_proj(x).reshape(bsz, t, 2, 8)
  v = layer.v_proj(x).reshape(bsz, t, 2, 8)
  pos = jnp.broadcast_to(jnp.arange(t), (bsz, t))
  q, k = layer._rope(q, pos), layer._rope(k_raw, pos)
  mask = lte_mask_reference(r, sink_size=2, window_size=12, budget=None, segment_ids=None)

  def out(v_):  # attention with the hard mask frozen and plain values
    o = masked_attention_reference(q, k, v_, mask, scale=8 ** -0.5)
    return layer.o_proj(o.reshape(bsz, t, 32))

  # STE: dL/dr[b, j, h] = sum_d v[b, j, h, d] dL/dv'[b, j, h, d]; the scorer gets its VJP.
  g_v = jax.grad(lambda v_: jnp.sum(out(v_) * w))(v)
  g_r = jnp.sum(v * g_v, axis=-1)
  graphdef, params, rest = nnx.split(layer.scorer, nnx.Param, ...)
  _, vjp = jax.vjp(lambda p: nnx.merge(graphdef, p, rest)(k_raw, v), params)
  (want,) = vjp(g_r)
  got = nnx.grad(lambda m: jnp.sum(m(x)[0] * w))(layer)["scorer"]
  return y, out(v), r, got, want


def test_forward_is_plain_masked_attention_and_ste_trains_the_scorer():
  cfg = _cfg(dropout=0.0, window_size=12)
  layer = _layer(cfg, seed=7)
  x = _normal(8, 2, 40, D_MODEL)
  w = _normal(9, 2, 40, D_MODEL)
  y, y_plain, r, got, want = nnx.jit(_ste_expectations)(layer, x, w)
  assert y.shape == x.shape and r.shape == (2, 40, 2) and r.dtype == jnp.float32
  assert 0.1 < float((r > 0).mean()) < 0.9
  np.testing.assert_allclose(y, y_plain, rtol=1e-5, atol=1e-6)  # forward unchanged by the STE
  leaves_got, leaves_want = jax.tree.leaves(got), jax.tree.leaves(want)
  assert len(leaves_got) == len(leaves_want) == 8
  for g, e in zip(leaves_got, leaves_want):
    assert float(jnp.abs(g).max()) > 0
    np.testing.assert_allclose(g, e, rtol=2e-4, atol=1e-6)


def test_packed_documents_match_separate_rows():
  cfg = _cfg(dropout=0.0)
  layer = _layer(cfg, seed=11)
  layer.enforce_budget = True
  x = _normal(12, 1, 50, D_MODEL)
  seg = jnp.asarray(np.repeat([1, 2], [25, 25])[None], jnp.int32)
  y, aux = _forward(layer, x, seg)
  y1, a1 = _forward(layer, x[:, :25])
  y2, a2 = _forward(layer, x[:, 25:])
  np.testing.assert_allclose(y, jnp.concatenate([y1, y2], 1), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(aux["retention"],
                             jnp.concatenate([a1["retention"], a2["retention"]], 1),
                             rtol=1e-5, atol=1e-6)


# ---- cache ----

def _simulate_cache(r, sink_size, window_size, budget, num_tokens, prompt_len):
  """Independent streaming model of the retained segment from full-forward scores r [B, T, H].

  Returns per (b, h) the sorted retained positions, and counts of append /
  replace / reject events during decoding (evictions after the prompt).
  """
  bsz, _, heads = r.shape
  ring = window_size + 1
  kept, events = {}, {"append": 0, "replace": 0, "reject": 0}
  for b in range(bsz):
    for h in range(heads):
      slots = []  # (score, position)
      for e in range(max(num_tokens - ring, 0)):
        s = np.inf if e < sink_size else float(r[b, e, h])
        if s <= 0:
          continue
        if len(slots) < budget:
          slots.append((s, e))
          event = "append"
        else:
          low = min(slots, key=lambda sp: (sp[0], -sp[1]))
          event = "replace" if s > low[0] else "reject"
          if event == "replace":
            slots[slots.index(low)] = (s, e)
        if e + ring >= prompt_len:  # evicted by decode, not by prefill
          events[event] += 1
      kept[b, h] = sorted(p for _, p in slots)
  return kept, events


def _run_cache(layer, x, prompt_len):
  bsz, total, _ = x.shape
  cache = layer.init_cache(bsz, total)
  outs = []
  if prompt_len:
    y, cache = _prefill(layer, x[:, :prompt_len], cache)
    outs.append(y)
  for t in range(prompt_len, total):
    y, cache = _decode(layer, x[:, t:t + 1], cache)
    outs.append(y)
  return jnp.concatenate(outs, axis=1), cache


@pytest.mark.parametrize("window,prompt_len", [
    (12, 0),    # decode only; ring of 13 = 2 x look-ahead + 1: scoring every step
    (12, 7),    # prompt shorter than the window
    (12, 17),   # between w + 1 and w + 1 + b
    (12, 45),   # long prompt: prefill already evicts and replaces
    (17, 3),    # scoring every 6 steps; prompt shorter than the look-ahead
])
def test_prefill_decode_match_budgeted_full_forward(window, prompt_len):
  cfg = _cfg(window_size=window)
  layer = _layer(cfg, seed=window)
  layer.enforce_budget = True
  total = 96
  x = _normal(prompt_len, 2, total, D_MODEL)
  y_full, aux = _forward(layer, x)
  r = np.asarray(aux["retention"])
  y_cache, cache = _run_cache(layer, x, prompt_len)
  np.testing.assert_allclose(y_cache, y_full, rtol=1e-5, atol=2e-5)

  layer.enforce_budget = False
  y_free, _ = _forward(layer, x)
  assert float(jnp.abs(y_free - y_full).max()) > 1e-3  # the budget really binds

  # The cache's retained segment is the streaming top-b of the full-forward scores.
  kept, events = _simulate_cache(r, cfg.sink_size, window, cfg.budget, total, prompt_len)
  assert events["replace"] > 0 and events["reject"] > 0, events
  if prompt_len < window + 1 + cfg.budget:
    assert events["append"] > 0, events
  w1 = window + 1
  ret_pos = np.asarray(cache["ret_pos"])
  ret_score = np.asarray(cache["score"][:, w1:])
  for (b, h), want in kept.items():
    n = int(cache["fill"][b, h])
    assert n == len(want)
    assert sorted(ret_pos[b, :n, h].tolist()) == want
    assert np.all(ret_pos[b, n:, h] == -1)
    for slot in range(n):
      p = ret_pos[b, slot, h]
      expect = np.inf if p < cfg.sink_size else r[b, p, h]
      np.testing.assert_allclose(ret_score[b, slot, h], expect, rtol=1e-5, atol=1e-6)
  # Ring scores are final (the full-sequence CNN's) for every position below 'scored'.
  assert int(cache["pos"]) == total
  scored = int(cache["scored"])
  assert scored >= total - w1 + cfg.lookahead
  ring_pos = np.asarray(ring_positions(jnp.asarray(total), w1))
  for slot, p in enumerate(ring_pos):
    if 0 <= p < scored:
      expect = np.where(p < cfg.sink_size, np.inf, r[:, p])
      np.testing.assert_allclose(cache["score"][:, slot], expect, rtol=1e-5, atol=1e-6)


def test_cache_size_is_constant():
  cfg = _cfg()
  layer = _layer(cfg, seed=5)
  small, big = layer.init_cache(2, 8), layer.init_cache(2, 100_000)
  assert jax.tree.map(lambda a: (a.shape, a.dtype), small) == \
      jax.tree.map(lambda a: (a.shape, a.dtype), big)
  x = _normal(6, 2, 200, D_MODEL)
  _, c20 = _run_cache(layer, x[:, :20], 5)
  _, c200 = _run_cache(layer, x, 5)
  spec = lambda c: jax.tree.map(lambda a: (a.shape, a.dtype, a.nbytes), c)
  assert spec(c20) == spec(c200) == spec(small)
  assert int(c200["pos"]) == 200
  nbytes = sum(a.nbytes for a in jax.tree.leaves(c200))
  w1, b, h, d = 13, 7, 2, 8
  assert nbytes == 2 * ((w1 + b) * h * d * 4 * 2 + w1 * h * d * 4 + (w1 + b) * h * 4
                        + b * h * 4 + h * 4) + 8


def test_ring_positions():
  np.testing.assert_array_equal(ring_positions(jnp.asarray(0), 4), [-1, -1, -1, -1])
  np.testing.assert_array_equal(ring_positions(jnp.asarray(3), 4), [0, 1, 2, -1])
  np.testing.assert_array_equal(ring_positions(jnp.asarray(6), 4), [4, 5, 2, 3])


def test_bad_inputs_raise_value_errors():
  cfg = _cfg()
  layer = _layer(cfg)
  cache = layer.init_cache(2, 10)
  with pytest.raises(ValueError, match="x must have shape"):
    layer.decode(jnp.zeros((2, 2, D_MODEL)), cache)
  with pytest.raises(ValueError, match="cache"):
    layer.decode(jnp.zeros((2, 1, D_MODEL)), {"k": cache["k"]})
  with pytest.raises(ValueError, match="cache\\['k'\\]"):
    layer.prefill(jnp.zeros((3, 4, D_MODEL)), cache)
  with pytest.raises(ValueError, match="segment_ids"):
    layer(jnp.zeros((2, 4, D_MODEL)), segment_ids=jnp.zeros((2, 5), jnp.int32))
  with pytest.raises(ValueError, match="cfg"):
    LTEAttention(configs.AttentionConfig(), D_MODEL, num_layers=1, init_std=0.02,
                 rngs=nnx.Rngs(0))
