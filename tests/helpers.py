"""Shared test helpers: error metrics, packed-batch generators, simulated-device runs, and
the one tiny training run the command-line tests share."""
from __future__ import annotations

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_on_simulated_devices(code: str, devices: int = 4) -> None:
  """Run ``code`` in a fresh Python on ``devices`` simulated CPU devices; it must print OK.

  A subprocess because the device count is fixed when JAX starts.
  """
  env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
             JAX_PLATFORMS="cpu")
  result = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
  assert result.returncode == 0 and "OK" in result.stdout, result.stderr[-3000:]


def sds(*shape, dtype=jnp.bfloat16) -> jax.ShapeDtypeStruct:
  """Abstract argument for lowering tests."""
  return jax.ShapeDtypeStruct(shape, dtype)


def rel_rms(got, want, atol=1e-5):
  """RMS error relative to the RMS of ``want``; ``atol`` covers references that are exactly 0."""
  got = np.asarray(got, np.float64)
  want = np.asarray(want, np.float64)
  return float(np.sqrt(np.mean((got - want) ** 2)) / (np.sqrt(np.mean(want ** 2)) + atol))


def packed_segment_ids(rng, batch, time, *, lengths=(1, 1, 2, 5, 17, 40), padding=3,
                       pad_if_longer_than=8):
  """[batch, time] int32 ids of documents with lengths drawn from ``lengths`` (1-token ones
  included) and a padding tail of ``padding`` tokens (id 0) on rows longer than
  ``pad_if_longer_than``."""
  rows = []
  for _ in range(batch):
    ids, doc = [], 1
    while len(ids) < time:
      ids += [doc] * int(rng.choice(lengths))
      doc += 1
    ids = ids[:time]
    if padding and time > pad_if_longer_than:
      ids[-padding:] = [0] * padding
    rows.append(ids)
  return np.asarray(rows, np.int32)


def save_checkpoints(directory, state_at, data, steps=(1, 2), keep=3) -> dict:
  """Save state_at(s) after s batches of a training iterator over `data` (a DataConfig);
  returns the iterator position of each saved step."""
  from lte_jax.data import make_train_iterator  # pylint: disable=g-import-not-at-top
  from lte_jax.training import checkpoint  # pylint: disable=g-import-not-at-top
  ckpt = checkpoint.Checkpointer(directory, every=1, keep=keep)
  it = make_train_iterator(data)
  positions = {}
  for s in range(1, max(steps) + 1):
    next(it)
    if s in steps:
      assert ckpt.save(s, state_at(s), it)
      positions[s] = it.get_state()
  ckpt.close()
  return positions


# One tiny laLTE run for the command-line tests (resume, eval, train CLI, bad data): the
# same model, batch and schedule everywhere, so after the first run each later one reads
# its compiled train step from the suite's persistent compilation cache. Flags that only
# change what is logged, saved or read (log.every, checkpoint.*, data.source) may differ.
TINY_STEPS = 16
TINY_TRAIN = ("--config=laLTE", f"--config.steps={TINY_STEPS}", "--config.model.num_layers=2",
              "--config.model.d_model=64", "--config.model.intermediate_size=128",
              "--config.data.seq_len=32", "--config.data.batch_size=2",
              "--config.optim.warmup_steps=2", "--config.eval.every=0",
              "--config.log.progress=False", "--config.log.tensorboard=False")
# Fast compiles: these runs check plumbing, not speed; every run compiles under them, so
# runs are bitwise comparable and share compilations.
FAST_XLA_ENV = dict(JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_backend_optimization_level=0 "
                    "--xla_llvm_disable_expensive_passes=true")


def fast_env() -> dict:
  return dict(os.environ, **FAST_XLA_ENV)


def train_command(workdir, *extra) -> list[str]:
  """experiments.train on the tiny run into ``workdir``; ``extra`` flags override."""
  return [sys.executable, "-m", "experiments.train", f"--workdir={workdir}", *TINY_TRAIN, *extra]


def run_module(module, *args, timeout=240) -> subprocess.CompletedProcess:
  """``python -m module args`` in the repository under fast compiles."""
  return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, env=fast_env(),
                        capture_output=True, text=True, timeout=timeout)


def train_tiny(workdir, *extra, timeout=240) -> subprocess.CompletedProcess:
  """The tiny run into ``workdir`` (``extra`` flags override); asserts it succeeded."""
  done = subprocess.run(train_command(workdir, *extra), cwd=REPO, env=fast_env(),
                        capture_output=True, text=True, timeout=timeout)
  assert done.returncode == 0, done.stderr[-3000:]
  return done


TINY_RUN_FLAGS = ("--config.log.every=1", "--config.checkpoint.every=4")
_TINY_RUN = {}  # this process's finished tiny run: its workdir


def tiny_run(tmp_path_factory) -> str:
  """The workdir of one finished tiny run (TINY_RUN_FLAGS: every step logged, saved every 4),
  trained once per process; tests read it and write nothing into it. Tests that use it share
  one xdist group, so the suite trains it once."""
  if "workdir" not in _TINY_RUN:
    path = str(tmp_path_factory.mktemp("tiny_run"))
    train_tiny(path, *TINY_RUN_FLAGS)
    _TINY_RUN["workdir"] = path
  return _TINY_RUN["workdir"]


def attention_hf_and_workdir(tmp) -> tuple[str, str]:
  """(Hugging Face directory, workdir converted from it) of the cheapest model to compile:
  one softmax-attention layer, vocab 300 (the byte tokenizer's 259 ids fit), 256 positions,
  random weights; written under ``tmp`` (a pathlib folder)."""
  from experiments import configs as config_files  # pylint: disable=g-import-not-at-top
  from experiments import convert as convert_cli  # pylint: disable=g-import-not-at-top
  from tests import test_convert as synthetic  # pylint: disable=g-import-not-at-top
  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(synthetic, "VOCAB", 300)
    attn = dict(layers=[0], num_heads=2, num_kv_heads=1, qkv_bias=False, window_size=None,
                rope_theta=10000.0)
    cfg = synthetic.gdn_config(num_hidden_layers=1, attn=attn, vocab_size=300)
    hf_dir = synthetic.save(tmp, cfg, synthetic.hf_tensors(cfg, np.random.default_rng(0)))
  config = config_files.load(config_files.resolve("transformer"))
  config.data.seq_len, config.data.batch_size = 16, 2
  config.steps, config.optim.warmup_steps = 2, 1
  config.model.dtype = "float32"
  workdir = str(tmp / "wd")
  convert_cli.convert_to_workdir(hf_dir, workdir, config)
  return hf_dir, workdir


def lalte_convert_config():
  """The laLTE training config that experiments.convert's tests give a converted workdir."""
  from experiments import configs as config_files  # pylint: disable=g-import-not-at-top
  config = config_files.load(config_files.resolve("laLTE"))
  config.data.seq_len, config.data.batch_size = 16, 2
  config.steps, config.optim.warmup_steps = 4, 1
  return config
