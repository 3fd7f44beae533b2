"""LTE sparsity regulariser and the per-(layer, KV head) lambda controller.

PAPER.md section 3. Training adds

    loss += mean over (LTE layer l, KV head h) of lambda[l, h] * reg[l, h],
    reg[l, h] = mean over (batch, position) of relu(r)

excluding the last ``lookahead`` (6) positions of each row (their scorer
window runs off the end of the sequence) and positions masked out of the loss.
Lambda is not learned; a controller steers it so that each head keeps about
``target`` tokens per sequence:

    kept[l, h] = (fraction of those positions with r > 0) x T
    ema        = kept                                    at the first update (step 0)
               = (1 - alpha) ema + alpha kept            afterwards (alpha = 2/17)
    then, when (step + 1) % interval == 0 (after the EMA update of that step):
        ema > target          -> lambda x up    (1.5)
        ema < low_frac target -> lambda / down  (2.0)
    lambda is clamped to [lam_min, lam_max] = [1e-9, 1]; step += 1.

``step`` counts calls of ``update_controller`` starting at 0, so with the
trainer calling it once per optimiser step, lambda changes after steps 31, 63,
... (0-based), i.e. after the 32nd, 64th, ... step, as the reference does
with its 1-based ``step % 32 == 0``. The train step calls it on every step
under OptimizerConfig.nonfinite = 'skip_update' (the reference, whose lambda
update runs before it decides to skip a non-finite step) and on applied steps
only under 'skip_step'. The EMA starts from the first
observation rather than from 0 (which would read as "nothing kept" and bias the
first decisions towards lowering lambda).

Data parallelism: ``retention_stats`` averages over the batch axis; under
``jax.jit`` with globally sharded arrays that mean already covers every
replica, so nothing else is needed. Under ``shard_map``/``pmap`` pass
``axis_name`` (the data axis or axes) to ``retention_stats`` (kept is then
reduced with ``lax.psum`` over replicas) or to ``update_controller`` (kept is
``lax.pmean``-ed); the regulariser itself stays per replica because gradients
are averaged by the train step.
"""
from __future__ import annotations

from typing import Any, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from lte_jax import _checks
from lte_jax import configs as configs_lib

AxisName = str | tuple[str, ...] | None


@flax.struct.dataclass
class ControllerState:
  """Controller state, a pytree of arrays (checkpoint it with the train state).

  lam [L, H] float32: lambda per LTE layer and KV head.
  kept_ema [L, H] float32: EMA of kept tokens per sequence.
  step int32 scalar: number of ``update_controller`` calls so far.
  """
  lam: jax.Array
  kept_ema: jax.Array
  step: jax.Array


def init_controller(num_lte_layers: int, num_kv_heads: int, *,
                    lam_init: float = 1e-9) -> ControllerState:
  """lam = lam_init (1e-9, as the reference), kept_ema = 0 (replaced at step 0), step = 0."""
  _checks.check_positive_int("num_lte_layers", num_lte_layers)
  _checks.check_positive_int("num_kv_heads", num_kv_heads)
  if not lam_init >= 0:
    raise ValueError(f"lam_init must be >= 0, got {lam_init!r}")
  shape = (num_lte_layers, num_kv_heads)
  return ControllerState(lam=jnp.full(shape, lam_init, jnp.float32),
                         kept_ema=jnp.zeros(shape, jnp.float32),
                         step=jnp.zeros((), jnp.int32))


def target_for_seq_len(cfg: configs_lib.LTEConfig, seq_len: int) -> float:
  """Kept-token target for training sequences of ``seq_len``.

  target_kept x seq_len / target_seq_len (512 per 4096 tokens in the paper).
  """
  if not isinstance(cfg, configs_lib.LTEConfig):
    raise ValueError(f"cfg must be a lte_jax.configs.LTEConfig, got {type(cfg).__name__}")
  _checks.check_positive_int("seq_len", seq_len)
  return cfg.target_kept * seq_len / cfg.target_seq_len


def _stack_retention(retention: Any) -> jax.Array:
  if isinstance(retention, (list, tuple)):
    if not retention:
      raise ValueError("retention must hold at least one LTE layer's scores [B, T, H], got none")
    for i, r in enumerate(retention):
      _checks.check_rank(f"retention[{i}]", r, 3, "[batch, time, kv_heads]")
      _checks.check_shape(f"retention[{i}]", r, retention[0].shape, "[batch, time, kv_heads]")
    retention = jnp.stack(retention)
  _checks.check_rank("retention", retention, 4, "[layers, batch, time, kv_heads]")
  _checks.check_float_dtype("retention", retention)
  return retention.astype(jnp.float32)


def retention_stats(retention: Any, loss_mask: jax.Array | None = None, *,
                    exclude_last: int = 6,
                    axis_name: AxisName = None) -> tuple[jax.Array, jax.Array]:
  """Regulariser terms and kept counts per (LTE layer, KV head).

  Args:
    retention: r [L, B, T, H] or a sequence of L arrays [B, T, H] (the model's
      aux['lte_retention']).
    loss_mask: [B, T] (bool or 0/1) positions that count; None = all.
    exclude_last: trailing positions of each row left out (the scorer's
      look-ahead, LTEConfig.lookahead = 6).
    axis_name: under shard_map/pmap, the data-parallel axis name(s): the kept
      statistic is then summed over replicas before dividing.

  Returns:
    reg [L, H] f32: mean of relu(r) over the counted (batch, position) pairs
      (differentiable in r).
    kept [L, H] f32: fraction of counted positions with r > 0, times T
      (no gradient).
  """
  r = _stack_retention(retention)
  _, b, t, _ = r.shape
  _checks.check_positive_int("exclude_last", exclude_last, allow_zero=True)
  if exclude_last >= t:
    raise ValueError(f"exclude_last must be < the sequence length {t}, got {exclude_last}")
  counted = jnp.broadcast_to(jnp.arange(t) < t - exclude_last, (b, t))
  if loss_mask is not None:
    _checks.check_shape("loss_mask", loss_mask, (b, t), "[batch, time]")
    counted = counted & (loss_mask != 0)
  w = counted.astype(jnp.float32)[None, :, :, None]  # [1, B, T, 1]
  count = jnp.maximum(jnp.sum(w), 1.0)
  reg = jnp.sum(jax.nn.relu(r) * w, axis=(1, 2)) / count
  kept_num = jnp.sum((jax.lax.stop_gradient(r) > 0) * w, axis=(1, 2))
  kept_den = jnp.sum(w)
  if axis_name is not None:
    kept_num = jax.lax.psum(kept_num, axis_name)
    kept_den = jax.lax.psum(kept_den, axis_name)
  kept = kept_num / jnp.maximum(kept_den, 1.0) * t
  return reg, kept


def regularizer_loss(reg: jax.Array, lam: jax.Array) -> jax.Array:
  """Scalar mean over (layer, head) of stop_gradient(lam) * reg."""
  _checks.check_rank("reg", reg, 2, "[lte_layers, kv_heads]")
  _checks.check_shape("lam", lam, reg.shape, "[lte_layers, kv_heads]")
  return jnp.mean(jax.lax.stop_gradient(lam).astype(jnp.float32) * reg)


def update_controller(state: ControllerState, kept: jax.Array, *, target: float,
                      alpha: float = 2.0 / 17.0, interval: int = 32, up: float = 1.5,
                      down: float = 2.0, low_frac: float = 0.95, lam_min: float = 1e-9,
                      lam_max: float = 1.0, axis_name: AxisName = None) -> ControllerState:
  """One controller step (see the module docstring for the exact rule). Jit-able.

  kept [L, H]: this step's kept counts (``retention_stats``); with
  ``axis_name`` it is first averaged over replicas with ``lax.pmean``.
  """
  if not isinstance(state, ControllerState):
    raise ValueError(f"state must be a ControllerState, got {type(state).__name__}")
  _checks.check_shape("kept", kept, state.lam.shape, "[lte_layers, kv_heads]")
  if not 0.0 < alpha <= 1.0:
    raise ValueError(f"alpha must be in (0, 1], got {alpha!r}")
  _checks.check_positive_int("interval", interval)
  if not (up >= 1.0 and down >= 1.0 and 0.0 < low_frac <= 1.0 and 0.0 <= lam_min <= lam_max):
    raise ValueError("need up >= 1, down >= 1, 0 < low_frac <= 1 and 0 <= lam_min <= lam_max, "
                     f"got up={up}, down={down}, low_frac={low_frac}, lam_min={lam_min}, "
                     f"lam_max={lam_max}")
  kept = jax.lax.stop_gradient(jnp.asarray(kept, jnp.float32))
  if axis_name is not None:
    kept = jax.lax.pmean(kept, axis_name)
  ema = jnp.where(state.step == 0, kept, (1.0 - alpha) * state.kept_ema + alpha * kept)
  factor = jnp.where(ema > target, up, jnp.where(ema < low_frac * target, 1.0 / down, 1.0))
  proposed = jnp.clip(state.lam * factor, lam_min, lam_max)
  due = (state.step + 1) % interval == 0
  lam = jnp.where(due, proposed, state.lam).astype(jnp.float32)
  return ControllerState(lam=lam, kept_ema=ema, step=state.step + 1)


def controller_metrics(state: ControllerState, kept: jax.Array | None = None, *,
                       layer_ids: Sequence[int] | None = None,
                       prefix: str = "lte") -> dict[str, float]:
  """Flat dict of Python floats for logging (call outside jit).

  Keys: '{prefix}/layer{i}/lambda_h{h}', '{prefix}/layer{i}/kept_ema_h{h}',
  '{prefix}/layer{i}/kept_h{h}' (when ``kept`` is given), per-layer means
  '{prefix}/layer{i}/lambda', '.../kept_ema', '.../kept', and overall means.
  ``layer_ids`` names the layers by their index in the model (model.lte_layers);
  default 0..L-1.
  """
  lam = np.asarray(jax.device_get(state.lam), np.float64)
  ema = np.asarray(jax.device_get(state.kept_ema), np.float64)
  arrays = {"lambda": lam, "kept_ema": ema}
  if kept is not None:
    arrays["kept"] = np.asarray(jax.device_get(kept), np.float64)
  num_layers = lam.shape[0]
  layer_ids = list(range(num_layers)) if layer_ids is None else list(layer_ids)
  if len(layer_ids) != num_layers:
    raise ValueError(f"layer_ids must name {num_layers} layers, got {layer_ids!r}")
  out: dict[str, float] = {}
  for name, arr in arrays.items():
    _checks.check_shape(name, arr, lam.shape, "[lte_layers, kv_heads]")
    out[f"{prefix}/{name}"] = float(arr.mean())
    for li, layer in enumerate(layer_ids):
      out[f"{prefix}/layer{layer}/{name}"] = float(arr[li].mean())
      for h in range(arr.shape[1]):
        out[f"{prefix}/layer{layer}/{name}_h{h}"] = float(arr[li, h])
  out[f"{prefix}/controller_step"] = float(jax.device_get(state.step))
  return out
