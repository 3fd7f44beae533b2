r"""Train a hybrid LM.

    python -m experiments.train --config=laLTE --workdir=/tmp/lalte \
        --config.steps=500 --config.data.batch_size=16

``--config`` is a config name (experiments/configs/<name>.py) or a config file;
``--config.<field>=<value>`` overrides any field (see experiments/configs/base.py).
The workdir gets config.json, metrics.jsonl, tensorboard/ and checkpoints/; a
run started on a workdir with checkpoints resumes from the newest one that reads
intact (lte_jax/training/checkpoint.py). With checkpoints present but none
readable the run stops with an error unless --allow_fresh_start is given.
SIGTERM or SIGINT (Ctrl-C) saves a checkpoint and exits; an exception in the
loop (a data error, a bug) saves the last completed step, then propagates.
The workdir is created once the data and validation sources are open: a source
that cannot be read stops the run with one line and leaves no workdir behind (nor
does a data error before the first checkpoint). A workdir already at
config.steps says so and exits.
"""
from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
from typing import Callable

import jax
import ml_collections
from absl import app, flags, logging
from ml_collections import config_flags

from experiments import cli
from experiments import configs as config_files
from experiments.configs.base import get_base_config
from lte_jax import configs as configs_lib
from lte_jax import data as data_lib
from lte_jax.training import checkpoint, evaluation, experiment, mesh as mesh_lib
from lte_jax.training import metrics as metrics_lib
from lte_jax.training import optimizer, recipes, step as step_lib, train_state
from lte_jax.training.train_state import TrainState


def _fields(config: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
  out = []
  for key, value in config.items():
    if isinstance(value, ml_collections.ConfigDict):
      out += _fields(value, f"{prefix}{key}.")
    else:
      out.append(f"{prefix}{key}={value!r}")
  return out


_CONFIG = config_flags.DEFINE_config_file(
    "config", None,
    f"Training config: one of {config_files.available()} (experiments/configs/<name>.py) or a "
    "path to a config file with get_config(). Override any field with "
    "--config.<field>=<value>. --config.recipe=paper takes the paper's training recipe "
    "for every field left unset (lte_jax.training.recipes; README 'Training recipes'). "
    "Fields and their defaults (the 'default' recipe): "
    + ", ".join(_fields(recipes.apply(get_base_config()))) + ". " + data_lib.BAD_RECORDS_HELP
    + " " + data_lib.DOCUMENTS_HELP,
    lock_config=True)
_WORKDIR = flags.DEFINE_string(
    "workdir", None,
    "Directory for checkpoints/, metrics.jsonl, tensorboard/ and config.json. A workdir with "
    "checkpoints resumes from the newest one. Default: a fresh folder under "
    f"{tempfile.gettempdir()}/lte_jax_runs.")
_ALLOW_FRESH_START = flags.DEFINE_bool(
    "allow_fresh_start", False,
    "When WORKDIR/checkpoints holds checkpoints but none reads intact (all unreadable or "
    "failing their checksums; they are kept as checkpoints/corrupt_step_<n>), train again "
    "from step 0 instead of stopping with an error. metrics.jsonl is then rewritten from "
    "step 1.")
_DISTRIBUTED = flags.DEFINE_enum(
    "distributed", "auto", mesh_lib.DISTRIBUTED_MODES,
    "Call jax.distributed.initialize() for multi-host training: 'on', 'off', or 'auto' "
    "(when a coordinator address or a SLURM / Open MPI launch with several tasks is found).")


ALLOWED = cli.allowed_values({
    "--config": [*config_files.available(), "PATH to a config file"],
    "config.arch": configs_lib.ARCHITECTURES,
    "config.size": configs_lib.SIZES,
    "config.recipe": tuple(recipes.RECIPES),
    "config.data.source": data_lib.SOURCE_KINDS,
    "config.data.tokenizer": "'byte' or a path to a tokenizer.json / SentencePiece .model",
    "config.data.mixture": data_lib.MIXTURE_NAMES,
    "config.data.niah_tasks": tuple(data_lib.NIAH_TASKS),
    "config.data.bad_records": data_lib.BAD_RECORD_POLICIES,
    "config.model.remat": configs_lib.REMAT_POLICIES,
    "config.model.init": configs_lib.INIT_SCHEMES,
    "config.model.from_file": "a ModelConfig JSON, e.g. WORKDIR/converted_model.json of "
                              "experiments.convert (instead of arch / size)",
    "config.optim.weight_decay_mask": optimizer.WEIGHT_DECAY_MASKS,
    "config.optim.nonfinite": optimizer.NONFINITE_MODES,
    "--distributed": mesh_lib.DISTRIBUTED_MODES,
})


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


def _write_config(config: ml_collections.ConfigDict, workdir: str) -> None:
  text = experiment.to_json(config, experiment.resolve(config))
  path = os.path.join(workdir, "config.json")
  if os.path.exists(path):
    with open(path) as f:
      if f.read() != text:
        logging.warning("%s differs from this run's config; overwriting it", path)
  with open(path, "w") as f:
    f.write(text)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  checkpoint.quiet_orbax_logs()
  mesh_lib.maybe_initialize_distributed(_DISTRIBUTED.value)
  try:
    config = recipes.apply(_CONFIG.value)
    experiment.resolve(config)
    mesh_lib.mesh_shape(**config.mesh, num_devices=jax.device_count())
  except ValueError as err:
    sys.exit(f"invalid config: {err}")
  workdir = _WORKDIR.value or os.path.join(
      tempfile.gettempdir(), "lte_jax_runs",
      f"{config.arch}-{config.size}-{time.strftime('%Y%m%d-%H%M%S')}")
  run_dir = _RunDir(workdir, config)
  try:
    train(config, workdir, allow_fresh_start=_ALLOW_FRESH_START.value,
          prepare_workdir=run_dir.prepare)
  except checkpoint.UnreadableCheckpoints as err:
    sys.exit(f"cannot resume: {err}. Fix or remove them, or pass --allow_fresh_start to train "
             "again from step 0 (metrics.jsonl is then rewritten from step 1).")
  except ValueError as err:  # the data or validation source, before or during the run
    if run_dir.prepared and not isinstance(err, data_lib.DataError):
      raise  # raised by the run itself: keep the traceback
    run_dir.remove_if_unused()
    what = "data error" if isinstance(err, data_lib.DataError) else "cannot start training"
    sys.exit(f"{what}: {err}")


class _RunDir:
  """The workdir, created (with config.json) only once the data is open; what this run
  created in it is taken back when it stops before saving any checkpoint."""

  def __init__(self, path: str, config: ml_collections.ConfigDict):
    self.path, self.config = path, config
    self.prepared, self.existed, self.before = False, True, set()

  def prepare(self) -> None:
    self.prepared = True
    if jax.process_index() == 0:
      self.existed = os.path.isdir(self.path)
      self.before = set(os.listdir(self.path)) if self.existed else set()
      os.makedirs(self.path, exist_ok=True)
      _write_config(self.config, self.path)
    logging.info("workdir %s", self.path)

  def remove_if_unused(self) -> None:
    if not self.prepared or jax.process_index() != 0:
      return
    ckpt_dir = os.path.join(self.path, "checkpoints")
    if "checkpoints" in self.before or (os.path.isdir(ckpt_dir) and os.listdir(ckpt_dir)):
      return  # a run with checkpoints: everything in it is worth keeping
    if not self.existed:
      shutil.rmtree(self.path, ignore_errors=True)
      return
    for name in set(os.listdir(self.path)) - self.before:
      path = os.path.join(self.path, name)
      if os.path.isdir(path):
        shutil.rmtree(path, ignore_errors=True)
      else:
        os.remove(path)


def parse_flags(argv: list[str]) -> list[str]:
  """Resolve ``--config=NAME`` to its file and check ``--config.*`` names, then parse."""
  cli.exit_on_help(argv, __doc__, __name__, ALLOWED)
  try:
    cli.check_config_overrides(argv, config_files.available())
    argv = config_files.resolve_command_line(argv)
  except ValueError as err:
    sys.exit(f"FATAL Flags parsing error: {err}")
  return app.parse_flags_with_usage(argv)  # exits with a message on a bad flag


if __name__ == "__main__":
  flags.mark_flag_as_required("config")
  app.run(main, flags_parser=parse_flags)
