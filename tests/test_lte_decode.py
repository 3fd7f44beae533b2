"""LTE decode attention: the split-K Pallas kernel vs the fp32 reference, the layer wiring,
and lowering.

The kernel runs interpreted on CPU in both of its forms: the GPU form (the cache
read in place as [B, S, Hkv, D] with masked strided loads; generic interpreter)
and the TPU form (cache transposed and padded to [B, Hkv, S, D] blocks; the TPU
interpreter). Cases cover an empty / partly filled / full retained segment,
positions before and after the ring wraps, GQA, one and three query tokens, fp32
and bf16 caches, and several splits per (batch, KV head). Lowering for 'cuda'
(Triton) and 'tpu' (Mosaic) runs at the benchmark's shape and the laLTE 0.4B /
1.4B preset shapes on abstract inputs.
"""
from __future__ import annotations

import dataclasses
import functools
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lte_jax import configs
from lte_jax.kernels.lte_decode import Plan, lte_decode_attention_pallas
from lte_jax.models import HybridLM
from lte_jax.ops.lte_decode import lte_decode_attention, lte_decode_mask
from tests import helpers
from tests.quick_compile import quick_compile  # noqa: F401  (autouse fixture)

RING, BUDGET = 13, 7


def _inputs(seed, *, batch=2, tq=1, hq=4, hkv=2, d=16, dtype=jnp.float32):
  rng = np.random.default_rng(seed)
  normal = lambda *s: jnp.asarray(rng.standard_normal(s), jnp.float32).astype(dtype)
  slots = RING + BUDGET
  return normal(batch, tq, hq, d), normal(batch, slots, hkv, d), normal(batch, slots, hkv, d)


FILLS = {"empty": [[0, 0], [0, 0]], "partial": [[0, 3], [5, 1]], "full": [[7, 7], [7, 7]]}


@functools.lru_cache(maxsize=None)
def _pallas_fn(platform, **options):
  return jax.jit(functools.partial(lte_decode_attention_pallas, ring_size=RING, scale=0.3,
                                   platform=platform, interpret=True, **options))


_reference = jax.jit(functools.partial(lte_decode_attention, ring_size=RING, scale=0.3,
                                       implementation="reference"))


@pytest.mark.parametrize("platform", ["gpu", "tpu"])
@pytest.mark.parametrize("fill,num_tokens,tq,hq,dtype", [
    ("empty", 1, 1, 4, jnp.float32),        # the first token: one visible slot
    ("empty", 9, 3, 4, jnp.float32),        # ring not yet wrapped; three queries
    ("partial", 13, 1, 2, jnp.float32),     # ring just full; no GQA
    ("partial", 30, 3, 4, jnp.bfloat16),    # wrapped ring; three queries straddle the wrap
    ("full", 40, 1, 4, jnp.bfloat16),
    ("full", 27, 3, 2, jnp.float32),
])
def test_kernel_matches_reference(platform, fill, num_tokens, tq, hq, dtype):
  q, k, v = _inputs(num_tokens, tq=tq, hq=hq, dtype=dtype)
  fill = jnp.asarray(FILLS[fill], jnp.int32)
  n = jnp.asarray(num_tokens, jnp.int32)
  want = _reference(q, k, v, fill, n)
  # block_k 16 over 20 slots: two tiles, one per split with the default plan.
  for options in ({"block_k": 16}, {"block_k": 16, "split": 32}):
    got = _pallas_fn(platform, **options)(q, k, v, fill, n)
    assert got.dtype == v.dtype and got.shape == (2, tq, hq, 16)
    err = helpers.rel_rms(got, want)
    assert err < (5e-3 if dtype == jnp.bfloat16 else 1e-5), (options, err)


def test_split_plan_spreads_work():
  plan = Plan("gpu")
  # Benchmark shape: 1281 slots, 32 x 16 strips -> 2 splits of 6 tiles: 1024 programs.
  assert plan.slots_per_program(1281, 512) == 768
  assert plan.slots_per_program(1281, 1) == 128       # batch 1, one head: one tile each
  assert plan.slots_per_program(100, 4096) == 128     # never less than a tile
  assert Plan("gpu", split=256).slots_per_program(1281, 512) == 256


def test_mask_matches_the_layer_rule():
  # One query: every ring slot written so far, and the first fill[b, h] retained slots.
  fill = jnp.asarray([[0, 4]], jnp.int32)
  for n in (1, 5, 13, 14, 40):
    mask = np.asarray(lte_decode_mask(jnp.asarray(n), fill, ring_size=RING,
                                      num_slots=RING + BUDGET, num_queries=1))
    ring = np.arange(RING) < n
    for h, f in enumerate([0, 4]):
      np.testing.assert_array_equal(mask[0, h, 0], np.concatenate([ring, np.arange(BUDGET) < f]))


def test_public_entry_implementations_agree():
  q, k, v = _inputs(3, tq=3)
  fill = jnp.asarray(FILLS["partial"], jnp.int32)
  out = {impl: lte_decode_attention(q, k, v, fill, 25, ring_size=RING, implementation=impl)
         for impl in ("reference", "xla", "pallas")}
  assert helpers.rel_rms(out["xla"], out["reference"]) < 1e-5
  assert helpers.rel_rms(out["pallas"], out["reference"]) < 1e-5
  tuned = lte_decode_attention(q, k, v, fill, 25, ring_size=RING, implementation="pallas",
                               plan_options=dict(block_k=16, platform="tpu"))
  assert helpers.rel_rms(tuned, out["reference"]) < 1e-5


@pytest.mark.parametrize("kwargs,needle", [
    (dict(implementation="flash"), "implementation"),
    (dict(implementation="xla", plan_options={"block_k": 16}), "plan_options"),
    (dict(implementation="pallas", plan_options={"block_k": 24}), "block_k"),
    (dict(ring_size=0), "ring_size"),
    (dict(ring_size=RING + BUDGET + 1), "ring_size"),
    (dict(fill=jnp.zeros((2, 3), jnp.int32)), "fill"),
    (dict(fill=jnp.zeros((2, 2), jnp.float32)), "fill"),
    (dict(num_tokens=jnp.zeros((2,), jnp.int32)), "num_tokens"),
    (dict(num_tokens=3.0), "num_tokens"),
    (dict(q=jnp.zeros((2, 1, 3, 16))), "heads"),
])
def test_bad_arguments_raise_value_errors(kwargs, needle):
  q, k, v = _inputs(0)
  args = dict(q=q, k=k, v=v, fill=jnp.zeros((2, 2), jnp.int32), num_tokens=5, ring_size=RING)
  args.update(kwargs)
  with pytest.raises(ValueError, match=needle):
    lte_decode_attention(**args)


_SHARDED = textwrap.dedent("""
    import jax, jax.numpy as jnp, numpy as np
    from lte_jax.ops.lte_decode import lte_decode_attention
    from lte_jax.training import make_mesh
    from tests import helpers
    from tests.test_lte_decode import FILLS, RING, _inputs
    q, k, v = _inputs(5, tq=3)
    fill = jnp.asarray(FILLS["partial"], jnp.int32)
    run = lambda impl: jax.jit(lambda q, k, v, f: lte_decode_attention(
        q, k, v, f, 30, ring_size=RING, implementation=impl))
    want = run("reference")(q, k, v, fill)
    with jax.set_mesh(make_mesh(data=2, fsdp=1, tensor=2)):
      f = run("pallas")
      text = f.lower(q, k, v, fill).as_text()
      got = f(q, k, v, fill)
    assert "shard_map" in text or "manual" in text, "kernel not under shard_map"
    assert helpers.rel_rms(got, want) < 1e-5, helpers.rel_rms(got, want)
    print("OK")
""")


def test_runs_per_shard_under_a_mesh():
  helpers.run_on_simulated_devices(_SHARDED)


# --- the layer ---------------------------------------------------------------------------

def test_pallas_decode_gives_the_same_logits():
  """laLTE tiny: prefill (xla), then decode with implementation 'pallas' and 'xla' from the
  same caches, past the ring's wrap and through retained-slot evictions; both equal the
  budgeted full forward."""
  models = {}
  for impl in ("xla", "pallas"):
    lte = dataclasses.replace(configs.get_config("laLTE", "tiny").lte, implementation=impl)
    cfg = configs.get_config("laLTE", "tiny", lte=lte)
    model = HybridLM(cfg, rngs=nnx.Rngs(0))
    model.eval()
    model.set_attributes(enforce_budget=True, raise_if_not_found=False)
    models[impl] = model
  w1, budget = cfg.lte.window_size + 1, cfg.lte.budget
  prompt, steps = w1 + 20, 40            # prefill retains some; decoding evicts more
  tokens = jnp.asarray(np.random.default_rng(0).integers(1, cfg.vocab_size, (2, prompt + steps)),
                       jnp.int32)
  full = nnx.jit(lambda m, x: m(x)[0])(models["xla"], tokens)
  prefill = nnx.jit(lambda m, x, c: m.prefill(x, c))
  decode = nnx.jit(lambda m, x, c: m.decode(x, c))
  _, cache = prefill(models["xla"], tokens[:, :prompt], models["xla"].init_cache(2, prompt + steps))
  caches = {impl: cache for impl in models}
  fills = []
  for t in range(prompt, prompt + steps):
    logits = {}
    for impl, model in models.items():
      logits[impl], caches[impl] = decode(model, tokens[:, t:t + 1], caches[impl])
    np.testing.assert_allclose(logits["pallas"], logits["xla"], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(logits["pallas"][:, 0], full[:, t], rtol=1e-4, atol=1e-4)
    fills.append(np.asarray(caches["pallas"][1]["fill"]))
  assert 0 < np.min(fills[0]) and np.max(fills[-1]) <= budget
  assert not np.array_equal(fills[0], fills[-1])   # decoding changed the retained segment


# --- lowering ---------------------------------------------------------------------------

_sds = helpers.sds


@pytest.mark.parametrize("platform,lowering", [("gpu", "cuda"), ("tpu", "tpu")])
@pytest.mark.parametrize("shape", ["bench", "0.4B", "1.4B", "bench_tq3_fp32"])
def test_lowers_at_benchmark_and_preset_shapes(platform, lowering, shape):
  if shape in ("bench", "bench_tq3_fp32"):
    batch, hq, hkv, d, ring, budget = 32, 16, 16, 64, 769, 512
  else:
    lte = configs.get_config("laLTE", shape).lte
    batch, hq, hkv, d = 32, lte.num_heads, lte.num_kv_heads, lte.head_dim
    ring, budget = lte.window_size + 1, lte.budget
  tq, dtype = (3, jnp.float32) if shape == "bench_tq3_fp32" else (1, jnp.bfloat16)

  def op(q, k, v, fill, num_tokens):
    return lte_decode_attention(q, k, v, fill, num_tokens, ring_size=ring,
                                implementation="pallas",
                                plan_options=dict(platform=platform, interpret=False))

  args = (_sds(batch, tq, hq, d, dtype=dtype), _sds(batch, ring + budget, hkv, d, dtype=dtype),
          _sds(batch, ring + budget, hkv, d, dtype=dtype), _sds(batch, hkv, dtype=jnp.int32),
          _sds(dtype=jnp.int32))
  text = jax.jit(op).trace(*args).lower(lowering_platforms=(lowering,)).as_text()
  target = {"cuda": "__gpu$xla.gpu.triton", "tpu": "tpu_custom_call"}[lowering]
  assert text.count(f"@{target}(") == 1
