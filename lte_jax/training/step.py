"""One optimizer update: loss, gradient accumulation, non-finite skipping, controller update.

The batch [B, T] is split into ``grad_accum`` micro-batches of B / grad_accum rows
and a ``lax.scan`` sums their gradients, so one call is one optimizer update
whatever the accumulation. Micro-batch i takes rows i, i + A, i + 2A, ... so
each device's shard of a batch-sharded input splits without communication.

Loss = cross entropy (fp32, averaged over the loss_mask tokens of the whole
batch) + the LTE sparsity regulariser sum(lambda * reg) (lte_controller),
averaged over micro-batches.

A step whose loss or gradient norm is not finite leaves the parameters and Adam
moments alone and is counted in ``TrainState.skipped``; ``nonfinite``
(optimizer.NONFINITE_MODES) says whether the learning-rate schedule and the LTE
controller wait for the next applied update ('skip_step') or advance as on any
other step ('skip_update', the reference trainer).
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import optax

from lte_jax import lte_controller
from lte_jax import sharding as sh
from lte_jax.training import optimizer
from lte_jax.training.train_state import ModelDef, TrainState

BATCH_KEYS = ("inputs", "targets", "segment_ids", "positions", "loss_mask")


def cross_entropy_sum(logits: jax.Array, targets: jax.Array, loss_mask: jax.Array) -> jax.Array:
  """Sum over masked tokens of -log p(target); logits [B, T, V], targets/loss_mask [B, T]."""
  logits = logits.astype(jnp.float32)
  nll = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
  return jnp.sum(nll * loss_mask.astype(jnp.float32))


def _split_micro(x: jax.Array, grad_accum: int) -> jax.Array:
  """[B, ...] -> [A, B / A, ...], micro-batch i = rows i, i + A, ..."""
  b = x.shape[0]
  x = x.reshape((b // grad_accum, grad_accum) + x.shape[1:])
  return jnp.swapaxes(x, 0, 1)


def check_batch(batch: dict, grad_accum: int) -> None:
  missing = [k for k in BATCH_KEYS if k not in batch]
  if missing:
    raise ValueError(f"batch is missing {missing}; a batch holds {BATCH_KEYS}")
  b = batch["inputs"].shape[0]
  if b % grad_accum:
    raise ValueError(f"batch size {b} must be divisible by optim.grad_accum={grad_accum}")


def make_train_step(model_def: ModelDef, tx: optax.GradientTransformation,
                    schedule: optax.Schedule, *, grad_accum: int = 1,
                    lte_target: float | None = None,
                    exclude_last: int | None = None, nonfinite: str = "skip_step",
                    ) -> Callable[[TrainState, dict], tuple[TrainState, dict]]:
  """``train_step(state, batch) -> (state, metrics)``; pure, ready for jax.jit.

  batch: dict of [B, T] arrays (BATCH_KEYS); metrics: scalars plus ``kept`` and
  ``lam`` [L, H] for the L LTE layers. ``lte_target`` (kept tokens per
  sequence) defaults to lte_controller.target_for_seq_len(config.lte, T);
  ``exclude_last`` (positions left out of the regulariser) to the scorer's
  look-ahead; ``nonfinite`` (OptimizerConfig.nonfinite) is what a non-finite
  step advances (module docstring).
  """
  if nonfinite not in optimizer.NONFINITE_MODES:
    raise ValueError(f"nonfinite must be one of {optimizer.NONFINITE_MODES}, got {nonfinite!r}")
  skip_update = nonfinite == "skip_update"
  num_lte = len(model_def.lte_layers)
  lte_cfg = model_def.config.lte
  exclude_last = lte_cfg.lookahead if exclude_last is None else exclude_last

  def micro_loss(params, micro, key, lam, num_tokens):
    model = model_def.bind(params, key)
    logits, aux = model(micro["inputs"], segment_ids=micro["segment_ids"],
                        positions=micro["positions"])
    ce = cross_entropy_sum(logits, micro["targets"], micro["loss_mask"]) / num_tokens
    if num_lte:
      reg, kept = lte_controller.retention_stats(aux["lte_retention"], micro["loss_mask"],
                                                 exclude_last=exclude_last)
      reg_loss = lte_controller.regularizer_loss(reg, lam)
    else:
      reg_loss, kept = jnp.zeros((), jnp.float32), jnp.zeros_like(lam)
    reg_loss = reg_loss / grad_accum
    return ce + reg_loss, (ce, reg_loss, kept)

  grad_fn = jax.grad(micro_loss, has_aux=True)

  def train_step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
    check_batch(batch, grad_accum)
    seq_len = batch["inputs"].shape[1]
    target = (lte_controller.target_for_seq_len(lte_cfg, seq_len) if lte_target is None
              else lte_target)
    rng, step_rng = jax.random.split(jax.random.wrap_key_data(state.rng))
    num_tokens = jnp.maximum(jnp.sum(batch["loss_mask"].astype(jnp.float32)), 1.0)
    micro = {k: _split_micro(batch[k], grad_accum) for k in BATCH_KEYS}
    keys = jax.random.split(step_rng, grad_accum)
    lam = state.controller.lam if num_lte else jnp.zeros((0, 1), jnp.float32)

    def body(carry, xs):
      grads, ce, reg, kept = carry
      micro_batch, key = xs
      micro_batch = {k: sh.constrain(v, (sh.BATCH, sh.LENGTH)) for k, v in micro_batch.items()}
      g, (ce_i, reg_i, kept_i) = grad_fn(state.params, micro_batch, key, lam, num_tokens)
      grads = jax.tree.map(jnp.add, grads, g)
      return (grads, ce + ce_i, reg + reg_i, kept + kept_i / grad_accum), None

    zero = jnp.zeros((), jnp.float32)
    init = (jax.tree.map(jnp.zeros_like, state.params), zero, zero, jnp.zeros_like(lam))
    (grads, ce, reg, kept), _ = jax.lax.scan(body, init, (micro, keys))
    loss = ce + reg
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(grad_norm) & jnp.isfinite(loss)

    def apply(operand):
      params, opt_state, controller = operand
      updates, opt_state = tx.update(grads, opt_state, params)
      params = optax.apply_updates(params, updates)
      if num_lte and not skip_update:
        controller = lte_controller.update_controller(controller, kept, target=target)
      return params, opt_state, controller

    def skip(operand):
      params, opt_state, controller = operand
      if skip_update:
        opt_state = optimizer.advance_schedule(opt_state)
      return params, opt_state, controller

    # A non-finite step leaves parameters and moments untouched: one bad batch must
    # not poison the Adam moments for the rest of the run.
    params, opt_state, controller = jax.lax.cond(
        finite, apply, skip, (state.params, state.opt_state, state.controller))
    if num_lte and skip_update:
      # Every step's kept counts, finite or not (a NaN score counts as not kept).
      controller = lte_controller.update_controller(controller, kept, target=target)
    new_state = state.replace(
        step=state.step + 1, params=params, opt_state=opt_state, controller=controller,
        rng=jax.random.key_data(rng), skipped=state.skipped + (~finite).astype(jnp.int32))
    # The rate this step used: the schedule's count before it (applied steps under
    # 'skip_step', every step under 'skip_update').
    count = optimizer.schedule_count(state.opt_state)
    count = state.step - state.skipped if count is None else count
    metrics = dict(loss=loss, ce_loss=ce, reg_loss=reg, grad_norm=grad_norm,
                   lr=schedule(count), skipped=~finite,
                   skipped_total=new_state.skipped, loss_tokens=num_tokens)
    if num_lte:
      metrics.update(kept=kept, lam=controller.lam)
    return new_state, metrics

  return train_step
