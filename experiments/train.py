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

import jax
import ml_collections
from absl import app, flags, logging
from ml_collections import config_flags

from experiments import cli
from experiments import configs as config_files
from experiments.configs.base import get_base_config
from lte_jax import configs as configs_lib
from experiments.training_loop import train, write_config
from lte_jax import data as data_lib
from lte_jax.training import checkpoint, experiment, mesh as mesh_lib
from lte_jax.training import optimizer, recipes


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
    "config.data.niah_loss": data_lib.NIAH_LOSSES,
    "config.data.bad_records": data_lib.BAD_RECORD_POLICIES,
    "config.model.remat": configs_lib.REMAT_POLICIES,
    "config.model.init": configs_lib.INIT_SCHEMES,
    "config.model.from_file": "a ModelConfig JSON, e.g. WORKDIR/converted_model.json of "
                              "experiments.convert (instead of arch / size)",
    "config.optim.weight_decay_mask": optimizer.WEIGHT_DECAY_MASKS,
    "config.optim.nonfinite": optimizer.NONFINITE_MODES,
    "--distributed": mesh_lib.DISTRIBUTED_MODES,
})


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
      write_config(self.config, self.path)
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
