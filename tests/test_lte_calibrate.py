"""experiments/lte_calibrate.py: a fresh laLTE model shifted to a chosen LTE sparsity."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from experiments import lte_calibrate
from lte_jax.configs import get_config
from lte_jax.training import train_state
from tests.quick_compile import quick_compile  # noqa: F401  (autouse fixture)


@functools.cache  # one fresh model per architecture for the whole module
def _setup(arch, t=96):
  cfg = get_config(arch, "tiny")
  model_def = train_state.make_model_def(cfg)
  # Jitted: drawn op by op, the tiny model's initialisers compile one by one.
  state = jax.jit(lambda: train_state.init_train_state(model_def, optax.adam(1e-3), 0))()
  tokens = jax.random.randint(jax.random.key(1), (2, t), 3, cfg.vocab_size, jnp.int32)
  segment_ids = jnp.concatenate([jnp.ones((2, 60), jnp.int32), 2 * jnp.ones((2, t - 60), jnp.int32)],
                                axis=1)                      # two documents per row
  batch = dict(inputs=tokens, segment_ids=segment_ids,
               positions=jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (2, t)))
  return model_def, state.params, batch


def test_shifts_only_the_scorer_biases_to_the_target():
  model_def, params, batch = _setup("laLTE")
  new, kept = lte_calibrate.calibrate_kept(model_def, params, batch, 24)
  assert kept.shape == (len(model_def.lte_layers), model_def.config.lte.num_kv_heads)
  # A fresh scorer keeps nearly all 96 tokens; after the shift about 24 per head.
  np.testing.assert_allclose(np.asarray(kept), 24, atol=6)
  # The count comes from the model itself, not from the calibration's own bookkeeping
  # (jitted: the model run op by op took 18 s on 2 cores).
  @jax.jit
  def retention(p):
    model = model_def.bind(p, jax.random.key(0))
    _, aux = model(batch["inputs"], segment_ids=batch["segment_ids"],
                   positions=batch["positions"])
    return jnp.stack(aux["lte_retention"])

  r = retention(new)
  np.testing.assert_allclose(np.asarray(jnp.mean(r > 0, axis=(1, 2)) * 96), np.asarray(kept),
                             atol=1e-4)
  changed = [jax.tree_util.keystr(p) for (p, a), b in zip(
      jax.tree_util.tree_flatten_with_path(params)[0], jax.tree_util.tree_leaves(new))
             if not np.array_equal(np.asarray(a), np.asarray(b))]
  assert changed and all(c.endswith("['scorer']['proj_bias']") for c in changed), changed


@pytest.mark.parametrize("arch,kept,needle", [("GDN", 24, "needs a model with LTE layers"),
                                              ("laLTE", 96, r"kept must be in \[1, 96\)")])
def test_rejects_bad_requests(arch, kept, needle):
  model_def, params, batch = _setup(arch)
  with pytest.raises(ValueError, match=needle):
    lte_calibrate.calibrate_kept(model_def, params, batch, kept)
