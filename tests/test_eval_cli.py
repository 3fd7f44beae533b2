"""experiments/eval_retrieval.py end to end on a tiny checkpoint written by experiments.train."""
from __future__ import annotations

import json
import os

import jax
import numpy as np
import pytest
from absl import flags
from absl.testing import flagsaver
from flax import nnx

from experiments import eval_retrieval
from lte_jax.evals import loading
from tests import helpers

run = helpers.run_module
STEP = helpers.TINY_STEPS  # the tiny run's last step, its newest checkpoint


# The suite's one tiny run, shared with test_checkpoint_resume (one xdist worker).
pytestmark = pytest.mark.xdist_group("tiny_run")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  return helpers.tiny_run(tmp_path_factory)


def test_eval_cli_writes_scores_memory_and_heatmap(workdir, tmp_path):
  (tmp_path / "swde.jsonl").write_text(json.dumps(
      {"text": "Name: Ann Lee. Born: 1990. Job: pilot.", "key": "Job", "value": "pilot"}) + "\n")
  out = tmp_path / "out"
  done = run("experiments.eval_retrieval", f"--workdir={workdir}", "--num_samples=2",
             "--lengths=512", "--tasks=niah_single_2,mqar,swde",
             f"--data_dir={tmp_path}", f"--out_dir={out}", "--batch_size=2")
  assert done.returncode == 0, done.stderr[-3000:]
  results = json.loads((out / "results.json").read_text())
  assert results["run"]["step"] == STEP and results["run"]["arch"] == "laLTE"
  assert results["lengths"] == [512]
  for task in ("niah_single_2", "mqar"):
    entry = results["tasks"][task]["512"]
    assert entry["num_samples"] == 2 and 0.0 <= entry["score"] <= 100.0
  niah = results["tasks"]["niah_single_2"]["512"]
  # prompt_tokens count the BOS: BOS + prompt + 128 generated fit the length.
  assert len(niah["samples"]) == 2 and niah["prompt_tokens"][1] + 128 <= 512
  assert results["tasks"]["swde"]["512"]["num_samples"] == 1
  assert results["tasks"]["mqar"]["512"]["seq_len"] == 510
  assert results["memory"]["cache_bytes_per_sequence"]["512"] > 0
  table = (out / "results.md").read_text()
  assert "| niah_single_2 |" in table and "decode cache per sequence (MiB)" in table
  assert (out / "niah_heatmap.png").read_bytes()[:4] == b"\x89PNG"
  assert "| task | 512 |" in done.stdout


def test_checkpoint_flag_loads_a_step_directory(workdir):
  by_workdir = loading.load_run(workdir)
  by_step = loading.load_run(None, os.path.join(workdir, "checkpoints", str(STEP)))
  assert by_step.step == by_workdir.step == STEP
  a = jax.tree.leaves(nnx.state(by_workdir.model, nnx.Param))
  b = jax.tree.leaves(nnx.state(by_step.model, nnx.Param))
  assert len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b))
  with pytest.raises(ValueError, match="checkpoint step 9 is not in"):
    loading.load_run(None, os.path.join(workdir, "checkpoints", "9"))


def main_exit(*argv) -> str:
  """The message main exits with, flags parsed from ``argv`` as the command line does."""
  was_parsed = flags.FLAGS.is_parsed()
  with flagsaver.flagsaver(), pytest.raises(SystemExit) as exited:
    try:
      flags.FLAGS(["eval_retrieval", *argv])
      eval_retrieval.main(["eval_retrieval"])
    finally:
      flags.FLAGS.unparse_flags()
      if was_parsed:
        flags.FLAGS.mark_as_parsed()
  return str(exited.value.code)


def test_missing_data_and_bad_flags_fail_with_clear_messages(tmp_path):
  message = main_exit(f"--workdir={tmp_path}", "--tasks=fda", f"--data_dir={tmp_path}")
  assert "fda.parquet" in message and "fda.jsonl" in message
  assert "--tasks must name tasks from" in main_exit(f"--workdir={tmp_path}",
                                                     "--tasks=niah_multi")
  assert "config.json" in main_exit(f"--workdir={tmp_path}", "--tasks=mqar")
  # A process of its own: in this one, entry points imported later take over shared flags.
  done = run("experiments.eval_retrieval", "--help")
  assert done.returncode == 0
  for flag in ("--workdir", "--checkpoint", "--tasks", "--lengths", "--num_samples",
               "--data_dir", "--out_dir"):
    assert flag in done.stdout
