"""The train step: loss, accumulation, skipped non-finite steps, LTE regulariser and controller."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lte_jax import configs, lte_controller, segments
from lte_jax.training import optimizer, step as step_lib, train_state
from tests.quick_compile import quick_compile  # noqa: F401  (autouse fixture)

B, T = 4, 32


def make_batch(seed: int, vocab: int = 512) -> dict:
  """Packed rows: two documents in each row, the second cut at a random point."""
  rng = np.random.default_rng(seed)
  tokens = rng.integers(1, vocab, size=(B, T + 1)).astype(np.int32)
  cut = rng.integers(4, T - 4, size=(B, 1))
  seg = np.where(np.arange(T)[None] < cut, 1, 2).astype(np.int32)
  seg[0, -3:] = 0  # padding at the end of one row
  positions = np.asarray(segments.positions_from_segment_ids(jnp.asarray(seg)), np.int32)
  return dict(inputs=tokens[:, :-1], targets=tokens[:, 1:], segment_ids=seg,
              positions=positions, loss_mask=(seg != 0).astype(np.float32))


def build(arch="laLTE", grad_accum=1, lr=1e-3, **overrides):
  model_cfg = configs.get_config(arch, "tiny", num_layers=2, **overrides)
  model_cfg = configs.replace(model_cfg, lte=configs.replace(model_cfg.lte, dropout=0.0))
  model_def = train_state.make_model_def(model_cfg)
  tx, schedule = optimizer.make_optimizer(
      optimizer.OptimizerConfig(learning_rate=lr, warmup_steps=0), total_steps=100)
  state = jax.jit(lambda: train_state.init_train_state(model_def, tx, seed=0))()
  fn = jax.jit(step_lib.make_train_step(model_def, tx, schedule, grad_accum=grad_accum,
                                        lte_target=4.0, exclude_last=model_cfg.lte.lookahead))
  return model_def, state, fn


@pytest.fixture(scope="module")
def lalte():
  return build()


def assert_trees_equal(a, b):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_cross_entropy_sum_matches_log_softmax():
  rng = np.random.default_rng(0)
  logits = jnp.asarray(rng.normal(size=(2, 5, 7)) * 3, jnp.float32)
  targets = jnp.asarray(rng.integers(0, 7, size=(2, 5)), jnp.int32)
  mask = jnp.asarray(rng.integers(0, 2, size=(2, 5)), jnp.float32)
  logp = jax.nn.log_softmax(np.asarray(logits, np.float64), axis=-1)
  want = -np.sum(np.take_along_axis(np.asarray(logp), np.asarray(targets)[..., None],
                                    -1)[..., 0] * np.asarray(mask))
  np.testing.assert_allclose(float(step_lib.cross_entropy_sum(logits, targets, mask)), want,
                             rtol=1e-5)


def test_loss_is_cross_entropy_plus_lambda_weighted_regulariser(lalte):
  model_def, state, fn = lalte
  lam = jnp.full_like(state.controller.lam, 0.3)
  state = state.replace(controller=state.controller.replace(lam=lam))
  batch = make_batch(1)
  _, metrics = fn(state, batch)

  @jax.jit    # one compile, not the model op by op
  def stats(params, batch):
    model = model_def.bind(params, jax.random.key(0))  # dropout is 0: key irrelevant
    logits, aux = model(batch["inputs"], segment_ids=batch["segment_ids"],
                        positions=batch["positions"])
    mask = batch["loss_mask"]
    ce = step_lib.cross_entropy_sum(logits, batch["targets"], mask) / mask.sum()
    return ce, lte_controller.retention_stats(aux["lte_retention"], mask, exclude_last=6)

  ce, (reg, kept) = stats(state.params, batch)
  np.testing.assert_allclose(float(metrics["ce_loss"]), float(ce), rtol=1e-5)
  np.testing.assert_allclose(float(metrics["reg_loss"]),
                             float(lte_controller.regularizer_loss(reg, lam)), rtol=1e-5)
  assert float(metrics["reg_loss"]) > 0
  np.testing.assert_allclose(float(metrics["loss"]),
                             float(metrics["ce_loss"]) + float(metrics["reg_loss"]), rtol=1e-6)
  np.testing.assert_allclose(np.asarray(metrics["kept"]), np.asarray(kept), rtol=1e-6)


def test_gradient_accumulation_matches_one_big_batch(lalte):
  _, state, fn1 = lalte
  _, _, fn2 = build(grad_accum=2)
  batch = make_batch(2)
  s1, m1 = fn1(state, batch)
  s2, m2 = fn2(state, batch)
  for key in ("loss", "ce_loss", "reg_loss", "grad_norm"):
    np.testing.assert_allclose(float(m2[key]), float(m1[key]), rtol=2e-5, err_msg=key)
  np.testing.assert_allclose(np.asarray(m2["kept"]), np.asarray(m1["kept"]), rtol=1e-5)
  for a, b in zip(jax.tree.leaves(s1.params), jax.tree.leaves(s2.params)):
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-4, atol=1e-6)


def test_non_finite_step_is_skipped_and_counted(lalte):
  _, state, fn = lalte
  bad = make_batch(3)
  bad["loss_mask"] = bad["loss_mask"].copy()
  bad["loss_mask"][1, 5] = np.nan
  new, metrics = fn(state, bad)
  assert bool(metrics["skipped"]) and int(new.skipped) == 1 and int(new.step) == 1
  assert not np.isfinite(float(metrics["grad_norm"]))
  assert_trees_equal(new.params, state.params)
  assert_trees_equal(new.opt_state, state.opt_state)
  assert_trees_equal(new.controller, state.controller)
  after, metrics = fn(new, make_batch(4))
  assert not bool(metrics["skipped"]) and int(after.skipped) == 1 and int(after.step) == 2
  assert int(after.controller.step) == 1
  moved = [not np.array_equal(a, b) for a, b in
           zip(jax.tree.leaves(after.params), jax.tree.leaves(new.params))]
  assert all(moved)


def test_loss_falls_and_controller_steps_on_a_repeated_batch(lalte):
  _, state, fn = lalte
  batch = make_batch(5)
  losses = []
  for _ in range(12):
    state, metrics = fn(state, batch)
    losses.append(float(metrics["loss"]))
  assert losses[-1] < losses[0] - 1.0, losses
  assert int(state.controller.step) == 12
  assert np.asarray(metrics["lam"]).shape == (1, 2)
  assert np.isfinite(float(metrics["lr"])) and float(metrics["lr"]) > 0


def test_model_without_lte_layers_has_no_controller():
  _, state, fn = build(arch="GDN")
  assert state.controller is None
  state, metrics = fn(state, make_batch(6))
  assert "kept" not in metrics and float(metrics["reg_loss"]) == 0.0
  assert np.isfinite(float(metrics["loss"]))


def test_batch_not_divisible_by_accumulation_is_rejected(lalte):
  model_def, state, _ = lalte
  tx, schedule = optimizer.make_optimizer(optimizer.OptimizerConfig(warmup_steps=0), 10)
  step = step_lib.make_train_step(model_def, tx, schedule, grad_accum=3)
  with pytest.raises(ValueError, match="divisible by optim.grad_accum=3"):
    step(state, make_batch(7))
  with pytest.raises(ValueError, match="missing"):
    step(state, {"inputs": make_batch(7)["inputs"]})


def test_init_params_per_kind_init_is_seeded_and_distinct_per_layer():
  """init_params builds each mixer kind once (vmapped over its layers): the layers must
  still get their own draws, the seed must decide them, and the statistics must be the
  model's own initialisers' (the HybridLM built directly, same config)."""
  from flax import nnx

  from lte_jax.models import HybridLM
  cfg = configs.get_config("laLTE", "tiny", num_layers=4)
  init = jax.jit(lambda seed: train_state.init_params(cfg, seed))   # one compile
  a, b, c = init(0), init(0), init(1)
  assert_trees_equal(a, b)
  assert not np.array_equal(a["embed"]["embedding"], c["embed"]["embedding"])
  kinds = cfg.layers
  same = [i for i in range(1, len(kinds)) if kinds[i] == kinds[0]]
  assert same, kinds
  w0 = jax.tree.leaves(a["blocks"][0]["mlp"])[0]
  w1 = jax.tree.leaves(a["blocks"][same[0]]["mlp"])[0]
  assert w0.shape == w1.shape and not np.array_equal(w0, w1)
  direct = nnx.to_pure_dict(nnx.state(HybridLM(cfg, rngs=nnx.Rngs(params=0, dropout=1)),
                                      nnx.Param))
  assert jax.tree.structure(direct) == jax.tree.structure(a)
  for x, y in zip(jax.tree.leaves(direct), jax.tree.leaves(a)):
    assert x.shape == y.shape and x.dtype == y.dtype
    if x.size >= 256:   # per-head gates have 2 entries here: their spread says nothing
      np.testing.assert_allclose(np.std(np.asarray(y)), np.std(np.asarray(x)), rtol=0.2,
                                 atol=1e-6)
      np.testing.assert_allclose(np.mean(np.asarray(y)), np.mean(np.asarray(x)),
                                 atol=0.2 * float(np.std(np.asarray(x))) + 1e-6)
