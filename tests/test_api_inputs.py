"""Bad API input: a ValueError naming the argument where values are concrete, and the
documented behaviour under jit (traced values are not checked: that needs a host sync)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lte_jax import configs
from lte_jax.configs import AttentionConfig, LTEConfig, NSAConfig
from lte_jax.layers import Attention, NSAAttention
from lte_jax.models import HybridLM
from lte_jax.ops import attention, chunk_gated_delta_rule, lte_attention, masked_attention
from lte_jax.ops.lte_decode import lte_decode_attention
from lte_jax.ops.nsa_attention import nsa_attention, nsa_decode

VOCAB = 64


def _zeros(*shape, dtype=jnp.float32):
  return jnp.zeros(shape, dtype)


@pytest.fixture(scope="module")
def model():
  cfg = configs.get_config("transformer", "tiny", num_layers=1, vocab_size=VOCAB, d_model=32,
                           intermediate_size=64,
                           attn=AttentionConfig(num_heads=2, num_kv_heads=1, head_dim=16))
  return HybridLM(cfg, rngs=nnx.Rngs(0))


# ---- token ids ----

@pytest.mark.parametrize("bad", [-1, VOCAB, 2 ** 31 - 1])
def test_out_of_range_token_ids_raise(model, bad):
  tokens = np.arange(8, dtype=np.int32)[None].copy()
  tokens[0, 3] = bad
  with pytest.raises(ValueError, match=rf"tokens must be token ids in \[0, vocab_size\) = "
                                       rf"\[0, {VOCAB}\), got {bad} at index \(0, 3\)"):
    model(tokens)
  with pytest.raises(ValueError, match="tokens must be token ids"):
    model.prefill(jnp.asarray(tokens), model.init_cache(1, 16))
  with pytest.raises(ValueError, match="tokens must be token ids"):
    model.decode(jnp.asarray([[bad]], jnp.int32), model.init_cache(1, 16))


def test_out_of_range_token_ids_under_jit_give_nan_logits_at_their_position(model):
  """Traced ids: the bad position's logits are NaN, every other row stays finite (the
  bad token reads as a zero embedding). Before, -1 silently read the last embedding and
  an id >= vocab made the whole row NaN."""
  forward = nnx.jit(lambda m, t: m(t)[0])
  tokens = jnp.asarray([[5, 6, -1, 7, 8], [1, 2, 3, VOCAB, 4]], jnp.int32)
  logits = np.asarray(forward(model, tokens))
  bad = np.zeros(tokens.shape, bool)
  bad[0, 2] = bad[1, 3] = True
  assert np.isnan(logits[bad]).all()
  assert np.isfinite(logits[~bad]).all()
  # The rows before the bad token are unchanged; decode marks its step the same way.
  clean = np.asarray(forward(model, jnp.asarray([[5, 6], [1, 2]], jnp.int32)))
  np.testing.assert_allclose(logits[:, :2], clean, rtol=1e-6, atol=1e-6)
  step = nnx.jit(lambda m, t, c: m.decode(t, c)[0])
  out = np.asarray(step(model, jnp.asarray([[VOCAB + 5], [3]], jnp.int32),
                        model.init_cache(2, 4)))
  assert np.isnan(out[0]).all() and np.isfinite(out[1]).all()


@pytest.mark.parametrize("shape", [(0, 4), (2, 0)])
def test_empty_tokens_raise(model, shape):
  with pytest.raises(ValueError, match=r"tokens must have every dimension >= 1"):
    model(np.zeros(shape, np.int32))


# ---- decoding past max_len ----

def _layer(kind):
  if kind == "attn":
    return Attention(AttentionConfig(num_heads=2, num_kv_heads=1, head_dim=16), 32,
                     num_layers=1, init_std=0.02, rngs=nnx.Rngs(0))
  return NSAAttention(NSAConfig(num_heads=2, num_kv_heads=1, head_dim=16, block_size=4,
                                block_count=3, window_size=4), 32, num_layers=1,
                      init_std=0.02, rngs=nnx.Rngs(0))


@pytest.mark.parametrize("kind", ["attn", "nsa"])
def test_decoding_past_max_len(kind):
  """A concrete position past the cache raises; under jit the step's output is NaN
  (before: a silently wrong answer, the last slot overwritten)."""
  layer = _layer(kind)
  x = jnp.asarray(np.random.default_rng(0).standard_normal((1, 1, 32)), jnp.float32)
  cache = layer.init_cache(1, 8)
  assert cache["k"].shape[1] == 8
  full = dict(cache, pos=jnp.asarray(8, jnp.int32))   # as after 8 tokens
  with pytest.raises(ValueError, match=r"cache\['pos'\] must be < max_len=8 \(the cache is "
                                       r"full: make it with a larger max_len\), got 8"):
    layer.decode(x, full)
  step = nnx.jit(lambda m, x, c: m.decode(x, c))
  y, after = step(layer, x, full)
  assert np.isnan(np.asarray(y)).all() and int(after["pos"]) == 9
  # The last slot is still a valid step.
  y, _ = step(layer, x, dict(cache, pos=jnp.asarray(7, jnp.int32)))
  assert np.isfinite(np.asarray(y)).all()


def test_nsa_decode_position_outside_the_cache():
  q, gates = _zeros(1, 1, 2, 16), _zeros(1, 1, 2, 3)
  kv, means = _zeros(1, 8, 1, 16), _zeros(1, 2, 1, 16)
  kw = dict(block_size=4, block_count=3, window_size=3)
  for position in (8, -1):
    with pytest.raises(ValueError, match=rf"position must be in \[0, cache length\) = "
                                         rf"\[0, 8\), got {position}"):
      nsa_decode(q, kv, kv, means, means, gates, jnp.asarray(position), **kw)
  step = jax.jit(lambda p: nsa_decode(q, kv, kv, means, means, gates, p, **kw))
  assert np.isnan(np.asarray(step(jnp.asarray(8)))).all()
  assert np.isfinite(np.asarray(step(jnp.asarray(7)))).all()


# ---- LTE decode cache counters ----

def test_lte_decode_fill_and_num_tokens():
  rng = np.random.default_rng(0)
  q = jnp.asarray(rng.standard_normal((1, 1, 2, 16)), jnp.float32)
  k, v = (jnp.asarray(rng.standard_normal((1, 12, 1, 16)), jnp.float32) for _ in range(2))
  kw = dict(ring_size=8, implementation="xla")
  with pytest.raises(ValueError, match=r"fill must be in \[0, cache slots - ring_size\] = "
                                       r"\[0, 4\], got 5"):
    lte_decode_attention(q, k, v, jnp.full((1, 1), 5, jnp.int32), 9, **kw)
  with pytest.raises(ValueError, match=r"num_tokens must be >= Tq=1"):
    lte_decode_attention(q, k, v, jnp.zeros((1, 1), jnp.int32), 0, **kw)
  # Traced, a fill above the retained slots counts as all of them; the kernel read past
  # the cache before (NaN).
  run = jax.jit(lambda f: lte_decode_attention(q, k, v, f, 9, ring_size=8,
                                               implementation="pallas",
                                               plan_options={"block_k": 16}))
  over, full = run(jnp.full((1, 1), 9, jnp.int32)), run(jnp.full((1, 1), 4, jnp.int32))
  np.testing.assert_array_equal(np.asarray(over), np.asarray(full))


# ---- empty shapes and absurd windows ----

EMPTY_CALLS = {
    "attention-batch": lambda: attention(_zeros(0, 8, 2, 16), _zeros(0, 8, 1, 16),
                                         _zeros(0, 8, 1, 16), implementation="pallas"),
    "attention-time": lambda: attention(_zeros(1, 0, 2, 16), _zeros(1, 0, 1, 16),
                                        _zeros(1, 0, 1, 16), implementation="xla"),
    "lte-batch": lambda: lte_attention(_zeros(0, 8, 2, 16), _zeros(0, 8, 1, 16),
                                       _zeros(0, 8, 1, 16), _zeros(0, 8, 1), sink_size=1,
                                       window_size=2, implementation="pallas"),
    "lte-time": lambda: lte_attention(_zeros(1, 0, 2, 16), _zeros(1, 0, 1, 16),
                                      _zeros(1, 0, 1, 16), _zeros(1, 0, 1), sink_size=1,
                                      window_size=2, implementation="reference"),
    "nsa-batch": lambda: nsa_attention(_zeros(0, 8, 2, 16), _zeros(0, 8, 1, 16),
                                       _zeros(0, 8, 1, 16), _zeros(0, 8, 2, 3), block_size=4,
                                       block_count=3, window_size=3),
    "nsa-time": lambda: nsa_attention(_zeros(1, 0, 2, 16), _zeros(1, 0, 1, 16),
                                      _zeros(1, 0, 1, 16), _zeros(1, 0, 2, 3), block_size=4,
                                      block_count=3, window_size=3),
    "decode-batch": lambda: lte_decode_attention(_zeros(0, 1, 2, 16), _zeros(0, 8, 1, 16),
                                                 _zeros(0, 8, 1, 16),
                                                 _zeros(0, 1, dtype=jnp.int32), 1, ring_size=4,
                                                 implementation="pallas"),
    "masked-keys": lambda: masked_attention(_zeros(1, 1, 2, 16), _zeros(1, 0, 1, 16),
                                            _zeros(1, 0, 1, 16), _zeros(1, 1, 1, 0,
                                                                        dtype=jnp.bool_)),
}


@pytest.mark.parametrize("name", sorted(EMPTY_CALLS))
def test_empty_batch_or_sequence_raises(name):
  """Before: ZeroDivisionError, IndexError or a slice TypeError from inside the op."""
  with pytest.raises(ValueError, match=r"(q|k) must have every dimension >= 1"):
    EMPTY_CALLS[name]()


def test_empty_batch_into_the_gated_delta_rule_raises():
  with pytest.raises(ValueError, match=r"batch, time, heads and head dims must be >= 1"):
    chunk_gated_delta_rule(_zeros(0, 8, 2, 16), _zeros(0, 8, 2, 16), _zeros(0, 8, 2, 16),
                           _zeros(0, 8, 2), _zeros(0, 8, 2), implementation="xla")


WINDOW_CALLS = {
    "attention": lambda w: attention(_zeros(1, 8, 2, 16), _zeros(1, 8, 1, 16),
                                     _zeros(1, 8, 1, 16), window_size=w, implementation="xla"),
    "lte": lambda w: lte_attention(_zeros(1, 8, 2, 16), _zeros(1, 8, 1, 16),
                                   _zeros(1, 8, 1, 16), _zeros(1, 8, 1), sink_size=1,
                                   window_size=w, implementation="xla"),
    "nsa": lambda w: nsa_attention(_zeros(1, 8, 2, 16), _zeros(1, 8, 1, 16),
                                   _zeros(1, 8, 1, 16), _zeros(1, 8, 2, 3), block_size=4,
                                   block_count=3, window_size=w),
}


@pytest.mark.parametrize("name", sorted(WINDOW_CALLS))
@pytest.mark.parametrize("window", [2 ** 31, 2 ** 40])
def test_window_beyond_int32_raises(name, window):
  """Before: OverflowError from inside a jitted comparison."""
  with pytest.raises(ValueError, match=r"window_size must be an integer <= 2\*\*31 - 1"):
    WINDOW_CALLS[name](window)


SIZE_CALLS = {
    "sink_size": lambda n: lte_attention(_zeros(1, 8, 2, 16), _zeros(1, 8, 1, 16),
                                         _zeros(1, 8, 1, 16), _zeros(1, 8, 1), sink_size=n,
                                         window_size=2, implementation="xla"),
    "budget": lambda n: lte_attention(_zeros(1, 8, 2, 16), _zeros(1, 8, 1, 16),
                                      _zeros(1, 8, 1, 16), _zeros(1, 8, 1), sink_size=1,
                                      window_size=2, budget=n, implementation="xla"),
    "block_size": lambda n: nsa_attention(_zeros(1, 8, 2, 16), _zeros(1, 8, 1, 16),
                                          _zeros(1, 8, 1, 16), _zeros(1, 8, 2, 3),
                                          block_size=n, block_count=3, window_size=3),
    "block_count": lambda n: nsa_attention(_zeros(1, 8, 2, 16), _zeros(1, 8, 1, 16),
                                           _zeros(1, 8, 1, 16), _zeros(1, 8, 2, 3),
                                           block_size=4, block_count=n, window_size=3),
}


@pytest.mark.parametrize("name", sorted(SIZE_CALLS))
def test_sizes_beyond_int32_raise(name):
  """Before: OverflowError from inside the op."""
  with pytest.raises(ValueError, match=rf"{name} must be an integer <= 2\*\*31 - 1"):
    SIZE_CALLS[name](2 ** 40)


@pytest.mark.parametrize("make", [
    lambda w: AttentionConfig(window_size=w),
    lambda w: LTEConfig(window_size=w),
    lambda w: NSAConfig(window_size=w),
], ids=["attention", "lte", "nsa"])
def test_config_window_beyond_int32_raises(make):
  with pytest.raises(ValueError, match=r"window_size must be a positive integer <= 2\*\*31 - 1"):
    make(2 ** 31)


# ---- values of scores and gates ----

@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_lte_scores_raise(bad):
  scores = np.ones((1, 8, 1), np.float32)
  scores[0, 5, 0] = bad
  with pytest.raises(ValueError, match=r"scores must be finite \(no NaN or inf\), got "
                                       rf"{bad} at index \(0, 5, 0\)"):
    lte_attention(_zeros(1, 8, 2, 16), _zeros(1, 8, 1, 16), _zeros(1, 8, 1, 16),
                  jnp.asarray(scores), sink_size=1, window_size=2, implementation="xla")


@pytest.mark.parametrize("name,value", [("g", 0.5), ("g", np.nan), ("beta", 1.5),
                                        ("beta", -0.25), ("beta", np.nan)])
def test_gated_delta_rule_gate_values_raise(name, value):
  gates = {"g": np.full((1, 8, 2), -0.25, np.float32), "beta": np.full((1, 8, 2), 0.5, np.float32)}
  gates[name][0, 3, 1] = value
  allowed = {"g": r"<= 0 \(a log decay; no NaN\)", "beta": r"in \[0, 1\] \(no NaN\)"}[name]
  with pytest.raises(ValueError, match=rf"{name} must be {allowed}, got {value} at index "
                                       r"\(0, 3, 1\)"):
    chunk_gated_delta_rule(_zeros(1, 8, 2, 16), _zeros(1, 8, 2, 16), _zeros(1, 8, 2, 16),
                           jnp.asarray(gates["g"]), jnp.asarray(gates["beta"]),
                           implementation="xla")
