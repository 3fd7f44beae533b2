"""Checkpoints that parse but hold altered data, rotation, and the train loop's safe exits.

Altered files are caught by the per-array checksums saved with each step and the
previous step is used; with none good, training stops with an error (unless
allowed to start again) and evaluation says so in one line. SIGINT saves like
SIGTERM; an exception in the loop saves the last completed step first.
"""
from __future__ import annotations

import functools
import importlib.util
import json
import logging
import os
import signal
import subprocess
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl import flags

from experiments import configs as config_files
from experiments import training_loop
from lte_jax.data import DataConfig, make_train_iterator
from lte_jax.evals import loading
from lte_jax.training import checkpoint, experiment, integrity, optimizer, train_state
from tests import helpers

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = DataConfig(seq_len=16, batch_size=2, model_vocab_size=512)
# 16 KB of random finite float32 bits: incompressible, so stored as a raw zstd block,
# where altered bytes still parse (as they do in real checkpoints' noisy weights).
BITS = np.random.default_rng(0).integers(0, 2**32, (64, 64), dtype=np.uint32)
BITS[(BITS >> 23 & 0xFF) == 0xFF] ^= 1 << 23  # no inf / NaN


def w_at(step: int) -> np.ndarray:
  return (BITS ^ np.uint32(step)).view(np.float32)


def state_at(step: int) -> dict:
  return {"params": {"w": jnp.asarray(w_at(step)), "b": jnp.full((8,), step, jnp.float32)},
          "step": jnp.asarray(step, jnp.int32)}


def abstract() -> dict:
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state_at(0))


def save_steps(directory, steps=(1, 2), keep=3):
  """Save state_at(s) after s batches; returns the iterator position of each step."""
  return helpers.save_checkpoints(directory, state_at, DATA, steps, keep)


def largest_file(step_dir) -> str:
  files = [os.path.join(root, name) for root, _, names in os.walk(os.path.join(step_dir, "state"))
           for name in names]
  return max(files, key=os.path.getsize)


def flip_byte(step_dir) -> None:
  """One flipped byte in the middle of the largest stored array's file: still parses."""
  path = largest_file(step_dir)
  data = bytearray(open(path, "rb").read())
  data[len(data) // 2] ^= 0xFF
  open(path, "wb").write(bytes(data))


def garbage_4kb(step_dir, garbage: bytes | None = None) -> None:
  """4 KB of random bytes over the largest stored array's file: restores as garbage."""
  path = largest_file(step_dir)
  data = bytearray(open(path, "rb").read())
  at = len(data) // 4
  data[at:at + 4096] = np.random.default_rng(1).bytes(4096) if garbage is None else garbage
  open(path, "wb").write(bytes(data))


def messages(caplog) -> list[str]:
  return [r.getMessage() for r in caplog.records]


@pytest.mark.parametrize("alter", [flip_byte, garbage_4kb], ids=["flip", "garbage"])
def test_altered_parameter_file_falls_back_to_the_previous_step(tmp_path, caplog, alter):
  positions = save_steps(tmp_path / "ck")
  alter(tmp_path / "ck" / "2")
  ckpt = checkpoint.Checkpointer(tmp_path / "ck", every=1, keep=3)
  it = make_train_iterator(DATA)
  with caplog.at_level(logging.WARNING):
    restored = ckpt.restore_latest(abstract(), it)
  ckpt.close()
  assert int(restored["step"]) == 1
  np.testing.assert_array_equal(np.asarray(restored["params"]["w"]), w_at(1))
  assert it.get_state() == positions[1]
  assert any(str(tmp_path / "ck" / "2") in m and "integrity check" in m and "params/w" in m
             for m in messages(caplog)), messages(caplog)
  # Moved aside with its checksums, for a person to look at.
  assert (tmp_path / "ck" / "corrupt_step_2" / "checksums.json").exists()
  assert ckpt.all_steps() == [1]


def test_no_good_checkpoint_raises_naming_them_and_leaves_the_iterator(tmp_path):
  save_steps(tmp_path / "ck")
  flip_byte(tmp_path / "ck" / "2")
  garbage_4kb(tmp_path / "ck" / "1")
  it = make_train_iterator(DATA)
  ckpt = checkpoint.Checkpointer(tmp_path / "ck", every=1, keep=3)
  with pytest.raises(checkpoint.UnreadableCheckpoints,
                     match=r"ck holds checkpoints but none is readable: step 2 .*params/w.*; "
                     r"step 1 .*params/w"):
    ckpt.restore_latest(abstract(), it)
  ckpt.close()
  assert it.get_state() == make_train_iterator(DATA).get_state()
  # A later run is not fooled by the empty-looking directory either.
  ckpt = checkpoint.Checkpointer(tmp_path / "ck", every=1, keep=3)
  with pytest.raises(checkpoint.UnreadableCheckpoints,
                     match="set aside by an earlier run: corrupt_step_1, corrupt_step_2"):
    ckpt.restore_latest(abstract(), it)
  ckpt.close()


def test_rotation_keeps_the_newest_verified_step(tmp_path, monkeypatch, caplog):
  directory = tmp_path / "ck"
  ckpt = checkpoint.Checkpointer(directory, every=1, keep=1)
  it = make_train_iterator(DATA)
  assert ckpt.save(1, state_at(1), it)
  ckpt.wait()
  assert ckpt.is_verified(1)
  # Step 2's checksums cannot be written (a full disk): step 1 stays beside it.
  write = integrity.write

  def disk_full(*args):
    raise OSError(28, "No space left on device")

  monkeypatch.setattr(integrity, "write", disk_full)
  with caplog.at_level(logging.WARNING):
    assert ckpt.save(2, state_at(2), it)
    ckpt.wait()
  assert ckpt.all_steps() == [1, 2] and not ckpt.is_verified(2)
  assert any("stays unverified" in m for m in messages(caplog))
  # Once a newer step is verified, the old ones go.
  monkeypatch.setattr(integrity, "write", write)
  assert ckpt.save(3, state_at(3), it)
  ckpt.close()
  assert ckpt.all_steps() == [3] and os.listdir(directory / "checksums") == ["3.json"]


def test_unverified_step_falls_back_when_its_data_is_not_finite(tmp_path, caplog):
  save_steps(tmp_path / "ck")
  os.remove(integrity.path_for(tmp_path / "ck", 2))  # as saved before checksums existed
  garbage_4kb(tmp_path / "ck" / "2", b"\xff" * 4096)  # NaN
  ckpt = checkpoint.Checkpointer(tmp_path / "ck", every=1, keep=3)
  with caplog.at_level(logging.WARNING):
    assert int(ckpt.restore_latest(abstract(), make_train_iterator(DATA))["step"]) == 1
  ckpt.close()
  assert any("no checksum file" in m and "params/w" in m for m in messages(caplog))


def test_host_and_device_checksums_agree():
  # A checkpoint saved from accelerators (device sums) must verify on a CPU (numpy sums).
  rng = np.random.default_rng(2)
  tree = {"f32": jnp.asarray(rng.normal(size=(3, 5, 7)), jnp.float32),
          "bf16": jnp.asarray(rng.normal(size=(9,)), jnp.bfloat16).at[2].set(jnp.nan),
          "i32": jnp.asarray(-7, jnp.int32), "u32": jnp.asarray([1, 2**32 - 1], jnp.uint32),
          "bool": jnp.asarray([True, False, True]), "empty": jnp.zeros((0, 3))}
  host = integrity.array_sums(tree)
  device = integrity._device_sums(jax.tree.leaves(tree))  # pylint: disable=protected-access
  assert [list(row) for row in host.values()] == np.asarray(device).tolist()
  assert host["bf16"][2] == 1
  # Any one flipped bit changes the sums.
  w = np.asarray(tree["f32"]).copy()
  w.view(np.uint32)[1, 2, 3] ^= 1 << 17
  assert integrity.array_sums({"f32": w})["f32"][:2] != host["f32"][:2]


@pytest.fixture
def sigint_outside():
  """SIGINTs that reach the handler outside the guard: recorded instead of interrupting pytest."""
  seen = []
  previous = signal.signal(signal.SIGINT, lambda *_: seen.append("SIGINT"))
  yield seen
  signal.signal(signal.SIGINT, previous)


def test_preemption_guard_turns_sigint_into_a_flag_and_a_second_one_into_an_interrupt(
    sigint_outside):
  guard = checkpoint.PreemptionGuard().install()
  try:
    assert not guard.should_stop()
    os.kill(os.getpid(), signal.SIGINT)
    assert not sigint_outside and guard.should_stop() and guard.received == "SIGINT"
    with pytest.raises(KeyboardInterrupt):
      os.kill(os.getpid(), signal.SIGINT)
  finally:
    guard.uninstall()
  os.kill(os.getpid(), signal.SIGINT)  # the previous handler is back
  assert sigint_outside == ["SIGINT"]


# --- experiments.train in process: a one-layer transformer, a few steps ---

TRAIN_FLAGS = ("config", "workdir", "distributed", "allow_fresh_start")


@pytest.fixture(scope="module")
def train_module():
  """experiments/train.py loaded apart, with its flags in the global registry only while it
  loads: they share names (--workdir, --config) with entry points the suite imports beside
  it. The tests call its train() and read no flag by name afterwards."""
  registry = flags.FLAGS
  aside = {name: registry[name] for name in TRAIN_FLAGS if name in registry}
  for name in aside:
    delattr(registry, name)
  before = set(registry)
  try:
    spec = importlib.util.spec_from_file_location(
        "experiments_train_under_test", os.path.join(REPO, "experiments", "train.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.FRESH_START_HELP = registry["allow_fresh_start"].help
  finally:
    for name in set(registry) - before:
      delattr(registry, name)
    for name, flag in aside.items():
      registry[name] = flag
  return module

# These runs check plumbing, not speed.
FAST = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def tiny_config(steps: int = 4):
  config = config_files.load(config_files.resolve("transformer"))
  config.steps, config.seed = steps, 0
  config.model.num_layers, config.model.d_model, config.model.intermediate_size = 1, 32, 64
  config.data.seq_len, config.data.batch_size = 16, 2
  config.optim.warmup_steps = 1
  config.checkpoint.every, config.log.every = 100, 1
  config.log.progress = config.log.tensorboard = False
  config.eval.every = 0
  return config


@pytest.fixture
def train(train_module, monkeypatch):
  """The train module, its train step and fresh state compiled without XLA optimisations
  (as the subprocess tests' XLA_FLAGS do: a third of the compile time)."""
  fast_jax = types.SimpleNamespace(**{k: getattr(jax, k) for k in dir(jax) if k[0] != "_"})
  fast_jax.jit = functools.partial(jax.jit, compiler_options=FAST)
  monkeypatch.setattr(training_loop, "jax", fast_jax)  # where train() jits its step
  monkeypatch.setattr(train_state, "jax", fast_jax)
  return train_module


def script_data(train, monkeypatch, at_batch: int, action) -> list:
  """Train's data iterator runs ``action()`` when asked for batch ``at_batch``; returns the
  list it fills with its position after each batch served."""
  make, positions = make_train_iterator, []  # the unscripted one

  def make_scripted(*args, **kwargs):
    it = make(*args, **kwargs)
    base = type(it)

    class Scripted(base):
      def __next__(self):
        if len(positions) + 1 == at_batch:
          action()
        batch = base.__next__(self)
        positions.append(self.get_state())
        return batch

    it.__class__ = Scripted
    return it

  monkeypatch.setattr(train.data_lib, "make_train_iterator", make_scripted)
  return positions


def logged_steps(workdir) -> list[int]:
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line)["step"] for line in f if line.strip()]


def unreadable_workdir(path) -> str:
  """A workdir whose checkpoints 1 and 2 are all garbage, and its old metrics."""
  workdir = str(path)
  save_steps(os.path.join(workdir, "checkpoints"))
  for step in ("1", "2"):
    for root, _, names in os.walk(os.path.join(workdir, "checkpoints", step, "state")):
      for name in names:
        open(os.path.join(root, name), "wb").write(b"\x00garbage" * 3)
  with open(os.path.join(workdir, "metrics.jsonl"), "w") as f:
    f.write('{"step": 1, "loss": 6.0}\n{"step": 2, "loss": 5.9}\n')
  return workdir


def test_train_refuses_unreadable_checkpoints_then_saves_on_sigint_and_on_an_exception(
    tmp_path, monkeypatch, train, caplog, sigint_outside):
  workdir = unreadable_workdir(tmp_path)
  before = open(os.path.join(workdir, "metrics.jsonl")).read()
  with pytest.raises(checkpoint.UnreadableCheckpoints,
                     match=rf"{workdir}/checkpoints holds checkpoints but none is readable: "
                     r"step 2 is unreadable .*step 1 is unreadable"):
    train.train(tiny_config(), workdir)
  assert open(os.path.join(workdir, "metrics.jsonl")).read() == before
  assert "corrupt_step_<n>" in train.FRESH_START_HELP

  # Allowed: a fresh start, stopped by Ctrl-C while batch 2 loads; step 2 is saved.
  script_data(train, monkeypatch, 2, lambda: os.kill(os.getpid(), signal.SIGINT))
  with caplog.at_level(logging.WARNING):
    state = train.train(tiny_config(), workdir, allow_fresh_start=True)
  assert int(state.step) == 2
  assert any("training again from step 0" in m for m in messages(caplog))
  assert any("stopping at step 2 on SIGINT" in m for m in messages(caplog))
  assert logged_steps(workdir) == [1, 2] and not sigint_outside

  # Resumed, then a data error while batch 2 of this run (step 4) loads: step 3 is saved.
  def data_error():
    raise RuntimeError("shard 7: truncated record")

  positions = script_data(train, monkeypatch, 2, data_error)
  caplog.clear()
  with caplog.at_level(logging.INFO), pytest.raises(RuntimeError, match="truncated record"):
    train.train(tiny_config(), workdir)
  checkpoints = os.path.join(workdir, "checkpoints")
  assert f"restored checkpoint {checkpoints}/2" in messages(caplog)
  assert any(m.startswith("training stopped by RuntimeError: shard 7: truncated record; saved "
                          f"checkpoint {checkpoints}/3 first") for m in messages(caplog))
  assert logged_steps(workdir) == [1, 2, 3]
  # With the data position after step 3's batch: a resume repeats nothing, skips nothing.
  ckpt = checkpoint.Checkpointer(checkpoints, every=1, keep=3)
  assert ckpt.all_steps() == [2, 3] and ckpt.is_verified(3)
  exp = experiment.resolve(tiny_config())
  model_def = train_state.make_model_def(exp.model)
  tx, _ = optimizer.make_optimizer(exp.optim, exp.steps)
  shapes = jax.eval_shape(lambda: train_state.init_train_state(model_def, tx, exp.seed))
  it = make_train_iterator(exp.data)
  assert int(ckpt.restore_latest(shapes, it).step) == 3
  ckpt.close()
  assert it.get_state() == positions[0]


# --- loaders of a training workdir ---

def eval_workdir(path) -> str:
  """config.json and checkpoints 1 and 2 of a one-layer transformer (random numbers)."""
  workdir = str(path)
  config = tiny_config()
  exp = experiment.resolve(config)
  with open(os.path.join(workdir, "config.json"), "w") as f:
    f.write(experiment.to_json(config, exp))
  model_def = train_state.make_model_def(exp.model)
  tx, _ = optimizer.make_optimizer(exp.optim, exp.steps)
  shapes = jax.eval_shape(lambda: train_state.init_train_state(model_def, tx, exp.seed))
  rng = np.random.default_rng(3)
  state = jax.tree.map(lambda s: rng.normal(size=s.shape).astype(s.dtype), shapes)
  ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"), every=1, keep=3)
  it = make_train_iterator(exp.data)
  for step in (1, 2):
    assert ckpt.save(step, state, it)
  ckpt.close()
  return workdir


def test_eval_loading_falls_back_to_the_previous_good_step_and_fails_in_one_line(
    tmp_path, caplog):
  workdir = eval_workdir(tmp_path)
  checkpoints = os.path.join(workdir, "checkpoints")
  flip_byte(os.path.join(checkpoints, "2"))
  with caplog.at_level(logging.WARNING):
    run = loading.load_run(workdir)
  assert run.step == 1 and run.checkpoint == os.path.join(checkpoints, "1")
  assert any(f"{checkpoints}/2 failed its integrity check (arrays differ from the checksums"
             in m for m in messages(caplog)), messages(caplog)
  # A step asked for by name is not swapped for another.
  with pytest.raises(ValueError, match=r"no readable checkpoint in .*checkpoints: step 2 failed"):
    loading.load_run(None, os.path.join(checkpoints, "2"))

  # None good: one line (eval_retrieval exits with it) naming every step and why.
  garbage_4kb(os.path.join(checkpoints, "1"))
  with pytest.raises(ValueError) as error:
    loading.load_run(workdir)
  message = str(error.value)
  assert message.startswith(f"no readable checkpoint in {checkpoints}: step 2 failed its "
                            "integrity check")
  assert "; step 1 " in message and "\n" not in message
  assert sorted(os.listdir(checkpoints)) == ["1", "2", "checksums"]  # a reader moves nothing


def test_cli_names_the_unreadable_checkpoints_in_one_line(tmp_path):
  workdir = unreadable_workdir(tmp_path)
  before = open(os.path.join(workdir, "metrics.jsonl")).read()
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  done = subprocess.run(
      [sys.executable, "-m", "experiments.train", "--config=transformer", f"--workdir={workdir}",
       "--config.model.num_layers=1", "--config.steps=2", "--config.optim.warmup_steps=1",
       "--config.data.seq_len=16", "--config.data.batch_size=2", "--config.eval.every=0",
       "--config.log.tensorboard=False"],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
  assert done.returncode == 1, done.stderr[-3000:]
  last = done.stderr.strip().splitlines()[-1]
  assert last.startswith(f"cannot resume: {workdir}/checkpoints holds checkpoints but none is "
                         "readable: step 2 is unreadable"), done.stderr[-3000:]
  assert "--allow_fresh_start" in last and "Traceback" not in done.stderr
  assert open(os.path.join(workdir, "metrics.jsonl")).read() == before
