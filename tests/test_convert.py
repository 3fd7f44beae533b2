"""lte_jax.convert: synthetic Hugging Face checkpoints (FLA gated_deltanet, its attention
hybrid, the reference's LTE / NSA hybrids) made here with numpy, converted, checked."""
from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx

from lte_jax import convert
from lte_jax.convert import safetensors as st
from lte_jax.layers.short_conv import ShortConv
from tests.quick_compile import quick_compile  # noqa: F401  (autouse fixture)

D, VOCAB = 64, 97


def gdn_config(**overrides):
  cfg = dict(model_type="gated_deltanet", hidden_size=D, num_hidden_layers=2, num_heads=2,
             head_dim=16, expand_v=2, conv_size=4, use_gate=True, use_short_conv=True,
             allow_neg_eigval=False, hidden_ratio=4, intermediate_size=None, hidden_act="swish",
             norm_eps=1e-5, vocab_size=VOCAB, tie_word_embeddings=False,
             max_position_embeddings=256, attn=None)
  cfg.update(overrides)
  return cfg


def lte_spec(**overrides):
  spec = dict(attn_type="lte", layers=[1], num_heads=4, num_kv_heads=2, qkv_bias=False,
              window_size=16, rope_theta=10000.0, conv_size=[3, 3, 3], conv_dilation=[2, 2, 2],
              dropout_prob=0.1, buffer_size=8, sink_size=2, routing_method="sigmoid",
              routing_grad=True, routing_shared="head", l1_lambda_init=1e-9,
              l1_lambda_shared="head", l1_lambda_update_steps=32)
  spec.update(overrides)
  return spec


def hf_tensors(cfg, rng):
  """What save_pretrained writes, shapes read off FLA's and the reference's modules."""
  r = lambda *shape: (0.2 * rng.standard_normal(shape)).astype(np.float32)
  d, h, dk = cfg["hidden_size"], cfg["num_heads"], cfg["head_dim"]
  dv, k = int(dk * cfg["expand_v"]), cfg["conv_size"]
  inter = 256 * -(-int(d * cfg["hidden_ratio"] * 2 / 3) // 256)
  specs = cfg["attn"] or []
  specs = [specs] if isinstance(specs, dict) else specs
  kind = {i: s for s in specs for i in s["layers"]}
  t = {"model.embeddings.weight": r(VOCAB, d), "model.norm.weight": r(d)}
  if not cfg["tie_word_embeddings"]:
    t["lm_head.weight"] = r(VOCAB, d)
  for i in range(cfg["num_hidden_layers"]):
    p = f"model.layers.{i}."
    t.update({p + "attn_norm.weight": r(d), p + "mlp_norm.weight": r(d),
              p + "mlp.gate_proj.weight": r(inter, d), p + "mlp.up_proj.weight": r(inter, d),
              p + "mlp.down_proj.weight": r(d, inter)})
    a = p + "attn."
    spec = kind.get(i)
    if spec is None:
      t.update({a + "q_proj.weight": r(h * dk, d), a + "k_proj.weight": r(h * dk, d),
                a + "v_proj.weight": r(h * dv, d), a + "a_proj.weight": r(h, d),
                a + "b_proj.weight": r(h, d), a + "g_proj.weight": r(h * dv, d),
                a + "o_proj.weight": r(d, h * dv), a + "q_conv1d.weight": r(h * dk, 1, k),
                a + "k_conv1d.weight": r(h * dk, 1, k), a + "v_conv1d.weight": r(h * dv, 1, k),
                a + "A_log": r(h), a + "dt_bias": r(h), a + "o_norm.weight": r(dv)})
      continue
    hq, hkv = spec["num_heads"], spec["num_kv_heads"]
    hd = spec.get("head_dim", d // hq) if spec.get("attn_type") == "nsa" else d // hq
    t.update({a + "q_proj.weight": r(hq * hd, d), a + "k_proj.weight": r(hkv * hd, d),
              a + "v_proj.weight": r(hkv * hd, d), a + "o_proj.weight": r(d, hq * hd)})
    if spec.get("attn_type") == "nsa":
      t[a + "g_proj.weight"] = r(hq * 3, d)
    if spec.get("attn_type") == "lte":
      g = hkv if spec["routing_shared"] == "head" else 1
      c = 2 * hd * g
      for j, ks in enumerate(spec["conv_size"]):
        t[f"{a}router.conv_stack.convs.{j}.weight"] = r(c // 2, c // g, 1, ks)
        t[f"{a}router.conv_stack.convs.{j}.bias"] = r(c // 2)
        c //= 2
      t[a + "router.conv_stack.proj.weight"] = r(g, c // g, 1, 1)
      t[a + "router.conv_stack.proj.bias"] = r(g)
  if any(s.get("attn_type") == "lte" for s in specs):
    n = sum(len(s["layers"]) for s in specs)
    t["model.l1_lambda"] = np.full((n, specs[0]["num_kv_heads"]), 3e-4, np.float32)
    t["model.num_kept"] = r(n, specs[0]["num_kv_heads"])
  return t


def save(tmp_path, cfg, tensors, shards=1):
  path = tmp_path / "hf"
  path.mkdir(exist_ok=True)
  (path / "config.json").write_text(json.dumps(cfg))
  if shards == 1:
    st.write_safetensors(str(path / "model.safetensors"), tensors)
    return str(path)
  names = sorted(tensors)
  weight_map = {}
  for s in range(shards):
    file = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
    part = {n: tensors[n] for n in names[s::shards]}
    st.write_safetensors(str(path / file), part)
    weight_map.update({n: file for n in part})
  (path / st.INDEX_FILE).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
  return str(path)


@pytest.fixture
def rng():
  return np.random.default_rng(0)


def run_logits(model, t=12):
  tokens = jnp.asarray(np.arange(2 * t).reshape(2, t) % VOCAB, jnp.int32)
  logits = nnx.jit(lambda m, x: m(x)[0])(model, tokens)  # compiled: faster than eager here
  assert logits.shape == (2, t, VOCAB) and logits.dtype == jnp.float32
  assert bool(jnp.all(jnp.isfinite(logits)))
  return logits


def ref_scores(f, prefix, k_raw, v):
  """The reference LTE router in numpy: concat(k, v) per KV head, flattened head-major,
  grouped Conv2d (1, k) 'same' with dilation 2 + SiLU x 3, grouped 1x1 proj, sigmoid - 0.5.
  k_raw, v [T, G, hd] -> r [T, G]."""
  t, g, _ = k_raw.shape
  x = np.concatenate([k_raw, v], -1).reshape(t, -1)
  stack = prefix + "router.conv_stack."
  for j in range(3):
    w, b = f[f"{stack}convs.{j}.weight"], f[f"{stack}convs.{j}.bias"]
    cout, cin = w.shape[0] // g, w.shape[1]
    xp = np.pad(x, ((2, 2), (0, 0)))
    y = np.zeros((t, g * cout))
    for grp in range(g):
      for tap in range(3):
        xs = xp[2 * tap: 2 * tap + t, grp * cin:(grp + 1) * cin]
        y[:, grp * cout:(grp + 1) * cout] += xs @ w[grp * cout:(grp + 1) * cout, :, 0, tap].T
    y += b
    x = y / (1 + np.exp(-y))
  pw, pb = f[stack + "proj.weight"], f[stack + "proj.bias"]
  c = x.shape[1] // g
  logit = np.stack([x[:, h * c:(h + 1) * c] @ pw[h, :, 0, 0] + pb[h] for h in range(g)], -1)
  return 1 / (1 + np.exp(-logit)) - 0.5


def fla_forward(t, cfg, tokens):
  """FLA's GatedDeltaNetForCausalLM forward in float64 numpy, read off its modules.

  GDN: causal depthwise conv then SiLU on q/k/v projections, L2 norm of q/k (eps 1e-6),
  beta = sigmoid(b_proj x), g = -exp(A_log) softplus(a_proj x + dt_bias), the delta rule
  as a plain recurrence with scale Dk^-1/2, RMSNorm(o) * silu(g_proj x), o_proj.
  Attention: RoPE (rotate-half), GQA, causal, window W = W visible tokens.
  """
  f = {n: np.asarray(v, np.float64) for n, v in t.items() if not n.startswith("model.l")
       or n.startswith("model.layers")}
  eps = cfg["norm_eps"]
  rms = lambda x, w: x / np.sqrt(np.mean(x * x, -1, keepdims=True) + eps) * w
  silu = lambda x: x / (1 + np.exp(-x))
  specs = cfg["attn"] or []
  specs = [specs] if isinstance(specs, dict) else specs
  kind = {i: s for s in specs for i in s["layers"]}

  def gdn(x, a):
    tt = x.shape[0]
    h, dk = cfg["num_heads"], cfg["head_dim"]
    def conv(y, w):  # w [C, 1, K]
      kk = w.shape[-1]
      yp = np.concatenate([np.zeros((kk - 1, y.shape[1])), y])
      return silu(sum(yp[j:j + tt] * w[:, 0, j] for j in range(kk)))
    q, k, v = (conv(x @ f[a + p + "_proj.weight"].T, f[a + p + "_conv1d.weight"]) for p in "qkv")
    q, k, v = q.reshape(tt, h, dk), k.reshape(tt, h, dk), v.reshape(tt, h, -1)
    q = q / np.sqrt((q * q).sum(-1, keepdims=True) + 1e-6)
    k = k / np.sqrt((k * k).sum(-1, keepdims=True) + 1e-6)
    beta = 1 / (1 + np.exp(-(x @ f[a + "b_proj.weight"].T)))
    g = -np.exp(f[a + "A_log"]) * np.log1p(np.exp(x @ f[a + "a_proj.weight"].T + f[a + "dt_bias"]))
    o = np.zeros_like(v)
    for head in range(h):
      state = np.zeros((dk, v.shape[-1]))
      for s in range(tt):
        state = np.exp(g[s, head]) * state
        v_new = beta[s, head] * (v[s, head] - state.T @ k[s, head])
        state = state + np.outer(k[s, head], v_new)
        o[s, head] = state.T @ (q[s, head] * dk ** -0.5)
    gate = (x @ f[a + "g_proj.weight"].T).reshape(o.shape)
    return (rms(o, f[a + "o_norm.weight"]) * silu(gate)).reshape(tt, -1) @ f[a + "o_proj.weight"].T

  def attention(x, a, spec):
    tt, hq, hkv = x.shape[0], spec["num_heads"], spec["num_kv_heads"]
    hd = x.shape[1] // hq
    q = (x @ f[a + "q_proj.weight"].T).reshape(tt, hq, hd)
    k = (x @ f[a + "k_proj.weight"].T).reshape(tt, hkv, hd)
    v = (x @ f[a + "v_proj.weight"].T).reshape(tt, hkv, hd)
    ang = np.arange(tt)[:, None] / spec.get("rope_theta", 1e4) ** (np.arange(0, hd, 2) / hd)
    cos, sin = np.cos(ang)[:, None], np.sin(ang)[:, None]
    rot = lambda y: np.concatenate([y[..., :hd // 2] * cos - y[..., hd // 2:] * sin,
                                    y[..., hd // 2:] * cos + y[..., :hd // 2] * sin], -1)
    i, j = np.arange(tt)[:, None], np.arange(tt)[None, :]
    masks = [j <= i] * hkv
    if spec.get("attn_type") == "lte":  # window w = largest distance; sinks; retained r > 0
      r = ref_scores(f, a, k, v)
      masks = [(j <= i) & ((j < spec["sink_size"]) | (i - j <= spec["window_size"]) |
                           (r[:, h] > 0)[None, :]) for h in range(hkv)]
    elif spec.get("window_size"):  # W visible tokens
      masks = [m & (i - j <= spec["window_size"] - 1) for m in masks]
    q, k = rot(q), rot(k)
    o = np.zeros_like(q)
    for head in range(hq):
      logits = q[:, head] @ k[:, head // (hq // hkv)].T / np.sqrt(hd)
      mask = masks[head // (hq // hkv)]
      p = np.exp(np.where(mask, logits, -np.inf) - logits.max(-1, keepdims=True))
      o[:, head] = (p / p.sum(-1, keepdims=True)) @ v[:, head // (hq // hkv)]
    return o.reshape(tt, -1) @ f[a + "o_proj.weight"].T

  out = []
  for row in tokens:
    x = f["model.embeddings.weight"][row]
    for i in range(cfg["num_hidden_layers"]):
      p = f"model.layers.{i}."
      y = rms(x, f[p + "attn_norm.weight"])
      x = x + (gdn(y, p + "attn.") if i not in kind else attention(y, p + "attn.", kind[i]))
      y = rms(x, f[p + "mlp_norm.weight"])
      x = x + (silu(y @ f[p + "mlp.gate_proj.weight"].T) * (y @ f[p + "mlp.up_proj.weight"].T)
               ) @ f[p + "mlp.down_proj.weight"].T
    head = f["model.embeddings.weight" if cfg["tie_word_embeddings"] else "lm_head.weight"]
    out.append(rms(x, f["model.norm.weight"]) @ head.T)
  return np.stack(out)


@pytest.mark.parametrize("model_type, attn", [
    ("gated_deltanet", None),
    ("gated_deltanet", [
        dict(layers=[1], num_heads=4, num_kv_heads=2, window_size=None, rope_theta=500.0),
        dict(layers=[2], num_heads=4, num_kv_heads=4, window_size=5)]),
    ("hybrid_gated_deltanet", lte_spec(layers=[1, 2], buffer_size=16)),
])
def test_logits_match_a_numpy_fla_forward(tmp_path, rng, model_type, attn):
  """The whole model against fla_forward; T = 24 > w + 1 = 17, so LTE eviction matters
  (the budget of 16 is not reached: the reference's eval forward prunes nothing either)."""
  cfg = gdn_config(model_type=model_type, num_hidden_layers=3, attn=attn,
                   tie_word_embeddings=attn is not None)
  tensors = hf_tensors(cfg, rng)
  tensors = {n: (1 + v if n.endswith("norm.weight") else v) for n, v in tensors.items()}
  model, _ = convert.load_hf(save(tmp_path, cfg, tensors))
  tokens = rng.integers(0, VOCAB, size=(2, 24))
  got = np.asarray(nnx.jit(lambda m, x: m(x)[0])(model, jnp.asarray(tokens, jnp.int32)))
  want = fla_forward(tensors, cfg, tokens)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


def test_safetensors_round_trip_keeps_dtypes(tmp_path):
  tensors = {"f32": np.arange(6, dtype=np.float32).reshape(2, 3),
             "bf16": np.array([1.5, -2.25, 3.0], ml_dtypes.bfloat16),
             "f16": np.array([0.5], np.float16), "i64": np.arange(3, dtype=np.int64)}
  st.write_safetensors(str(tmp_path / "model.safetensors"), tensors)
  got = st.read_checkpoint(str(tmp_path))
  for name, value in tensors.items():
    assert got[name].dtype == value.dtype and got[name].shape == value.shape
    np.testing.assert_array_equal(got[name], value)


def test_fla_gated_deltanet_parameters_land_transposed(tmp_path, rng):
  cfg = gdn_config()
  tensors = hf_tensors(cfg, rng)
  converted = convert.convert_hf(save(tmp_path, cfg, tensors))
  mc, p = converted.config, converted.params
  assert mc.layers == ("gdn", "gdn") and mc.d_model == D and mc.intermediate_size == 256
  assert (mc.gdn.num_heads, mc.gdn.head_dim, mc.gdn.head_v_dim, mc.gdn.conv_size) == (2, 16, 32, 4)
  assert mc.gdn.norm_eps == 1e-5 and mc.norm_eps == 1e-5 and not mc.tie_embeddings
  gdn = p["blocks"][1]["mixer"]
  w = tensors["model.layers.1.attn.q_proj.weight"]
  np.testing.assert_array_equal(gdn["q_proj"]["kernel"], w.T)
  np.testing.assert_array_equal(gdn["o_proj"]["kernel"], tensors["model.layers.1.attn.o_proj.weight"].T)
  conv = tensors["model.layers.1.attn.v_conv1d.weight"]  # [C, 1, K]
  np.testing.assert_array_equal(gdn["v_conv"]["weight"][3, 5], conv[5, 0, 3])
  np.testing.assert_array_equal(gdn["A_log"], tensors["model.layers.1.attn.A_log"])
  np.testing.assert_array_equal(gdn["o_norm"]["weight"], tensors["model.layers.1.attn.o_norm.weight"])
  np.testing.assert_array_equal(p["blocks"][0]["mlp"]["down_proj"]["kernel"],
                                tensors["model.layers.0.mlp.down_proj.weight"].T)
  np.testing.assert_array_equal(p["blocks"][0]["mixer_norm"]["weight"],
                                tensors["model.layers.0.attn_norm.weight"])
  np.testing.assert_array_equal(p["lm_head"]["kernel"], tensors["lm_head.weight"].T)
  np.testing.assert_array_equal(p["embed"]["embedding"], tensors["model.embeddings.weight"])


def test_short_conv_layout_matches_torch_causal_conv(tmp_path, rng):
  """FLA's ShortConvolution = Conv1d(groups=C, padding=K-1) truncated to T, then SiLU."""
  c, k, t = 6, 4, 9
  w = rng.standard_normal((c, 1, k)).astype(np.float32)
  x = rng.standard_normal((1, t, c)).astype(np.float32)
  x_pad = np.concatenate([np.zeros((1, k - 1, c), np.float32), x], axis=1)
  y = np.stack([sum(w[:, 0, j] * x_pad[0, s + j] for j in range(k)) for s in range(t)])[None]
  want = y / (1 + np.exp(-y))
  conv = ShortConv(c, k, init_std=0.02, rngs=nnx.Rngs(0))
  _, convert_fn = convert.hf_params.KINDS["short_conv"]
  conv.weight[...] = jnp.asarray(convert_fn(w, (k, c)))
  np.testing.assert_allclose(np.asarray(conv(jnp.asarray(x))), want, rtol=1e-5, atol=1e-6)


def test_hybrid_attention_specs_map_to_attn_and_swa(tmp_path, rng):
  cfg = gdn_config(num_hidden_layers=3, tie_word_embeddings=True, attn=[
      dict(layers=[1], num_heads=4, num_kv_heads=2, window_size=None, rope_theta=500.0),
      dict(layers=[2], num_heads=4, num_kv_heads=4, window_size=8)])
  tensors = hf_tensors(cfg, rng)
  tensors["lm_head.weight"] = tensors["model.embeddings.weight"].copy()  # tied, saved anyway
  model, mc = convert.load_hf(save(tmp_path, cfg, tensors))
  assert mc.layers == ("gdn", "attn", "swa") and mc.tie_embeddings
  assert (mc.attn.num_heads, mc.attn.num_kv_heads, mc.attn.head_dim) == (4, 2, 16)
  assert mc.attn.window_size is None and mc.attn.rope_theta == 500.0
  assert mc.swa.window_size == 8 and mc.swa.num_kv_heads == 4  # visible tokens, unchanged
  k = np.asarray(model.blocks[1].mixer.k_proj.kernel[...])
  np.testing.assert_array_equal(k, tensors["model.layers.1.attn.k_proj.weight"].T)
  assert k.shape == (D, 2 * 16)
  run_logits(model)


def test_reference_lte_scorer_matches_torch_grouped_conv(tmp_path, rng):
  cfg = gdn_config(model_type="hybrid_gated_deltanet", attn=lte_spec())
  tensors = hf_tensors(cfg, rng)
  converted = convert.convert_hf(save(tmp_path, cfg, tensors))
  mc = converted.config
  assert mc.layers == ("gdn", "lte")
  lte = mc.lte
  assert (lte.num_heads, lte.num_kv_heads, lte.head_dim, lte.window_size, lte.budget) == (4, 2, 16, 16, 8)
  assert lte.sink_size == 2 and lte.kernel_sizes == (3, 3, 3) and lte.dilations == (2, 2, 2)
  np.testing.assert_array_equal(converted.controller["lam"], tensors["model.l1_lambda"])
  np.testing.assert_array_equal(converted.controller["kept_ema"], tensors["model.num_kept"])

  t, g, hd = 20, 2, 16
  k_raw = rng.standard_normal((t, g, hd))
  v = rng.standard_normal((t, g, hd))
  want = ref_scores(tensors, "model.layers.1.attn.", k_raw, v)

  model, _ = convert.load_hf(str(tmp_path / "hf"))
  got = model.blocks[1].mixer.scorer(jnp.asarray(k_raw[None], jnp.float32),
                                    jnp.asarray(v[None], jnp.float32))
  np.testing.assert_allclose(np.asarray(got)[0], want, rtol=1e-4, atol=1e-5)
  assert model.blocks[1].mixer.enforce_budget
  run_logits(model, t=24)


def test_lte_scorer_shared_per_layer_is_copied_to_every_head(tmp_path, rng):
  cfg = gdn_config(model_type="hybrid_gated_deltanet", attn=lte_spec(routing_shared="layer"))
  tensors = hf_tensors(cfg, rng)
  p = convert.convert_hf(save(tmp_path, cfg, tensors)).params["blocks"][1]["mixer"]["scorer"]
  w = tensors["model.layers.1.attn.router.conv_stack.convs.0.weight"]  # [Cout, Cin, 1, k]
  for head in range(2):
    np.testing.assert_array_equal(p["conv_kernels"][0][:, head], w[:, :, 0, :].transpose(2, 1, 0))
    np.testing.assert_array_equal(p["proj_bias"][head],
                                  tensors["model.layers.1.attn.router.conv_stack.proj.bias"][0])


def test_reference_nsa_layer_maps_gate_rows(tmp_path, rng):
  spec = dict(attn_type="nsa", layers=[1], num_heads=4, num_kv_heads=2, head_dim=8,
              qkv_bias=False, block_size=4, block_counts=3, window_size=8, rope_theta=10000.0)
  cfg = gdn_config(model_type="hybrid_gated_deltanet", attn=spec)
  tensors = hf_tensors(cfg, rng)
  model, mc = convert.load_hf(save(tmp_path, cfg, tensors))
  assert mc.layers == ("gdn", "nsa")
  assert (mc.nsa.head_dim, mc.nsa.block_size, mc.nsa.block_count, mc.nsa.window_size) == (8, 4, 3, 8)
  np.testing.assert_array_equal(np.asarray(model.blocks[1].mixer.g_proj.kernel[...]),
                                tensors["model.layers.1.attn.g_proj.weight"].T)
  run_logits(model, t=16)


def test_sharded_bf16_checkpoint(tmp_path, rng):
  cfg = gdn_config()
  tensors = {n: v.astype(ml_dtypes.bfloat16) for n, v in hf_tensors(cfg, rng).items()}
  path = save(tmp_path, cfg, tensors, shards=3)
  assert not os.path.exists(os.path.join(path, "model.safetensors"))
  p = convert.convert_hf(path).params
  np.testing.assert_array_equal(p["blocks"][0]["mixer"]["k_proj"]["kernel"],
                                tensors["model.layers.0.attn.k_proj.weight"].astype(np.float32).T)
  assert p["blocks"][0]["mixer"]["k_proj"]["kernel"].dtype == np.float32


def test_missing_and_unexpected_tensors_are_listed(tmp_path, rng):
  cfg = gdn_config()
  tensors = hf_tensors(cfg, rng)
  del tensors["model.layers.1.attn.dt_bias"]
  tensors["model.layers.0.attn.q_norm.weight"] = np.ones(16, np.float32)
  with pytest.raises(ValueError, match=r"missing tensors \[model.layers.1.attn.dt_bias\]; "
                     r"unexpected tensors \[model.layers.0.attn.q_norm.weight\]"):
    convert.convert_hf(save(tmp_path, cfg, tensors))


def test_wrong_shape_is_named(tmp_path, rng):
  cfg = gdn_config()
  tensors = hf_tensors(cfg, rng)
  name = "model.layers.0.attn.q_proj.weight"
  tensors[name] = tensors[name].T  # [in, out] instead of torch's [out, in]
  with pytest.raises(ValueError, match=rf"{name} has shape \(64, 32\), expected \(32, 64\)"):
    convert.convert_hf(save(tmp_path, cfg, tensors))


def test_untied_lm_head_that_differs_is_refused_when_tied(tmp_path, rng):
  cfg = gdn_config(tie_word_embeddings=True)
  tensors = hf_tensors(cfg, rng)
  tensors["lm_head.weight"] = tensors["model.embeddings.weight"] + 1
  with pytest.raises(ValueError, match="tie_word_embeddings=true but lm_head.weight differs"):
    convert.convert_hf(save(tmp_path, cfg, tensors))


@pytest.mark.parametrize("change, message", [
    (dict(model_type="mamba2"), r"model_type must be one of \('gated_deltanet', "),
    (dict(allow_neg_eigval=True), "allow_neg_eigval = True is not supported"),
    (dict(use_gate=False), "use_gate = False is not supported"),
    (dict(num_v_heads=4), "num_v_heads = 4 is not supported"),
    (dict(output_gate_activation="sigmoid"), "output_gate_activation = 'sigmoid'"),
    (dict(attn=dict(layers=[1], num_heads=4, qkv_bias=True)), "attn.attn.qkv_bias = True"),
    (dict(attn=dict(layers=[1], num_heads=4, qk_norm=True)), r"does not know: \['qk_norm'\]"),
    (dict(attn=dict(layers=[1], num_heads=3)), "num_heads = 3 is not supported.*divisor"),
    (dict(model_type="hybrid_gated_deltanet", attn=lte_spec(routing_method="relu")),
     "routing_method = 'relu'"),
    (dict(model_type="hybrid_gated_deltanet", attn=lte_spec(routing_shared="all")),
     "routing_shared = 'all'"),
])
def test_unsupported_configs_are_refused(change, message):
  with pytest.raises(ValueError, match=message):
    convert.model_config_from_hf(gdn_config(**change))


def test_directory_without_checkpoint(tmp_path):
  (tmp_path / "config.json").write_text(json.dumps(gdn_config()))
  (tmp_path / "pytorch_model.bin").write_bytes(b"")
  with pytest.raises(ValueError, match="neither model.safetensors nor .*pytorch_model.bin"):
    convert.convert_hf(str(tmp_path))
