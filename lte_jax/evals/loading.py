"""Load a trained model for evaluation from a workdir written by experiments.train.

The workdir holds ``config.json`` (the run's ConfigDict under "config" and the
resolved dataclass configs) and ``checkpoints/<step>/state`` (the orbax
TrainState). The state is restored whole, because orbax restores against the
saved tree, and only the parameters are kept.
"""
from __future__ import annotations

import dataclasses
import json
import os

import jax
import ml_collections
import orbax.checkpoint as ocp

from lte_jax.data import DataConfig
from lte_jax.models import HybridLM
from lte_jax.training import experiment, optimizer, train_state


@dataclasses.dataclass(frozen=True)
class LoadedRun:
  model: HybridLM          # in eval mode, LTE budget enforced
  data: DataConfig         # the run's data config (tokenizer, MQAR vocab)
  step: int
  checkpoint: str          # the step directory restored


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
  newest checkpoint under ``workdir``; the config comes from ``workdir`` (default:
  two levels above a step directory)."""
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
  step = steps[-1] if step is None else step
  if step not in steps:
    raise ValueError(f"checkpoint step {step} is not in {directory} (steps: {steps})")
  model_def = train_state.make_model_def(exp.model, train=False)
  tx, _ = optimizer.make_optimizer(exp.optim, exp.steps)
  abstract = jax.eval_shape(lambda: train_state.init_train_state(model_def, tx, exp.seed))
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
                          abstract)
  restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))
  manager.close()
  model = model_def.bind(restored["state"].params, jax.random.key(0))
  model.eval()
  model.set_attributes(enforce_budget=True, raise_if_not_found=False)
  return LoadedRun(model=model, data=exp.data, step=int(step),
                   checkpoint=os.path.join(directory, str(step)))
