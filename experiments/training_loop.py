"""The training loop of experiments.train, importable without its command-line flags.

``train(config, workdir)`` runs or resumes one run to ``config.steps`` (checkpoints,
metrics, validation, preemption and crash saves); ``write_config`` writes the run's
config.json. experiments.train wraps them in its flags; other drivers (e.g.
experiments.reproduce) call them directly.
"""
from __future__ import annotations

import os
from typing import Callable

import jax
import ml_collections
from absl import logging

from lte_jax import data as data_lib
from lte_jax.training import checkpoint, evaluation, experiment, mesh as mesh_lib
from lte_jax.training import metrics as metrics_lib
from lte_jax.training import optimizer, recipes, step as step_lib, train_state
from lte_jax.training.train_state import TrainState


def train(config: ml_collections.ConfigDict, workdir: str, *,
          allow_fresh_start: bool = False,
          prepare_workdir: Callable[[], None] | None = None) -> TrainState:
  """Run (or resume) training to ``config.steps``; returns the final train state.

  ``prepare_workdir`` runs once the data and validation sources are open and before
  anything is written to ``workdir`` (experiments.train: create it, write config.json),
  so a config whose data cannot be read leaves nothing behind. A workdir already at
  ``config.steps`` says so and returns its state. Raises checkpoint.UnreadableCheckpoints
  when the workdir holds checkpoints but none is good, unless ``allow_fresh_start``.
  """
  config = recipes.apply(config)
  exp = experiment.resolve(config)
  mesh = mesh_lib.make_mesh(**config.mesh)
  model_def = train_state.make_model_def(exp.model)
  tx, schedule = optimizer.make_optimizer(exp.optim, exp.steps)
  init = lambda: train_state.init_train_state(model_def, tx, exp.seed)
  abstract = jax.eval_shape(init)
  shardings = mesh_lib.state_shardings(model_def, tx, abstract, mesh)
  batch_sharding = mesh_lib.batch_sharding(mesh)
  data_iter = data_lib.make_train_iterator(exp.data, process_index=jax.process_index(),
                                           process_count=jax.process_count(),
                                           split=evaluation.train_split(exp.eval, exp.data))
  evaluator = evaluation.Evaluator(exp, shardings.params, batch_sharding,
                                   process_index=jax.process_index(),
                                   process_count=jax.process_count())
  if prepare_workdir is not None:
    prepare_workdir()
  ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"), **config.checkpoint)
  num_params = train_state.num_params(model_def)
  logging.info("%s: %.2fM parameters, mesh %s, %d x %s", experiment.describe_model(config),
               num_params / 1e6, mesh_lib.describe(mesh), jax.device_count(),
               jax.devices()[0].device_kind)

  with jax.set_mesh(mesh):
    state = _restore(ckpt, mesh_lib.with_shardings(abstract, shardings), data_iter,
                     allow_fresh_start)
    if state is None:
      state = train_state.create_train_state(model_def, tx, exp.seed, shardings)
    if int(state.step) >= exp.steps:  # a finished run: no step, summary or save to make
      ckpt.close()
      if jax.process_index() == 0:
        print(f"{workdir} is already at step {int(state.step)} (config.steps={exp.steps}): "
              "nothing to do; raise --config.steps to train further", flush=True)
      return state
    step_fn = jax.jit(step_lib.make_train_step(model_def, tx, schedule, grad_accum=exp.grad_accum,
                                               nonfinite=exp.optim.nonfinite),
                      in_shardings=(shardings, batch_sharding), out_shardings=(shardings, None),
                      donate_argnums=0)
    start = step = int(state.step)
    peak = metrics_lib.peak_flops(jax.devices()[0])
    log = metrics_lib.TrainLogger(
        workdir, total_steps=exp.steps, start_step=start, log_every=config.log.every,
        tokens_per_step=exp.data.batch_size * exp.data.seq_len, lte_layers=model_def.lte_layers,
        flops_per_token=metrics_lib.flops_per_token(exp.model, num_params, exp.data.seq_len),
        peak_flops=peak * jax.device_count() if peak else None,
        progress=config.log.progress, tensorboard=config.log.tensorboard,
        bad_records=data_iter.bad_records)
    guard = checkpoint.PreemptionGuard().install()
    # The last completed step, and the data position before the batch after it (None
    # once the iterator's own position matches the state again).
    done, position = start, None
    try:
      for step in range(start + 1, exp.steps + 1):
        position = data_iter.get_state()
        batch = next(data_iter, None)
        if batch is None:
          logging.warning("the data ran out after step %d", step - 1)
          step -= 1
          break
        state, metrics = step_fn(state, mesh_lib.global_batch(batch, batch_sharding))
        done, position = step, None
        log.step_done(step, state, metrics, evaluator.run_if_due(step, state.params))
        ckpt.save(step, state, data_iter)
        if guard.should_stop():
          logging.warning("stopping at step %d on %s", step, guard.received or "a signal")
          break
      log.stop_clock()
      ckpt.save(step, state, data_iter, force=True)
    except Exception as err:
      _save_after_error(ckpt, done, start, state, data_iter, position, err)
      raise
    finally:
      log.close()
      ckpt.close()
      guard.uninstall()
  if jax.process_index() == 0:
    print(log.summary(step, skipped=int(state.skipped), checkpoints=ckpt.saved_steps,
                      workdir=workdir), flush=True)
  return state


def _restore(ckpt: checkpoint.Checkpointer, abstract, data_iter,
             allow_fresh_start: bool) -> TrainState | None:
  """The newest good checkpoint's state; None to start at step 0."""
  try:
    return ckpt.restore_latest(abstract, data_iter)
  except checkpoint.UnreadableCheckpoints as err:
    if not allow_fresh_start:
      ckpt.close()
      raise
    logging.warning("%s; training again from step 0 (--allow_fresh_start)", err)
    return None


def _save_after_error(ckpt: checkpoint.Checkpointer, step: int, start: int, state, data_iter,
                      position, err: Exception) -> None:
  """Save the last completed ``step`` before ``err`` propagates, so a resume after the
  fix loses nothing; ``position``: the data position that goes with it, if not current."""
  what = f"{type(err).__name__}: {err}"
  if step == start:
    logging.error("training stopped by %s before completing a step; nothing new to save", what)
    return
  if jax.process_count() > 1:  # orbax saves are collective: the others may never join
    logging.error("training stopped by %s after step %d; not saving (a multi-process run "
                  "saves only at its checkpoint steps)", what, step)
    return
  if any(isinstance(x, jax.Array) and x.is_deleted() for x in jax.tree.leaves(state)):
    logging.error("training stopped by %s; the state of step %d went to the failed step "
                  "(donated) and cannot be saved: resume from the newest checkpoint", what, step)
    return
  try:
    if position is not None:
      data_iter.set_state(position)
    ckpt.save(step, state, data_iter, force=True)
    ckpt.wait()
  except Exception as save_err:  # the original error matters more; report both
    logging.error("training stopped by %s; saving step %d failed too: %s", what, step,
                  save_err)
    return
  logging.error("training stopped by %s; saved checkpoint %s first (resume: rerun the same "
                "command)", what, ckpt.directory / str(step))


def write_config(config: ml_collections.ConfigDict, workdir: str) -> None:
  text = experiment.to_json(config, experiment.resolve(config))
  path = os.path.join(workdir, "config.json")
  if os.path.exists(path):
    with open(path) as f:
      if f.read() != text:
        logging.warning("%s differs from this run's config; overwriting it", path)
  with open(path, "w") as f:
    f.write(text)
