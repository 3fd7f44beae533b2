"""Held-out validation: the split, validation metrics in training, experiments.eval_ppl."""
from __future__ import annotations

import collections
import dataclasses
import json
import math
import os
import subprocess
import sys
import types

import numpy as np
import pytest

from lte_jax import data
from lte_jax.data import holdout
from lte_jax.evals import perplexity
from lte_jax.training import evaluation

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Fast compiles: these runs check plumbing, not speed.
ENV = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_backend_optimization_level=0 "
           "--xla_llvm_disable_expensive_passes=true")


def run(module, *args, timeout=240):
  return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, env=ENV,
                        capture_output=True, text=True, timeout=timeout)


def documents(cfg: data.DataConfig, split: holdout.Split | None) -> list[tuple[int, ...]]:
  """The token sequences of the documents a split reads, one pass."""
  ds = data.make_document_dataset(dataclasses.replace(cfg, num_epochs=1), split=split)
  return [tuple(ds[i]["inputs"].tolist()) for i in range(len(ds))]


def check_disjoint(cfg: data.DataConfig, holdout_value, expected_held: int) -> None:
  everything = documents(cfg, None)
  train = documents(cfg, holdout.Split("train", holdout_value, cfg.seed))
  held = documents(cfg, holdout.Split("validation", holdout_value, cfg.seed))
  assert len(held) == expected_held
  assert collections.Counter(train) + collections.Counter(held) == collections.Counter(everything)
  # By content: two embedded topics ('if', 'else') share a text, both on the training side.
  assert not set(train) & set(held)


def test_split_of_a_file_source_is_disjoint_and_deterministic(tmp_path):
  for i in range(40):
    (tmp_path / f"doc{i:02d}.txt").write_text(f"document {i}: " + "words " * (i % 7))
  cfg = data.DataConfig(source="text", path=str(tmp_path / "*.txt"), seq_len=32, batch_size=2,
                        seed=3)
  check_disjoint(cfg, 0.1, expected_held=4)
  a = holdout.held_out_indices(40, 0.1, seed=3)
  assert np.array_equal(a, holdout.held_out_indices(40, 0.1, seed=3))
  assert not np.array_equal(a, holdout.held_out_indices(40, 0.1, seed=4))


def test_split_of_the_embedded_source_is_disjoint():
  check_disjoint(data.DataConfig(seq_len=32, batch_size=2), 4, expected_held=4)


def test_synthetic_validation_documents_come_from_other_seeds():
  cfg = data.DataConfig(seq_len=80, batch_size=2, mixture={"mqar": 1.0}, mqar_seq_len=64)
  first = lambda split: [tuple(d["inputs"].tolist()) for d in
                         data.make_document_dataset(cfg, split=split)[:6]]
  train = first(holdout.Split("train", 0.01, 0))
  assert train == first(None)  # the training stream is unchanged by the split
  assert not set(train) & set(first(holdout.Split("validation", 0.01, 0)))


@pytest.mark.parametrize("num_docs,value", [(10, 0.3), (97, 5), (1000, 0.013), (3, 1)])
def test_remaining_documents_are_the_complement_in_order(num_docs, value):
  held = holdout.held_out_indices(num_docs, value, seed=1)
  rest = holdout.Remaining(list(range(num_docs)), held)
  assert list(rest) == sorted(set(range(num_docs)) - set(held.tolist()))
  with pytest.raises(IndexError):
    rest[len(rest)]


def test_bad_holdout_and_eval_fields_name_the_field():
  with pytest.raises(ValueError, match="config.eval.holdout"):
    holdout.held_out_indices(5, 5, seed=0)  # nothing left to train on
  with pytest.raises(ValueError, match=r"config.eval.holdout must be 0 .* got 1.5"):
    evaluation.EvalConfig(holdout=1.5)
  with pytest.raises(ValueError, match="config.eval.every must be an integer >= 0"):
    evaluation.EvalConfig(every=-1)
  with pytest.raises(ValueError, match="config.eval.batches must be an integer >= 1"):
    evaluation.EvalConfig(batches=0)
  with pytest.raises(ValueError, match="set config.eval.holdout > 0"):
    evaluation.validation_data(evaluation.EvalConfig(every=5), data.DataConfig())


def test_a_separate_validation_source_is_read_whole(tmp_path):
  for name in ("train", "val"):
    (tmp_path / name).mkdir()
    for i in range(3):
      (tmp_path / name / f"{i}.txt").write_text(f"{name} document {i}")
  train_cfg = data.DataConfig(source="text", path=str(tmp_path / "train" / "*.txt"))
  eval_cfg = evaluation.EvalConfig(every=1, path=str(tmp_path / "val" / "*.txt"))
  cfg, split = evaluation.validation_data(eval_cfg, train_cfg)
  assert split.name == "separate" and cfg.path == eval_cfg.path
  assert sorted(data.ByteTokenizer().decode(d) for d in documents(cfg, split)) == [
      f"val document {i}" for i in range(3)]
  bad = evaluation.EvalConfig(every=1, path=str(tmp_path / "none" / "*.txt"))
  exp = types.SimpleNamespace(eval=bad, steps=3, data=train_cfg)
  with pytest.raises(ValueError, match="config.eval.path / config.eval.source: path glob"):
    evaluation.Evaluator(exp, None, None)


def test_position_loss_bins_and_lengths():
  nll = np.arange(2 * 100, dtype=np.float32).reshape(2, 100)
  bins = perplexity.position_loss(nll, 16)
  assert bins.shape == (7,)  # ceil(100 / 16): the last bin holds positions 96..99
  np.testing.assert_allclose(bins[0], nll[:, :16].mean())
  np.testing.assert_allclose(bins[-1], nll[:, 96:].mean())
  docs = [{"inputs": np.arange(n), "targets": np.arange(n) + 1} for n in (5, 12, 9, 20)]
  rows, stats = perplexity.document_rows(iter(docs), [8, 10], max_rows=2)
  assert rows[8]["inputs"].shape == (2, 8) and rows[10]["inputs"].shape == (2, 10)
  assert stats == {"documents": 4, "longest": 20}
  with pytest.raises(ValueError, match="length 21 is beyond the validation data.*longest has 20"):
    perplexity.document_rows(iter(docs), [21], max_rows=2)
  for values, message in (([], "--lengths must name at least one length"),
                          (["0"], "--lengths must be positive integers, got 0"),
                          (["x"], "--lengths must be positive integers")):
    with pytest.raises(ValueError, match=message):
      perplexity.check_lengths(values)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  """A one-layer transformer (the cheapest to compile) trained 3 steps, validated every 2 and
  after the last; 4 embedded topics held out."""
  path = str(tmp_path_factory.mktemp("run"))
  done = run("experiments.train", "--config=transformer", f"--workdir={path}", "--config.steps=3",
             "--config.eval.every=2", "--config.eval.holdout=4", "--config.model.num_layers=1",
             "--config.model.d_model=32", "--config.model.intermediate_size=64",
             "--config.data.seq_len=32", "--config.data.batch_size=2",
             "--config.optim.warmup_steps=1", "--config.log.tensorboard=False")
  assert done.returncode == 0, done.stderr[-3000:]
  return path, done.stdout


def test_training_logs_validation_loss_and_perplexity(workdir):
  path, stdout = workdir
  records = [json.loads(l) for l in open(os.path.join(path, "metrics.jsonl"))]
  assert [r["step"] for r in records] == [2, 3]  # log.every=10: the evaluations and the end
  for r in records:
    assert math.isclose(r["val/ppl"], math.exp(r["val/loss"]), rel_tol=1e-9)
    assert 0 < r["val/loss"] < 10 and "loss" in r
  assert records[0]["val/tokens"] == records[1]["val/tokens"] == 2 * 2 * 32  # same batches
  assert "val " in stdout and "val loss" in stdout.split("run summary")[1]


def test_eval_ppl_writes_perplexity_per_length_and_the_position_plot(workdir, tmp_path):
  path, _ = workdir
  out = tmp_path / "out"
  done = run("experiments.eval_ppl", f"--workdir={path}", "--lengths=48,96", "--batches=2",
             "--batch_size=2", "--bin=16", f"--out={out}")
  assert done.returncode == 0, done.stderr[-3000:]
  results = json.loads((out / "ppl.json").read_text())
  assert results["lengths"] == [48, 96] and results["run"]["step"] == 3
  assert results["data"]["split"] == "validation" and results["run"]["train_seq_len"] == 32
  for n, bins in ((48, 3), (96, 6)):
    entry = results["results"][str(n)]
    assert entry["rows"] == 4 and entry["tokens"] == 4 * n  # the 4 held-out topics
    assert len(entry["position_loss"]) == bins
    assert math.isclose(entry["ppl"], math.exp(entry["loss"]), rel_tol=1e-9)
  assert (out / "loss_by_position.png").read_bytes()[:4] == b"\x89PNG"
  assert "| 96 | 4 | 384 |" in done.stdout
  done = run("experiments.eval_ppl", f"--workdir={path}", "--lengths=48,100000")
  assert done.returncode != 0
  assert "--lengths: length 100000 is beyond the validation data" in done.stderr
