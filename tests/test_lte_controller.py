"""LTE regulariser statistics and the lambda controller, against hand-written expectations."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lte_jax import configs
from lte_jax import lte_controller as ctl
from tests.quick_compile import quick_compile  # noqa: F401  (autouse fixture)


def _python_controller(kept_seq, target, lam0=1e-9, alpha=2 / 17, interval=32):
  """Independent scalar loop of the rule in PAPER.md section 3."""
  lam, ema, lams, emas = lam0, None, [], []
  for step, kept in enumerate(kept_seq):
    ema = kept if ema is None else (1 - alpha) * ema + alpha * kept
    if (step + 1) % interval == 0:
      if ema > target:
        lam *= 1.5
      elif ema < 0.95 * target:
        lam /= 2.0
      lam = min(max(lam, 1e-9), 1.0)
    lams.append(lam)
    emas.append(ema)
  return np.array(lams), np.array(emas)


def test_scripted_kept_drives_lambda_as_the_rule_says():
  target = 512.0
  # head 0: always far above target -> lambda x1.5 every 32 steps, up to the clamp at 1.0.
  # head 1: always far below -> stays clamped at 1e-9.
  # head 2: inside the dead band [0.95 target, target] -> never moves.
  # head 3: above for 96 steps, then below: up three times, then halves.
  n = 32 * 60
  seqs = np.stack([
      np.full(n, 2000.0),
      np.full(n, 10.0),
      np.full(n, 500.0),
      np.where(np.arange(n) < 96, 3000.0, 0.0),
  ], axis=1).astype(np.float32)
  state = ctl.init_controller(1, 4)
  step_fn = jax.jit(lambda s, k: ctl.update_controller(s, k, target=target))
  got_lam, got_ema = [], []
  for kept in seqs:
    state = step_fn(state, jnp.asarray(kept)[None])
    got_lam.append(np.asarray(state.lam[0]))
    got_ema.append(np.asarray(state.kept_ema[0]))
  got_lam, got_ema = np.stack(got_lam), np.stack(got_ema)
  for h in range(4):
    want_lam, want_ema = _python_controller(seqs[:, h].astype(np.float64), target)
    np.testing.assert_allclose(got_lam[:, h], want_lam, rtol=1e-5)
    np.testing.assert_allclose(got_ema[:, h], want_ema, rtol=1e-5, atol=1e-3)
  assert int(state.step) == n
  # Hand-written checkpoints of head 0: first change after the 32nd call (index 31).
  assert got_lam[30, 0] == np.float32(1e-9)
  np.testing.assert_allclose(got_lam[31, 0], 1.5e-9, rtol=1e-6)
  np.testing.assert_allclose(got_lam[63, 0], 2.25e-9, rtol=1e-6)
  assert got_lam[-1, 0] == 1.0            # upper clamp reached (1.5^52 > 1e9)
  assert np.all(got_lam[:, 1] == np.float32(1e-9))   # lower clamp
  assert np.all(got_lam[:, 2] == np.float32(1e-9))   # dead band
  np.testing.assert_allclose(got_lam[95, 3], 1e-9 * 1.5 ** 3, rtol=1e-6)
  # After kept drops to 0 the EMA needs a few steps to fall below 0.95 x 512; by step
  # 127 it has ((15/17)^32 x 3000 < 486), so lambda halves.
  np.testing.assert_allclose(got_lam[127, 3], 1e-9 * 1.5 ** 3 / 2, rtol=1e-6)


def test_ema_starts_from_first_observation():
  state = ctl.update_controller(ctl.init_controller(2, 3), jnp.full((2, 3), 77.0), target=10.0)
  np.testing.assert_allclose(state.kept_ema, 77.0)
  state = ctl.update_controller(state, jnp.full((2, 3), 94.0), target=10.0)
  np.testing.assert_allclose(state.kept_ema, 77.0 + (94.0 - 77.0) * 2 / 17, rtol=1e-6)


def test_retention_stats_excludes_last_positions_and_masked():
  rng = np.random.default_rng(0)
  L, B, T, H = 2, 3, 20, 2
  r = rng.uniform(-0.5, 0.5, (L, B, T, H)).astype(np.float32)
  mask = rng.uniform(size=(B, T)) > 0.3
  reg, kept = ctl.retention_stats(jnp.asarray(r), jnp.asarray(mask), exclude_last=6)
  sel = mask.copy()
  sel[:, T - 6:] = False
  for l in range(L):
    for h in range(H):
      vals = r[l, :, :, h][sel]
      np.testing.assert_allclose(reg[l, h], np.maximum(vals, 0).mean(), rtol=1e-5)
      np.testing.assert_allclose(kept[l, h], (vals > 0).mean() * T, rtol=1e-5)
  # Changing excluded or masked positions changes nothing.
  r2 = r.copy()
  r2[:, :, T - 6:] = 0.4
  r2[:, ~mask] = 0.4
  reg2, kept2 = ctl.retention_stats(list(jnp.asarray(r2)), jnp.asarray(mask))
  np.testing.assert_allclose(reg2, reg, rtol=1e-6)
  np.testing.assert_allclose(kept2, kept, rtol=1e-6)
  # ... while the 7th-from-last position does count.
  r3 = r.copy()
  r3[:, :, T - 7] = 0.4
  reg3, _ = ctl.retention_stats(jnp.asarray(r3), None)
  reg_nomask, _ = ctl.retention_stats(jnp.asarray(r), None)
  assert np.all(np.asarray(reg3) != np.asarray(reg_nomask))


def test_regularizer_gradient_flows_to_r_not_lambda():
  r = jnp.asarray(np.linspace(-0.4, 0.4, 2 * 1 * 10 * 2).reshape(2, 1, 10, 2), jnp.float32)
  lam = jnp.asarray([[1.0, 2.0], [3.0, 4.0]])

  def loss(r, lam):
    reg, _ = ctl.retention_stats(r, None, exclude_last=2)
    return ctl.regularizer_loss(reg, lam)

  gr, glam = jax.grad(loss, argnums=(0, 1))(r, lam)
  assert np.all(np.asarray(glam) == 0)
  # d/dr of mean_{l,h}(lam * mean_t relu(r)) = lam / (L H count) where r > 0 and t counted.
  want = np.zeros(r.shape, np.float32)
  for l in range(2):
    for h in range(2):
      pos = (np.asarray(r[l, 0, :8, h]) > 0)
      want[l, 0, :8, h] = pos * float(lam[l, h]) / (4 * 8)
  np.testing.assert_allclose(gr, want, rtol=1e-6)


def test_axis_name_averages_kept_over_replicas():
  r = jnp.asarray(np.random.default_rng(1).uniform(-0.5, 0.5, (2, 1, 4, 12, 2)), jnp.float32)
  per_replica = jax.vmap(lambda x: ctl.retention_stats(x, None, axis_name="d")[1],
                         axis_name="d")(r)
  _, kept_global = ctl.retention_stats(jnp.concatenate([r[0], r[1]], axis=1), None)
  np.testing.assert_allclose(per_replica[0], kept_global, rtol=1e-6)
  np.testing.assert_allclose(per_replica[1], kept_global, rtol=1e-6)
  state = ctl.init_controller(1, 2)
  kept = jnp.asarray([[[10.0, 20.0]], [[30.0, 60.0]]])
  out = jax.vmap(lambda k: ctl.update_controller(state, k, target=1.0, axis_name="d").kept_ema,
                 axis_name="d")(kept)
  np.testing.assert_allclose(out[0], [[20.0, 40.0]])


def test_target_for_seq_len_and_metrics():
  cfg = configs.LTEConfig()
  assert ctl.target_for_seq_len(cfg, 4096) == 512
  assert ctl.target_for_seq_len(cfg, 2048) == 256
  state = ctl.init_controller(2, 2)
  m = ctl.controller_metrics(state, jnp.asarray([[1.0, 2.0], [3.0, 4.0]]), layer_ids=(1, 3))
  assert m["lte/layer3/kept_h1"] == 4.0
  assert m["lte/layer1/kept"] == 1.5
  assert m["lte/layer1/lambda_h0"] == pytest.approx(1e-9)
  assert all(isinstance(v, float) for v in m.values())


def test_bad_inputs_raise_value_errors():
  state = ctl.init_controller(2, 2)
  with pytest.raises(ValueError, match="kept"):
    ctl.update_controller(state, jnp.zeros((3, 2)), target=1.0)
  with pytest.raises(ValueError, match="retention"):
    ctl.retention_stats(jnp.zeros((2, 10, 2)))
  with pytest.raises(ValueError, match="exclude_last"):
    ctl.retention_stats(jnp.zeros((1, 2, 5, 2)), exclude_last=5)
  with pytest.raises(ValueError, match="loss_mask"):
    ctl.retention_stats(jnp.zeros((1, 2, 10, 2)), jnp.ones((2, 9)))
