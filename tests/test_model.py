"""HybridLM: parameter counts of the paper presets, decode parity, validation."""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lte_jax import configs
from lte_jax.models import HybridLM, count_params
from tests.quick_compile import quick_compile  # noqa: F401  (autouse fixture)


def reference_param_count(arch: str, size: str) -> int:
  """Count from the reference (flash-linear-attention) module shapes, written independently."""
  d, v, inter = {"0.4B": (1024, 32000, 2816), "1.4B": (2048, 32000, 5632)}[size]
  tied = size == "0.4B"
  gdn_h, gdn_dk = {"0.4B": (8, 128), "1.4B": (8, 256)}[size]
  hq, hkv = {"0.4B": (16, 16), "1.4B": (32, 8)}[size]
  dh, conv = 64, 4
  gdn_dv = gdn_dk  # expand_v = 1
  gdn = (2 * d * gdn_h * gdn_dk + d * gdn_h * gdn_dv  # q, k, v projections
         + 2 * d * gdn_h + 2 * gdn_h                  # a_proj, b_proj, A_log, dt_bias
         + conv * gdn_h * (2 * gdn_dk + gdn_dv)       # short convs (no bias)
         + d * gdn_h * gdn_dv + gdn_dv                # g_proj, gated RMSNorm weight
         + gdn_h * gdn_dv * d)                        # o_proj
  attn = d * hq * dh + 2 * d * hkv * dh + hq * dh * d
  channels = [2 * dh, dh, dh // 2, dh // 4]
  scorer_per_head = sum(cin * cout * 3 + cout for cin, cout in zip(channels, channels[1:]))
  scorer_per_head += channels[-1] + 1
  lte = attn + hkv * scorer_per_head
  # NSA (reference configs gated_delta_net_nsa_*.json, both sizes): 32 q / 2 kv heads of 64,
  # no biases; g_proj d -> 3 x 32 gates. 4,554,752 per layer at 0.4B, 9,109,504 at 1.4B.
  nsa_hq, nsa_hkv = 32, 2
  nsa = d * nsa_hq * dh + 2 * d * nsa_hkv * dh + d * 3 * nsa_hq + nsa_hq * dh * d
  mixer = {"gdn": gdn, "attn": attn, "swa": attn, "lte": lte, "nsa": nsa}
  layers = configs.get_config(arch, size).layers
  per_layer = 3 * d * inter + 2 * d
  total = sum(mixer[m] + per_layer for m in layers)
  total += v * d + d + (0 if tied else v * d)
  return total


# NSA (every layer NSA) runs the mixer laNSA runs; its decode parity would add minutes of
# interpreted NSA decoding, and tests/test_recipe.py counts its presets' parameters.
ARCHS = tuple(a for a in configs.ARCHITECTURES if a != "NSA")
PRESETS = [(a, s) for a in ARCHS for s in ("0.4B", "1.4B")]


@pytest.mark.parametrize("arch,size", PRESETS)
def test_param_count_matches_reference(arch, size):
  ours = count_params(configs.get_config(arch, size))
  ref = reference_param_count(arch, size)
  print(f"{arch} {size}: lte_jax {ours:,} reference {ref:,}")
  assert abs(ours - ref) / ref < 0.01


def test_gdn_04b_matches_fla_anchor():
  # flash-linear-attention 0.6.0 GatedDeltaNet at this shape reports 366,956,928 parameters.
  assert count_params(configs.get_config("GDN", "0.4B")) == 366_956_928


def _tiny(arch, **overrides):
  base = dict(vocab_size=97, d_model=32, num_layers=4, intermediate_size=64,
              gdn=configs.GDNConfig(num_heads=2, head_dim=16, chunk_size=8),
              attn=configs.AttentionConfig(num_heads=4, num_kv_heads=2, head_dim=8),
              swa=configs.AttentionConfig(num_heads=4, num_kv_heads=2, head_dim=8, window_size=6),
              lte=configs.LTEConfig(num_heads=4, num_kv_heads=2, head_dim=8, sink_size=2,
                                    window_size=13, budget=5, dropout=0.0),
              # 12 blocks in 48 tokens, so decoding crosses block edges and picks a free block.
              nsa=configs.NSAConfig(num_heads=4, num_kv_heads=2, head_dim=8, block_size=4,
                                    block_count=4, window_size=6))
  base.update(overrides)
  return configs.get_config(arch, "tiny", **base)


# Compiled entry points: the model op by op compiles every primitive on its own, far slower.
_forward = nnx.jit(lambda m, t, seg=None: m(t, segment_ids=seg))
_prefill = nnx.jit(lambda m, t, c: m.prefill(t, c))
_decode = nnx.jit(lambda m, t, c: m.decode(t, c))


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("prompt_len", [3, 17])
def test_prefill_then_decode_matches_full_forward(arch, prompt_len):
  cfg = _tiny(arch)
  model = HybridLM(cfg, rngs=nnx.Rngs(0))
  model.eval()
  model.set_attributes(enforce_budget=True, raise_if_not_found=False)
  total = 48
  tokens = jax.random.randint(jax.random.key(1), (2, total), 0, cfg.vocab_size)
  full, _ = _forward(model, tokens)
  cache = model.init_cache(2, total, jnp.float32)
  logits, cache = _prefill(model, tokens[:, :prompt_len], cache)
  steps = [logits]
  for t in range(prompt_len, total):
    logits, cache = _decode(model, tokens[:, t:t + 1], cache)
    steps.append(logits)
  got = jnp.concatenate(steps, axis=1)
  np.testing.assert_allclose(got, full, rtol=2e-4, atol=2e-4)


def test_forward_shapes_and_aux():
  cfg = _tiny("laLTE")
  model = HybridLM(cfg, rngs=nnx.Rngs(0))
  tokens = jnp.zeros((2, 10), jnp.int32)
  logits, aux = _forward(model, tokens)
  assert logits.shape == (2, 10, cfg.vocab_size) and logits.dtype == jnp.float32
  assert model.lte_layers == (1, 3)
  assert len(aux["lte_retention"]) == 2
  assert aux["lte_retention"][0].shape == (2, 10, cfg.lte.num_kv_heads)


@functools.lru_cache(maxsize=None)
def _remat_loss_and_grads(remat):
  """Loss and gradients of a 2-layer laLTE (one GDN, one LTE block) under `remat`; the
  policies' common baseline 'none' is computed once."""
  from lte_jax.training import train_state
  tokens = jax.random.randint(jax.random.key(5), (2, 12), 0, 97)
  model_def = train_state.make_model_def(_tiny("laLTE", remat=remat, num_layers=2), train=False)
  params = nnx.to_pure_dict(nnx.state(HybridLM(model_def.config, rngs=nnx.Rngs(0)), nnx.Param))

  def loss(params):
    logits, aux = model_def.bind(params, jax.random.key(1))(tokens)
    return jnp.mean(jax.nn.log_softmax(logits)[..., 0]) + jnp.mean(aux["lte_retention"][0])

  return jax.jit(jax.value_and_grad(loss))(params)


@pytest.mark.parametrize("policy", ["full", "dots", "dots_mixers"])
def test_remat_keeps_loss_and_gradients(policy):
  """Rematerialisation changes what is stored, never what is computed (the train path)."""
  want_loss, want_grads = _remat_loss_and_grads("none")
  got_loss, got_grads = _remat_loss_and_grads(policy)
  np.testing.assert_allclose(got_loss, want_loss, rtol=1e-6)
  for got, want in zip(jax.tree.leaves(got_grads), jax.tree.leaves(want_grads)):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("arch,remat", [("laLTE", "dots"), ("GDN_SWA", "none"),
                                        ("GDN_Attn", "dots_mixers")])
def test_scan_layers_keeps_loss_gradients_and_dropout(arch, remat):
  """The scanned forward is the unrolled one: loss, every gradient, retention order, and the
  dropout masks (LTE scorer dropout on, train mode)."""
  from lte_jax.training import train_state
  tokens = jax.random.randint(jax.random.key(5), (2, 12), 0, 97)
  lte = configs.LTEConfig(num_heads=4, num_kv_heads=2, head_dim=8, sink_size=2, window_size=13,
                          budget=5, dropout=0.3)

  def loss_and_grads(scan):
    model_def = train_state.make_model_def(_tiny(arch, remat=remat, scan_layers=scan, lte=lte))
    params = nnx.to_pure_dict(nnx.state(HybridLM(model_def.config, rngs=nnx.Rngs(0)), nnx.Param))

    def loss(params):
      logits, aux = model_def.bind(params, jax.random.key(1))(tokens)
      ret = sum(jnp.mean(r * (i + 1)) for i, r in enumerate(aux["lte_retention"]))
      return jnp.mean(jax.nn.log_softmax(logits)[..., 0]) + ret

    return jax.jit(jax.value_and_grad(loss))(params)

  want_loss, want_grads = loss_and_grads(False)
  got_loss, got_grads = loss_and_grads(True)
  np.testing.assert_allclose(got_loss, want_loss, rtol=1e-6)
  assert jax.tree.structure(got_grads) == jax.tree.structure(want_grads)
  for got, want in zip(jax.tree.leaves(got_grads), jax.tree.leaves(want_grads)):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)


def test_layer_period():
  from lte_jax.models.hybrid_lm import layer_period
  assert layer_period(("gdn",) * 24) == 1
  assert layer_period(("gdn", "lte") * 12) == 2
  assert layer_period(("gdn", "gdn", "attn") * 2) == 3
  assert layer_period(("gdn", "attn", "gdn")) == 3
  with pytest.raises(ValueError, match="ModelConfig.scan_layers"):
    _tiny("GDN", scan_layers="yes")


def test_remat_accepts_booleans_and_rejects_unknown_policies():
  assert _tiny("GDN", remat=True).remat == "full"
  assert _tiny("GDN", remat=False).remat == "none"
  with pytest.raises(ValueError, match="ModelConfig.remat"):
    _tiny("GDN", remat="some")


def test_segment_ids_isolate_documents():
  cfg = _tiny("GDN_Attn")
  model = HybridLM(cfg, rngs=nnx.Rngs(0))
  a = jax.random.randint(jax.random.key(2), (1, 11), 0, cfg.vocab_size)
  b = jax.random.randint(jax.random.key(3), (1, 9), 0, cfg.vocab_size)
  packed = jnp.concatenate([a, b], axis=1)
  seg = jnp.concatenate([jnp.ones((1, 11), jnp.int32), 2 * jnp.ones((1, 9), jnp.int32)], axis=1)
  got, _ = _forward(model, packed, seg)
  want = jnp.concatenate([_forward(model, a)[0], _forward(model, b)[0]], axis=1)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_tied_and_untied_heads():
  assert HybridLM(_tiny("GDN"), rngs=nnx.Rngs(0)).lm_head is None
  untied = HybridLM(_tiny("GDN", tie_embeddings=False), rngs=nnx.Rngs(0))
  assert untied.lm_head is not None


def test_init_std_and_output_scaling():
  cfg = configs.get_config("GDN_Attn", "tiny", d_model=256, intermediate_size=1024)
  model = HybridLM(cfg, rngs=nnx.Rngs(0))
  block = model.blocks[1]
  q = np.asarray(block.mixer.q_proj.kernel[...])
  o = np.asarray(block.mixer.o_proj.kernel[...])
  down = np.asarray(block.mlp.down_proj.kernel[...])
  assert abs(q.std() - 0.006) < 0.0005
  scaled = 0.006 / np.sqrt(2 * cfg.num_layers)
  assert abs(o.std() - scaled) < 0.1 * scaled
  assert abs(down.std() - scaled) < 0.1 * scaled


def test_bad_inputs_raise_value_error():
  model = HybridLM(_tiny("GDN"), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="tokens"):
    model(jnp.zeros((4,), jnp.int32))
  with pytest.raises(ValueError, match="tokens"):
    model(jnp.zeros((1, 4), jnp.float32))
  with pytest.raises(ValueError, match="segment_ids"):
    model(jnp.zeros((1, 4), jnp.int32), segment_ids=jnp.zeros((1, 5), jnp.int32))
  with pytest.raises(ValueError, match="cache"):
    model.decode(jnp.zeros((1, 1), jnp.int32), cache=())
  with pytest.raises(ValueError, match="config"):
    HybridLM(dataclasses.asdict(_tiny("GDN")), rngs=nnx.Rngs(0))
