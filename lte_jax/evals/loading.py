"""Load a trained model for evaluation from a workdir written by experiments.train.

The workdir holds ``config.json`` (the run's ConfigDict under "config" and the
resolved dataclass configs) and ``checkpoints/<step>/state`` (the orbax
TrainState). The state is restored whole, because orbax restores against the
saved tree, and only the parameters are kept. It is checked against the
checksums saved with it (``lte_jax.training.integrity``): a newest step that is
unreadable or altered is skipped with a warning for the one before it (left in
place: a running training job owns the directory); a step asked for by name is
not replaced.
"""
from __future__ import annotations

import dataclasses
import json
import os

import jax
import ml_collections
import orbax.checkpoint as ocp
from absl import logging

from lte_jax.data import DataConfig
from lte_jax.models import HybridLM
from lte_jax.training import checkpoint as checkpoint_lib
from lte_jax.training import experiment, optimizer, train_state


@dataclasses.dataclass(frozen=True)
class LoadedRun:
  model: HybridLM          # in eval mode, LTE budget enforced
  data: DataConfig         # the run's data config (tokenizer, MQAR vocab)
  step: int
  checkpoint: str          # the step directory restored
  # lte_controller.ControllerState of the restored state (LTE lambdas, kept counts);
  # None for models without LTE layers
  controller: object = None


def read_run_config(workdir: str) -> ml_collections.ConfigDict:
  path = os.path.join(workdir, "config.json")
  if not os.path.isfile(path):
    raise ValueError(f"workdir must hold config.json written by experiments.train; "
                     f"{path} does not exist")
  with open(path) as f:
    return ml_collections.ConfigDict(json.load(f)["config"])


def _checkpoint_dir_and_step(workdir: str | None, checkpoint: str | None) -> tuple[str, int | None]:
  """(orbax manager directory, step or None for the newest)."""
  if checkpoint:
    path = os.path.abspath(os.path.expanduser(checkpoint))
    name = os.path.basename(path)
    if name.isdigit():  # a step directory: checkpoints/<step>
      return os.path.dirname(path), int(name)
    return path, None
  return os.path.join(workdir, "checkpoints"), None


def load_run(workdir: str | None, checkpoint: str | None = None) -> LoadedRun:
  """The model of ``checkpoint`` (a step directory or a checkpoints/ folder) or of the
  newest good checkpoint under ``workdir``; the config comes from ``workdir`` (default:
  two levels above a step directory). ValueError, in one line, when no candidate step
  reads intact."""
  if not workdir and not checkpoint:
    raise ValueError("workdir or checkpoint must be given")
  directory, step = _checkpoint_dir_and_step(workdir, checkpoint)
  if not workdir:
    workdir = os.path.dirname(directory)
  config = read_run_config(workdir)
  exp = experiment.resolve(config)
  if not os.path.isdir(directory):
    raise ValueError(f"checkpoint directory {directory} does not exist")
  manager = ocp.CheckpointManager(directory, item_names=("state", "data"))
  steps = sorted(manager.all_steps())
  if not steps:
    raise ValueError(f"checkpoint directory {directory} holds no checkpoint")
  if step is not None and step not in steps:
    raise ValueError(f"checkpoint step {step} is not in {directory} (steps: {steps})")
  model_def = train_state.make_model_def(exp.model, train=False)
  tx, _ = optimizer.make_optimizer(exp.optim, exp.steps)
  abstract = jax.eval_shape(lambda: train_state.init_train_state(model_def, tx, exp.seed))
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
                          abstract)
  step, state = _restore_good(manager, directory, steps if step is None else [step], abstract)
  model = model_def.bind(state.params, jax.random.key(0))
  model.eval()
  model.set_attributes(enforce_budget=True, raise_if_not_found=False)
  return LoadedRun(model=model, data=exp.data, step=int(step),
                   checkpoint=os.path.join(directory, str(step)), controller=state.controller)


def _restore_good(manager: ocp.CheckpointManager, directory: str, steps: list[int],
                  abstract) -> tuple[int, object]:
  """(step, TrainState) of the newest of ``steps`` that reads and matches its checksums."""
  rejected = []

  def restore(step: int):
    return manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract)))["state"]

  def reject(step: int, why: str) -> None:
    rejected.append(f"step {step} {why}")
    if len(steps) > 1:
      logging.warning("checkpoint %s %s; trying the previous one",
                      os.path.join(directory, str(step)), why)

  try:
    found = checkpoint_lib.newest_good(directory, steps, restore, reject)
  finally:
    manager.close()
  if found is None:
    raise ValueError(f"no readable checkpoint in {directory}: {'; '.join(rejected)}")
  return found
