"""The paper's training recipe (lte_jax.training.recipes): decay masks, the reference
initialisation, the step size and counts it resolves to, non-finite steps, NSA presets."""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from experiments import configs as config_files
from experiments.configs.base import get_base_config
from lte_jax import configs, lte_controller
from lte_jax.models import Block, count_params
from lte_jax.training import experiment, optimizer, recipes, step as step_lib, train_state


def _flat(tree) -> dict:
  return {optimizer.param_path(p): v for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def test_weight_decay_mask_per_setting():
  abstract = train_state.make_model_def(
      configs.get_config("laLTE", "tiny", num_layers=2)).abstract_params
  params = _flat(abstract)
  matrices = _flat(optimizer.weight_decay_mask(abstract, "matrices"))
  every = _flat(optimizer.weight_decay_mask(abstract, "all"))
  # 'matrices' spares the vectors (norm weights, A_log, dt_bias, the scorer's proj_bias)
  # and the LTE scorer's per-head conv biases [Hkv, C], which are matrices by shape only.
  spared = {p for p, x in params.items() if x.ndim < 2 or "/conv_biases/" in p}
  assert {p for p, d in matrices.items() if not d} == spared
  assert {"blocks/1/mixer/scorer/conv_biases/0", "blocks/0/mixer/A_log",
          "blocks/0/mixer/dt_bias", "final_norm/weight"} <= spared
  assert matrices["embed/embedding"] and matrices["blocks/1/mixer/scorer/conv_kernels/0"]
  assert all(every.values()) and len(every) == len(params)   # the reference: every leaf

  # The optimizer applies the mask: with zero gradients Adam's step is 0, so the update
  # is -lr x weight_decay x param exactly where the mask decays.
  tree = {"proj": {"kernel": jnp.ones((2, 3))}, "norm": {"weight": jnp.ones(3)},
          "A_log": jnp.ones(2)}
  for mode, decayed in (("matrices", {"proj/kernel"}), ("all", set(_flat(tree)))):
    cfg = optimizer.OptimizerConfig(learning_rate=0.5, weight_decay=0.1, warmup_steps=0,
                                    weight_decay_mask=mode)
    tx, _ = optimizer.make_optimizer(cfg, total_steps=10)
    updates, _ = jax.jit(tx.update)(jax.tree.map(jnp.zeros_like, tree), tx.init(tree), tree)
    for path, u in _flat(updates).items():
      np.testing.assert_allclose(u, -0.05 if path in decayed else 0.0, err_msg=f"{mode} {path}")


def test_reference_init_standard_deviations_at_0p4b():
  # 0.4B: d_model 1024, intermediate 2816, 24 layers. PyTorch's kaiming_uniform_(a=sqrt 5)
  # on a Linear weight [out, in] is U(+-1/sqrt(in)), std 1/sqrt(3 in); / sqrt(2 x 24):
  #   o_proj (in = 16 heads x 64 = 1024):  1 / sqrt(3 x 1024 x 48) = 0.002604
  #   down_proj (in = 2816):               1 / sqrt(3 x 2816 x 48) = 0.001570
  # against normal(0.006) / sqrt(48) = 0.000866 for both under 'normal'. Scorer conv biases
  # U(+-1/sqrt(C_in x 3)) with C_in = 128, 64, 32 channels per head: bounds 0.0510, 0.0722,
  # 0.1021 (zero under 'normal').
  want = {"o_proj": 0.002604, "down_proj": 0.001570}
  assert math.isclose(1 / math.sqrt(3 * 1024 * 48), want["o_proj"], rel_tol=1e-3)
  assert math.isclose(1 / math.sqrt(3 * 2816 * 48), want["down_proj"], rel_tol=1e-3)
  bounds = [1 / math.sqrt(c * 3) for c in (128, 64, 32)]

  @jax.jit
  def measure():
    out = {}
    for init in configs.INIT_SCHEMES:   # one 0.4B LTE block each, never the whole model
      cfg = configs.get_config("laLTE", "0.4B", init=init)
      block = Block(cfg, "lte", rngs=nnx.Rngs(params=0, dropout=1))
      out[init] = dict(o_proj=jnp.std(block.mixer.o_proj.kernel[...]),
                       down_proj=jnp.std(block.mlp.down_proj.kernel[...]),
                       q_proj=block.mixer.q_proj.kernel[...],
                       biases=[b[...] for b in block.mixer.scorer.conv_biases])
    return out

  got = measure()
  ref, normal = got["reference"], got["normal"]
  for name in ("o_proj", "down_proj"):
    np.testing.assert_allclose(ref[name], want[name], rtol=0.01)
    np.testing.assert_allclose(normal[name], 0.006 / math.sqrt(48), rtol=0.01)
  for bias, bound in zip(ref["biases"], bounds):
    bias = np.asarray(bias)
    assert 0.9 * bound < np.abs(bias).max() <= bound
    np.testing.assert_allclose(bias.std(), bound / math.sqrt(3), rtol=0.15)
  assert all(not np.any(np.asarray(b)) for b in normal["biases"])
  # Only those are redrawn: the other weights come from the same draws under both schemes.
  np.testing.assert_array_equal(ref["q_proj"], normal["q_proj"])


def _config(arch="laLTE", **fields):
  config = config_files.load(config_files.resolve(arch))
  for dotted, value in fields.items():
    node = config
    *parents, key = dotted.split("__")
    for parent in parents:
      node = node[parent]
    node[key] = value
  return config


@pytest.mark.parametrize("size,steps,tokens", [("1.4B", 30720, 32_212_254_720),
                                               ("0.4B", 9537, 10_000_269_312)])
def test_paper_recipe_resolves_one_million_tokens_a_step(size, steps, tokens):
  config = _config(recipe="paper", size=size)
  for devices, accum in ((1, 32), (8, 4)):   # 8 sequences per device and micro-batch
    exp = experiment.resolve(config, num_devices=devices)
    assert exp.grad_accum == accum
    assert exp.data.batch_size == 256 and exp.data.seq_len == 4096
    assert exp.data.batch_size * exp.data.seq_len == 1_048_576
    assert exp.steps == steps and exp.steps * 1_048_576 == tokens
  assert exp.optim == optimizer.OptimizerConfig(
      learning_rate=3e-4, b1=0.9, b2=0.95, eps=1e-15, weight_decay=0.1, warmup_steps=512,
      final_lr_ratio=0.1, clip_norm=1.0, weight_decay_mask="all", nonfinite="skip_update")
  assert (exp.seed, exp.model.dtype, exp.model.init) == (42, "bfloat16", "reference")
  filled = recipes.apply(config)
  assert (filled.mesh.data, filled.mesh.fsdp) == (1, -1)   # FSDP over every device


def test_accumulation_follows_the_devices_and_is_checked():
  assert recipes.grad_accum_for(256, 8, 1) == 32
  assert recipes.grad_accum_for(256, 8, 8) == 4
  for devices in (3, 64):   # 256 rows do not split into 8 x 3, nor fill 8 x 64
    with pytest.raises(ValueError, match="micro_batch_per_device=8"):
      recipes.grad_accum_for(256, 8, devices)
  with pytest.raises(ValueError, match="micro_batch_per_device must be a positive integer"):
    recipes.grad_accum_for(256, 0, 1)
  # Data x fsdp split the batch; the tensor axis does not.
  config = _config(recipe="paper", size="1.4B", mesh__data=2, mesh__fsdp=2, mesh__tensor=2)
  assert experiment.resolve(config, num_devices=8).grad_accum == 8
  both = _config(recipe="paper", size="1.4B", optim__grad_accum=4,
                 optim__micro_batch_per_device=8)
  with pytest.raises(ValueError, match="set one of config.optim.grad_accum"):
    experiment.resolve(both, num_devices=1)


def test_recipe_fields_are_overridable_one_at_a_time():
  config = _config(recipe="paper", size="1.4B", optim__weight_decay_mask="matrices",
                   optim__grad_accum=16)
  exp = experiment.resolve(config, num_devices=2)
  assert exp.optim.weight_decay_mask == "matrices" and exp.grad_accum == 16
  assert exp.optim.nonfinite == "skip_update" and exp.steps == 30720
  default = experiment.resolve(_config(), num_devices=1)
  assert (default.steps, default.grad_accum, default.optim.warmup_steps) == (300, 1, 30)
  assert (default.optim.weight_decay_mask, default.optim.nonfinite, default.model.init) == (
      "matrices", "skip_step", "normal")
  with pytest.raises(ValueError, match="config.steps is unset and recipe 'paper'"):
    experiment.resolve(_config(recipe="paper"), num_devices=1)   # no step count for tiny
  with pytest.raises(ValueError, match="config.recipe must be one of"):
    recipes.apply(_config(recipe="fast"))
  base = get_base_config()
  for name, values in recipes.RECIPES.items():   # every recipe field exists and is unset
    for field in values:
      exists, value = recipes._get(base, field)
      assert exists and value is None, (name, field)


def test_non_finite_step_under_skip_update_advances_schedule_and_lambda_ema():
  lte = configs.LTEConfig(num_heads=2, num_kv_heads=1, head_dim=8, sink_size=2, window_size=13,
                          budget=5, dropout=0.0)
  cfg = configs.get_config("laLTE", "tiny", layers=("lte",), d_model=32, intermediate_size=64,
                           vocab_size=64, lte=lte)
  model_def = train_state.make_model_def(cfg)
  tx, schedule = optimizer.make_optimizer(
      optimizer.OptimizerConfig(learning_rate=1e-3, warmup_steps=4), total_steps=20)
  # Parameters from numpy (no init to compile); the scorer's bias 0.5 keeps every token.
  rng = np.random.default_rng(0)
  params = jax.tree_util.tree_map_with_path(
      lambda p, x: np.full(x.shape, 0.5, np.float32) if optimizer.param_path(p).endswith(
          "proj_bias") else rng.normal(0, 0.05, x.shape).astype(np.float32),
      model_def.abstract_params)
  state = train_state.TrainState(
      step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
      controller=lte_controller.init_controller(1, 1),
      rng=jax.random.key_data(jax.random.key(0)), skipped=jnp.zeros((), jnp.int32))
  b, t = 2, 16
  tokens = rng.integers(1, cfg.vocab_size, (b, t + 1)).astype(np.int32)
  batch = dict(inputs=tokens[:, :-1], targets=tokens[:, 1:],
               segment_ids=np.ones((b, t), np.int32),
               positions=np.broadcast_to(np.arange(t, dtype=np.int32), (b, t)),
               loss_mask=np.ones((b, t), np.float32))
  bad = dict(batch, loss_mask=batch["loss_mask"].copy())
  bad["loss_mask"][1, 3] = np.nan   # a NaN loss and gradients; the scores stay finite
  step = step_lib.make_train_step(model_def, tx, schedule, lte_target=4.0, exclude_last=2,
                                  nonfinite="skip_update")
  # A fast compile: this checks counters, not speed.
  fn = jax.jit(step).lower(state, batch).compile(
      {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True})

  new, metrics = fn(state, bad)
  assert bool(metrics["skipped"]) and int(new.skipped) == 1
  for x, y in zip(jax.tree.leaves(new.params), jax.tree.leaves(state.params)):
    np.testing.assert_array_equal(x, y)
  adam_new, adam_old = new.opt_state[1][0], state.opt_state[1][0]
  for x, y in zip(jax.tree.leaves(adam_new), jax.tree.leaves(adam_old)):
    np.testing.assert_array_equal(x, y)   # moments and Adam's bias-correction count
  assert int(optimizer.schedule_count(new.opt_state)) == 1
  assert int(new.controller.step) == 1
  np.testing.assert_array_equal(new.controller.kept_ema, metrics["kept"])   # EMA's first value
  assert float(metrics["kept"].min()) > 0

  after, metrics = fn(new, batch)
  assert not bool(metrics["skipped"])
  np.testing.assert_allclose(metrics["lr"], schedule(1), rtol=1e-6)   # the schedule moved on
  assert int(optimizer.schedule_count(after.opt_state)) == 2
  assert int(after.opt_state[1][0].count) == 1 and int(after.controller.step) == 2


def _reference_nsa_count(size: str) -> int:
  """The reference's nsa_0.4B.json / nsa_1.4B.json by hand (flash-linear-attention's
  NativeSparseAttention and GatedMLP, no biases): per layer q (d x 32 x 64), k and v
  (d x 2 x 64 each), g_proj (d x 3 x 32), o (32 x 64 x d), the SwiGLU 3 x d x inter and
  two norms (d each); then embeddings 32000 x d, the final norm d and, untied at 1.4B, a
  32000 x d head.
    0.4B (d 1024, inter 2816): 4,554,752 + 8,650,752 + 2,048 = 13,207,552 a layer;
      24 x that = 316,981,248; + 32,768,000 + 1,024 = 349,750,272.
    1.4B (d 2048, inter 5632): 9,109,504 + 34,603,008 + 4,096 = 43,716,608 a layer;
      24 x that = 1,049,198,592; + 2 x 65,536,000 + 2,048 = 1,180,272,640.
  """
  d, inter, tied = {"0.4B": (1024, 2816, True), "1.4B": (2048, 5632, False)}[size]
  attn = d * 32 * 64 + 2 * d * 2 * 64 + d * 3 * 32 + 32 * 64 * d
  layer = attn + 3 * d * inter + 2 * d
  return 24 * layer + 32000 * d + d + (0 if tied else 32000 * d)


@pytest.mark.parametrize("size,reference", [("0.4B", 349_750_272), ("1.4B", 1_180_272_640)])
def test_nsa_presets_match_the_reference_configs(size, reference):
  assert _reference_nsa_count(size) == reference
  cfg = configs.get_config("NSA", size)
  assert cfg.layers == ("nsa",) * 24 and cfg.tie_embeddings == (size == "0.4B")
  n = cfg.nsa
  assert (n.num_heads, n.num_kv_heads, n.head_dim, n.block_size, n.block_count,
          n.window_size) == (32, 2, 64, 64, 16, 512)
  # Every layer alike: one- and two-layer counts give the top and a layer (no 24-layer trace).
  one, two = (count_params(dataclasses.replace(cfg, layers=cfg.layers[:k])) for k in (1, 2))
  ours = one + 23 * (two - one)
  print(f"NSA {size}: lte_jax {ours:,} reference {reference:,}")
  assert abs(ours - reference) / reference < 0.01
