"""AdamW recipe: schedule shape, weight-decay mask, one update against a hand-written AdamW."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lte_jax import configs
from lte_jax.training import optimizer
from lte_jax.training.train_state import make_model_def


def test_schedule_warmup_then_cosine_to_tenth():
  cfg = optimizer.OptimizerConfig(learning_rate=3e-4, warmup_steps=10)
  lr = optimizer.learning_rate_schedule(cfg, 110)
  assert float(lr(0)) == 0.0
  np.testing.assert_allclose(float(lr(5)), 1.5e-4, rtol=1e-6)
  np.testing.assert_allclose(float(lr(10)), 3e-4, rtol=1e-6)
  # Halfway through the cosine: (peak + end) / 2.
  np.testing.assert_allclose(float(lr(60)), (3e-4 + 3e-5) / 2, rtol=1e-5)
  np.testing.assert_allclose(float(lr(110)), 3e-5, rtol=1e-6)
  decay = np.array([float(lr(s)) for s in range(10, 111)])
  assert np.all(np.diff(decay) <= 0)


def test_schedule_rejects_warmup_not_below_steps():
  with pytest.raises(ValueError, match="warmup_steps"):
    optimizer.learning_rate_schedule(optimizer.OptimizerConfig(warmup_steps=100), 100)


@pytest.mark.parametrize("field,value", [("learning_rate", 0.0), ("b2", 1.0), ("eps", -1.0),
                                         ("warmup_steps", -1), ("final_lr_ratio", 2.0)])
def test_config_validation_names_the_field(field, value):
  with pytest.raises(ValueError, match=f"optim.{field}"):
    optimizer.OptimizerConfig(**{field: value})


def test_weight_decay_mask_on_the_real_model():
  model_def = make_model_def(configs.get_config("laLTE", "tiny", num_layers=2))
  mask = optimizer.weight_decay_mask(model_def.abstract_params)
  flat = {optimizer.param_path(p): v for p, v in jax.tree_util.tree_flatten_with_path(mask)[0]}
  shapes = {optimizer.param_path(p): v.shape
            for p, v in jax.tree_util.tree_flatten_with_path(model_def.abstract_params)[0]}
  assert flat["embed/embedding"] is True
  assert flat["blocks/0/mlp/up_proj/kernel"] is True
  for path, decayed in flat.items():
    name = path.split("/")[-1]
    if name in ("A_log", "dt_bias") or "norm" in path or name == "bias" or len(shapes[path]) < 2:
      assert decayed is False, path
  assert flat["blocks/0/mixer/A_log"] is False
  assert flat["blocks/0/mixer/dt_bias"] is False
  assert flat["blocks/0/mixer_norm/weight"] is False
  assert sum(flat.values()) > 10


def test_one_update_matches_hand_written_adamw_with_clipping():
  cfg = optimizer.OptimizerConfig(learning_rate=1e-2, b1=0.9, b2=0.95, eps=1e-15,
                                  weight_decay=0.1, warmup_steps=0, clip_norm=1.0)
  tx, _ = optimizer.make_optimizer(cfg, total_steps=100)
  rng = np.random.default_rng(0)
  params = {"w": jnp.asarray(rng.normal(size=(3, 5)), jnp.float32),
            "norm": {"weight": jnp.asarray(rng.normal(size=(5,)), jnp.float32)},
            "A_log": jnp.asarray(rng.normal(size=(4, 4)), jnp.float32)}
  grads = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape) * 3, jnp.float32), params)
  updates, _ = tx.update(grads, tx.init(params), params)

  norm = np.sqrt(sum(np.sum(np.asarray(g, np.float64) ** 2) for g in jax.tree.leaves(grads)))
  assert norm > 1.0  # clipping is active
  for key, decay in (("w", True), ("A_log", False)):
    g = np.asarray(grads[key], np.float64) / norm
    m_hat = (1 - 0.9) * g / (1 - 0.9)
    v_hat = (1 - 0.95) * g * g / (1 - 0.95)
    want = -1e-2 * (m_hat / (np.sqrt(v_hat) + 1e-15)
                    + (0.1 * np.asarray(params[key]) if decay else 0.0))
    np.testing.assert_allclose(np.asarray(updates[key]), want, rtol=1e-5, atol=1e-8)
  g = np.asarray(grads["norm"]["weight"], np.float64) / norm
  np.testing.assert_allclose(np.asarray(updates["norm"]["weight"]),
                             -1e-2 * g / np.abs(g), rtol=1e-5)
