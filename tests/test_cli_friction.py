"""What a newcomer meets on the command line: errors that name the fix, data errors in one
line without a half-written workdir, finished runs, --help, Ctrl-C, chance levels and
needle depths of the retrieval report. In process: no subprocess, no train step compiled."""
from __future__ import annotations

import gc
import json
import os
import re
import signal
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl import logging
from absl.testing import flagsaver
from flax import nnx

from experiments import configs as config_files
from experiments import convert as convert_cli
from experiments import eval_ppl, eval_retrieval, generate, reproduce
from experiments import train as train_cli
from lte_jax import configs as configs_lib
from lte_jax import data as data_lib
from lte_jax.data import retrieval
from lte_jax.data.tokenizers import ByteTokenizer
from lte_jax.evals import report, tasks
from lte_jax.training import checkpoint, experiment, mesh as mesh_lib, optimizer, train_state
from tests import test_convert as synthetic

BYTE = ByteTokenizer()


def tiny_config(steps: int = 2):
  """A one-layer transformer run that never gets to compile a step in these tests."""
  config = config_files.load(config_files.resolve("transformer"))
  config.steps, config.seed = steps, 0
  config.model.num_layers, config.model.d_model, config.model.intermediate_size = 1, 32, 64
  config.data.seq_len, config.data.batch_size = 16, 2
  config.optim.warmup_steps = 1
  config.log.progress = config.log.tensorboard = False
  config.eval.every = 0
  return config


# --- 1. converted models: the tokenizer, overrides without --config, the log line ---

def test_a_vocabulary_smaller_than_the_tokenizer_names_the_tokenizer_flag(tmp_path):
  cfg = synthetic.gdn_config()  # vocab 97 < the byte tokenizer's 259 ids
  source = synthetic.save(tmp_path, cfg, synthetic.hf_tensors(cfg, np.random.default_rng(0)))
  (tmp_path / "hf" / "tokenizer.json").write_text("{}")
  workdir = tmp_path / "wd"
  with pytest.raises(ValueError, match=re.escape(
      f"fewer than the 259 ids of config.data.tokenizer='byte': pass "
      f"--config.data.tokenizer={source}/tokenizer.json")):
    convert_cli.convert_to_workdir(source, str(workdir))
  assert not workdir.exists()
  # Fine-tuning (the training data) and evaluating a converted workdir say it too.
  with pytest.raises(ValueError, match=r"DataConfig.model_vocab_size=97 .* smaller than the 259 "
                     r"ids of the tokenizer 'byte': .*--config.data.tokenizer=PATH"):
    data_lib.make_train_iterator(data_lib.DataConfig(model_vocab_size=97))
  with pytest.raises(ValueError, match=r"259 ids but the model's vocabulary only 97: .*"
                     r"--tokenizer=PATH"):
    eval_retrieval.check_tokenizer(BYTE, "byte", 97)


def test_config_overrides_without_config(tmp_path):
  cfg = synthetic.gdn_config()
  source = synthetic.save(tmp_path, cfg, synthetic.hf_tensors(cfg, np.random.default_rng(0)))
  argv = ["convert", f"--from={source}", "--to=x", "--config.data.seq_len=16"]
  # convert: the checkpoint's architecture, as a conversion without overrides takes.
  resolved = config_files.resolve_command_line(convert_cli.default_config_args(argv))
  assert resolved[1] == f"--config={os.path.join(config_files.CONFIG_DIR, 'GDN.py')}"
  assert resolved[2:] == argv[1:]
  with pytest.raises(ValueError, match=r"--config.data.seq_len overrides .* add --config=NAME"):
    convert_cli.default_config_args(["convert", "--to=x", "--config.data.seq_len=16"])
  # train: no model to go by, so it says what to add.
  with pytest.raises(SystemExit, match=r"--config.steps overrides a field of the training "
                     r"config, but no --config names it: add --config=NAME, one of .*'laLTE'"):
    train_cli.parse_flags(["train", "--workdir=w", "--config.steps=3"])


def finished_workdir(path, config) -> str:
  """A workdir whose checkpoint is at config.steps (zeros: no init compiled)."""
  exp = experiment.resolve(config)
  model_def = train_state.make_model_def(exp.model)
  tx, _ = optimizer.make_optimizer(exp.optim, exp.steps)
  abstract = jax.eval_shape(lambda: train_state.init_train_state(model_def, tx, exp.seed))
  state = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), abstract)
  state = state.replace(step=jnp.asarray(config.steps, jnp.int32))
  ckpt = checkpoint.Checkpointer(os.path.join(path, "checkpoints"), every=1, keep=3)
  ckpt.save(config.steps, state, data_lib.make_train_iterator(exp.data), force=True)
  ckpt.close()
  return str(path)


def test_a_finished_run_has_nothing_to_do_and_a_file_model_is_named_by_its_file(
    tmp_path, capsys, caplog):
  model_file = tmp_path / "converted_model.json"
  model = configs_lib.get_config("transformer", "tiny", num_layers=1, d_model=32,
                                 intermediate_size=64)
  model_file.write_text(json.dumps({"model": json.loads(json.dumps(
      configs_lib.to_dict(model), default=list))}))
  config = tiny_config()
  config.model.num_layers = config.model.d_model = config.model.intermediate_size = None
  config.model.from_file = str(model_file)
  workdir = finished_workdir(tmp_path / "run", config)
  # The absl logger's own level too: a test that parsed flags in this process leaves absl at
  # its default verbosity (WARNING).
  with caplog.at_level(logging.INFO), caplog.at_level(logging.INFO, logger="absl"):
    state = train_cli.train(config, workdir)
  assert int(state.step) == 2
  out = capsys.readouterr().out
  assert f"{workdir} is already at step 2 (config.steps=2): nothing to do" in out
  assert "nan" not in out and "run summary" not in out
  logged = [r.getMessage() for r in caplog.records]
  assert any(m.startswith(f"the model of {model_file}: ") for m in logged), logged
  assert not any("transformer tiny" in m for m in logged)


# --- 2. data settings the source would ignore ---

def test_settings_the_data_source_ignores_are_refused_naming_both_fields():
  with pytest.raises(ValueError, match=r"DataConfig.path must be None with source='embedded'"):
    data_lib.DataConfig(path="corpus/*.jsonl")
  config = tiny_config()
  config.data.source, config.data.path, config.data.text_field = "text", "x/*.txt", "body"
  with pytest.raises(ValueError, match=r"config.data.text_field='body' .* "
                     r"config.data.source='text' has none"):
    experiment.resolve(config)
  config = tiny_config()
  config.eval.path = "val/*.jsonl"
  with pytest.raises(ValueError, match=r"config.eval.path='val/\*.jsonl' is not read by the "
                     r"'embedded' source .*set config.eval.source"):
    experiment.resolve(config)


# --- 3. data errors: one line, no workdir left behind ---

def run_main(config, workdir) -> str:
  """experiments.train's main with this config; the message it exits with."""
  with flagsaver.flagsaver(config=config, workdir=str(workdir), distributed="off",
                           allow_fresh_start=False):
    with pytest.raises(SystemExit) as exit_info:
      train_cli.main(["train"])
  return str(exit_info.value.code)


def test_data_errors_stop_in_one_line_and_leave_no_workdir(tmp_path, parsed_flags, monkeypatch):
  zeros = lambda model_def, tx, seed, shardings: jax.tree.map(  # no init to compile
      lambda x: jnp.zeros(x.shape, x.dtype),
      jax.eval_shape(lambda: train_state.init_train_state(model_def, tx, seed)))
  monkeypatch.setattr(train_state, "create_train_state", zeros)
  corpus = tmp_path / "corpus.jsonl"
  corpus.write_text('{"text": "a good line"}\nnot json\n')
  config = tiny_config()
  config.data.source, config.data.path = "jsonl", str(tmp_path / "none" / "*.jsonl")
  message = run_main(config, tmp_path / "run")
  assert message == f"cannot start training: path glob '{config.data.path}' matches no file"
  config.data.path, config.data.bad_records = str(corpus), "error"
  message = run_main(config, tmp_path / "run")  # found by the validation pass
  assert message.startswith(f"data error: {corpus}:2: not valid JSON")
  assert "\n" not in message and not (tmp_path / "run").exists()
  config.data.validate = False  # found by the first batch, after the run set up its workdir
  (tmp_path / "old").mkdir()
  (tmp_path / "old" / "notes.txt").write_text("mine")
  message = run_main(config, tmp_path / "old")
  assert message.startswith(f"data error: {corpus}:2: not valid JSON") and "\n" not in message
  assert os.listdir(tmp_path / "old") == ["notes.txt"]


# --- 5. --help ---

@pytest.mark.parametrize("module,expected", [
    (train_cli, [*config_files.available(), *configs_lib.SIZES, *data_lib.SOURCE_KINDS,
                 "default, paper", "skip, error", *configs_lib.REMAT_POLICIES]),
    (eval_retrieval, [*tasks.TASKS, "--lengths"]),
    (convert_cli, [*config_files.available(), "gated_deltanet", "hybrid_gated_deltanet"]),
    (eval_ppl, [*data_lib.SOURCE_KINDS]),
    (generate, ["--max_new_tokens"]),
    (reproduce, ["small, pilot, smoke", "train, eval, report", "laLTE"]),
], ids=["train", "eval_retrieval", "convert", "eval_ppl", "generate", "reproduce"])
def test_help_exits_0_and_lists_the_allowed_values(module, expected, capsys):
  with pytest.raises(SystemExit) as exit_info:
    module.parse_flags([module.__name__, "--help"])
  assert exit_info.value.code == 0
  out = capsys.readouterr().out
  assert module.__doc__.strip().splitlines()[0] in out
  for value in expected:
    assert value in out, value


# --- 6. Ctrl-C while JAX collects garbage ---

def test_sigint_while_jax_collects_garbage_interrupts_the_test(capfd):
  """jaxlib's gc callback swallowed a KeyboardInterrupt raised inside it (tests/conftest.py)."""
  jax.block_until_ready(jax.jit(lambda x: x + 1)(jnp.ones(2)))
  gc.collect()  # earlier tests' garbage: its weakref callbacks would be Python frames too
  # Python's own SIGINT handler, whatever an earlier test in this worker installed.
  previous = signal.signal(signal.SIGINT, signal.default_int_handler)
  try:
    _interrupt_three_times()
  finally:
    signal.signal(signal.SIGINT, previous)
  assert "_xla_gc_callback" not in capfd.readouterr().err


def _interrupt_three_times():
  for _ in range(3):  # with the callback, most signals landed in it
    sender = threading.Timer(0.1, os.kill, (os.getpid(), signal.SIGINT))
    try:
      with pytest.raises(KeyboardInterrupt):
        sender.start()
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
          _ = [[i] for i in range(2000)]  # collections long enough for a signal to land in
    finally:
      sender.join()


# --- 7. retrieval report: chance levels, needle depths at short lengths ---

class ZeroLM(nnx.Module):
  """Logits of zeros: predicts id 0, never a value."""

  def __init__(self, vocab_size: int):
    self.vocab_size = vocab_size

  def __call__(self, tokens):
    return jnp.zeros((*tokens.shape, self.vocab_size)), {}


def test_the_report_says_what_chance_is_for_each_task(monkeypatch):
  mqar = tasks.run_mqar(ZeroLM(300), length=65, vocab_size=256, offset=3, bos_id=1,
                        num_samples=4, seed=0, batch_size=4)
  monkeypatch.setattr(tasks, "generate_texts", lambda model, tok, prompts, **_: [""] * len(prompts))
  niah = tasks.run_niah(None, BYTE, "niah_single_1", 512, num_samples=2, seed=0, batch_size=2)
  uuid = tasks.run_niah(None, BYTE, "niah_single_3", 512, num_samples=2, seed=0, batch_size=2)
  assert mqar["chance"] == pytest.approx(100 / 128) and niah["chance"] == pytest.approx(100 / 9e6)
  results = {"run": {"arch": "GDN", "step": 1}, "lengths": [65, 512],
             "tasks": {"mqar": {"65": mqar}, "niah_single_1": {"512": niah},
                       "niah_single_3": {"512": uuid}},
             "memory": {"cache_bytes_per_sequence": {"65": 2**20, "512": 2**20}}}
  table = report.markdown_table(results)
  assert "| task | 65 | 512 | chance |" in table
  assert "| mqar | 0.0 | - | 0.78 |" in table and "| niah_single_1 | - | 0.0 | ~0 |" in table
  assert "- mqar: one of 128 value ids (one of the 4 values in the context: 25)" in table
  assert "- niah_single_1: a 7-digit number, 1 in 9,000,000" in table
  assert "- niah_single_3: a UUID, 1 in 2^122" in table


def needle_depth(ex: retrieval.NIAHExample) -> float:
  """Haystack words before the needle / all of them, in percent, read off the prompt."""
  context = ex.prompt.split("afterwards.\n", 1)[1].rsplit("\nWhat is the special magic", 1)[0]
  needle = re.search(r"One of the special magic \w+ for \S+ is: \S+\.", context).group(0)
  before, after = context.split(needle)
  words = len(before.split()) + len(after.split())
  return 100.0 * len(before.split()) / words if words else 0.0


@pytest.mark.parametrize("task", list(retrieval.NIAH_TASKS))
def test_needles_spread_over_a_short_context_at_their_reported_depths(task):
  rng = np.random.default_rng(0)
  samples = []
  for _ in range(30):  # 512 byte tokens: BOS + prompt + 128 generated leave a few words
    ex = retrieval.make_niah(rng, BYTE, 511, task=task, reserve_tokens=128)
    assert ex.depth == pytest.approx(needle_depth(ex))
    samples.append({"depth": ex.depth, "hit": 1.0})
  row = report.depth_grid({"512": {"samples": samples}}, ["512"], 10)[0]
  filled = np.flatnonzero(~np.isnan(row))
  assert len(filled) >= 4 and filled[0] == 0 and filled[-1] == 9, row
