"""experiments/train.py: config names and files, overrides, clear errors, an end-to-end run."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from experiments import configs as config_files
from lte_jax import configs as configs_lib
from lte_jax.training import experiment
from tests import helpers

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# One training config file per architecture the model knows.
ARCH_CONFIGS = tuple(configs_lib.ARCHITECTURES)


def train(*args, timeout=240):
  # Fast compiles: these runs check plumbing, not speed.
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_backend_optimization_level=0 "
             "--xla_llvm_disable_expensive_passes=true")
  return subprocess.run([sys.executable, "-m", "experiments.train", *args], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=timeout)


def test_every_architecture_has_a_config_that_resolves():
  assert config_files.available() == sorted(ARCH_CONFIGS)
  for name in ARCH_CONFIGS:
    path = config_files.resolve(name)
    assert path == os.path.join(config_files.CONFIG_DIR, f"{name}.py")
    config = config_files.load(path)
    assert config.arch == name
    exp = experiment.resolve(config)
    assert exp.model.dtype == "bfloat16" and exp.model.param_dtype == "float32"
    assert exp.data.source == "embedded" and exp.data.seq_len == 256
    assert 100 <= exp.steps <= 1000 and exp.optim.warmup_steps < exp.steps


def test_resolve_accepts_paths_and_rejects_unknown_names():
  path = os.path.join(config_files.CONFIG_DIR, "GDN.py")
  assert config_files.resolve(path) == path
  with pytest.raises(ValueError, match=r"unknown config 'nope'.*'laLTE'"):
    config_files.resolve("nope")


def test_command_line_names_are_resolved_and_override_fields_checked():
  argv = config_files.resolve_command_line(
      ["train", "--config", "GDN", "--config.optim.learning_rate=1e-3", "--noconfig.log.progress"])
  assert argv == ["train", f"--config={os.path.join(config_files.CONFIG_DIR, 'GDN.py')}",
                  "--config.optim.learning_rate=1e-3", "--noconfig.log.progress"]
  with pytest.raises(ValueError, match=r"config.model has no field 'layers'.*'num_layers'"):
    config_files.resolve_command_line(["train", "--config=GDN", "--config.model.layers=3"])
  with pytest.raises(ValueError, match=r"config.steps has no field 'x'"):
    config_files.resolve_command_line(["train", "--config=GDN", "--config.steps.x=3"])


def test_model_overrides_reach_the_model_config():
  from experiments.configs.laLTE import get_config
  config = get_config()
  config.model.num_layers = 6
  config.model.lte_dropout = 0.0
  config.model.lte_scorer_dtype = "bfloat16"
  config.model.implementation = "reference"
  config.model.gdn_plan_options = "keep_states=True"
  config.size = "tiny"
  exp = experiment.resolve(config)
  assert exp.model.gdn.plan_options == "keep_states=True"
  assert exp.model.layers == ("gdn", "lte") * 3
  assert exp.model.lte.dropout == 0.0
  assert exp.model.lte.scorer_dtype == "bfloat16"
  assert {exp.model.gdn.implementation, exp.model.lte.implementation,
          exp.model.attn.implementation} == {"reference"}
  assert exp.data.model_vocab_size == exp.model.vocab_size


def test_resolve_rejects_bad_values_with_the_field_name():
  from experiments.configs.laLTE import get_config
  config = get_config()
  config.data.batch_size = 6
  config.optim.grad_accum = 4
  with pytest.raises(ValueError, match="divisible by config.optim.grad_accum=4"):
    experiment.resolve(config)
  config = get_config()
  config.steps = config.optim.warmup_steps = 300
  with pytest.raises(ValueError, match="warmup_steps"):
    experiment.resolve(config)


def test_help_documents_every_flag():
  proc = train("--help")
  assert proc.returncode in (0, 1)  # absl's --help exits with 1
  out = proc.stdout + proc.stderr
  for flag in ("--config", "--workdir", "--distributed"):
    assert flag in out
  for name in ARCH_CONFIGS:
    assert name in out
  for field in ("steps=", "size=", "optim.learning_rate=", "mesh.fsdp=", "checkpoint.every="):
    assert field in out


@pytest.mark.parametrize("args,message", [
    (["--config=nope"], "unknown config 'nope'"),
    (["--config=laLTE", "--config.optim.lrr=1"], "unknown config field 'optim.lrr'"),
    (["--config=laLTE", "--config.size=7B"], "size must be one of ('tiny', '0.4B', '1.4B')"),
])
def test_bad_command_lines_fail_with_a_clear_message(args, message):
  proc = train(*args)
  assert proc.returncode != 0
  assert message in proc.stderr, proc.stderr[-2000:]
  if "lrr" in message:
    assert "learning_rate" in proc.stderr  # lists the valid fields
  if "nope" in message:
    assert "laLTE" in proc.stderr and "transformer" in proc.stderr


def test_end_to_end_run_writes_config_metrics_events_and_checkpoints(tmp_path):
  workdir = tmp_path / "run"
  # The shared tiny run (its compiled step is cached), its config named by path.
  config = os.path.join(REPO, "experiments", "configs", "laLTE.py")
  proc = subprocess.run(
      [sys.executable, "-m", "experiments.train", f"--config={config}", f"--workdir={workdir}",
       *helpers.TINY_TRAIN[1:], "--config.log.every=4", "--config.checkpoint.every=4",
       "--config.checkpoint.keep=2", "--config.log.tensorboard=True"],
      cwd=REPO, env=helpers.fast_env(), capture_output=True, text=True, timeout=240)
  assert proc.returncode == 0, proc.stderr[-3000:]
  steps = helpers.TINY_STEPS
  assert "run summary" in proc.stdout and f"0 -> {steps}" in proc.stdout
  resolved = json.loads((workdir / "config.json").read_text())
  assert resolved["config"]["steps"] == steps and resolved["model"]["layers"] == ["gdn", "lte"]
  assert resolved["optim"]["eps"] == 1e-15
  records = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in records] == list(range(4, steps + 1, 4))
  for key in ("loss", "ce_loss", "reg_loss", "lr", "grad_norm", "tokens_per_s", "skipped_total",
              "lte/kept/layer1", "lte/lam/layer1"):
    assert key in records[-1], key
  assert len(records[-1]["kept"]) == 1 and len(records[-1]["kept"][0]) == 2
  assert any(f.startswith("events.out.tfevents") for f in os.listdir(workdir / "tensorboard"))
  # checkpoint.keep=2: the two newest steps, and their checksums beside them.
  assert sorted(os.listdir(workdir / "checkpoints")) == [str(steps - 4), str(steps), "checksums"]
