"""experiments.reproduce: the study preset's shapes and window ratios, the driver's stage
skipping and resume, and the smoke study end to end on the CPU."""
from __future__ import annotations

import json
import os
import shutil

import jax
import pytest

from experiments import reproduce
from experiments.reproduction import preset as preset_lib
from experiments.reproduction import report as report_lib
from experiments.reproduction.evaluate import wilson
from lte_jax.models.hybrid_lm import count_params


def test_small_preset_scales_the_paper_windows_with_the_training_length():
  p = preset_lib.get_preset("small")
  assert p.seq_len == 2048 and p.eval_lengths == (2048, 4096, 8192)
  # The paper's 768 / 4 / 512 / 1024 / 64 / 512 at 4096, halved at 2048.
  assert preset_lib.scaled_windows(p.seq_len) == {
      "lte_window": 384, "lte_sinks": 2, "lte_budget": 256, "swa_window": 512,
      "nsa_block": 32, "nsa_window": 256}
  assert preset_lib.scaled_windows(4096) == preset_lib.PAPER_WINDOWS
  counts = {}
  for arch in preset_lib.STUDY_ARCHS:
    cfg = preset_lib.model_config(p, arch)
    assert (cfg.d_model, cfg.num_layers, cfg.intermediate_size) == (384, 8, 1024)
    assert cfg.max_position >= max(p.eval_lengths)
    counts[arch] = count_params(cfg)
  assert max(counts.values()) < 1.12 * min(counts.values())  # the same size, mixer aside
  lte = preset_lib.model_config(p, "laLTE").lte
  assert (lte.window_size, lte.sink_size, lte.budget) == (384, 2, 256)
  assert (lte.target_kept, lte.target_seq_len) == (256, 2048)
  assert preset_lib.model_config(p, "GDN_SWA").swa.window_size == 512
  nsa = preset_lib.model_config(p, "laNSA").nsa
  assert (nsa.block_size, nsa.block_count, nsa.window_size) == (32, 16, 256)
  # Long enough for the lambda controller to grow from 1e-9 to 1e-2 at its fastest.
  assert p.steps >= preset_lib.controller_steps_to_target() == 1280


def test_runs_give_laLTE_and_GDN_SWA_two_seeds_and_names_are_checked():
  p = preset_lib.get_preset("small")
  assert preset_lib.runs(p, ("GDN", "laLTE", "GDN_SWA"), 1) == [
      ("GDN", 0), ("laLTE", 0), ("laLTE", 1), ("GDN_SWA", 0), ("GDN_SWA", 1)]
  assert reproduce._parse_runs(["laLTE:1", "GDN:0"]) == [("laLTE", 1), ("GDN", 0)]
  with pytest.raises(ValueError, match="'laLTE' is not 'arch:seed'"):
    reproduce._parse_runs(["laLTE"])
  with pytest.raises(ValueError, match="preset must be one of"):
    preset_lib.get_preset("huge")
  with pytest.raises(ValueError, match="arch must be one of"):
    preset_lib.model_config(p, "NSA")


def test_wilson_interval():
  assert wilson(0, 200)[0] == 0.0 and 1.5 < wilson(0, 200)[1] < 2.0
  lo, hi = wilson(100, 200)
  assert lo < 50 < hi and abs((lo + hi) / 2 - 50) < 1e-9


@pytest.fixture(scope="module")
def smoke_study(tmp_path_factory):
  """A smoke study of laLTE: trained (4 steps), stopped after step 2, resumed, evaluated."""
  workdir = str(tmp_path_factory.mktemp("study"))
  study = reproduce.Study(workdir, preset_lib.get_preset("smoke"), smoke=True)
  manifest = study.prepare()
  # tests/quick_compile.py's setting, for this module-wide fixture: compiling is its cost.
  quick = jax.config.read("jax_disable_most_optimizations")
  jax.config.update("jax_disable_most_optimizations", True)
  try:
    _train_cut_resume_evaluate(study)
  finally:
    jax.config.update("jax_disable_most_optimizations", quick)
  return study, manifest


def _train_cut_resume_evaluate(study):
  study.train("laLTE", 0)
  run = study.run_dir("laLTE", 0)
  ckpts = os.path.join(run, "checkpoints")
  steps = sorted(int(s) for s in os.listdir(ckpts) if s.isdigit())
  assert steps[-1] == 4
  # A job cut off after step 2: the newest checkpoint gone, training resumes from step 2.
  shutil.rmtree(os.path.join(ckpts, "4"))
  os.remove(os.path.join(ckpts, "checksums", "4.json"))
  study.train("laLTE", 0)
  study.evaluate("laLTE", 0)


@pytest.mark.xdist_group("smoke_study")  # one worker builds the module fixture once
def test_smoke_study_resumes_skips_finished_stages_and_reports(smoke_study):
  study, manifest = smoke_study
  assert manifest["documents"] > 0 and manifest["byte_tokens"] > 400_000
  run = study.run_dir("laLTE", 0)
  with open(os.path.join(run, "metrics.jsonl")) as f:
    steps = [json.loads(line)["step"] for line in f]
  assert steps == sorted(set(steps)) and steps[-1] == 4
  with open(os.path.join(run, "train_time.json")) as f:
    segments = json.load(f)["segments"]
  assert [seg[:2] for seg in segments] == [[0, 4], [2, 4]]  # resumed from step 2
  # Finished stages are skipped: no new training, the evaluation file untouched.
  evaluated = os.path.join(run, "study_eval.json")
  before = (os.path.getmtime(evaluated), os.path.getmtime(os.path.join(run, "train_time.json")))
  study.train("laLTE", 0)
  study.evaluate("laLTE", 0)
  assert before == (os.path.getmtime(evaluated),
                    os.path.getmtime(os.path.join(run, "train_time.json")))
  with open(evaluated) as f:
    ev = json.load(f)
  p = study.preset
  assert set(ev["niah"]) == {f"{t}@{n}" for t in ("niah_single_1", "niah_single_2",
                                                  "niah_single_3") for n in p.eval_lengths}
  assert all(e["num_samples"] == p.eval_samples for e in ev["niah"].values())
  assert ev["decode_check"]["rel_max"] < 1e-4  # fp32 smoke model: decode == forward
  keep = ev["lte_keep_map"]
  start, end = keep["needle"]
  assert 0 < start < end < keep["prompt_len"]
  assert all(len(h) <= keep["budget"] for layer in keep["retained"] for h in layer)
  assert set(ev["memory"]) == {str(n) for n in p.eval_lengths}
  paths = report_lib.write(study.workdir)
  with open(paths[1]) as f:
    text = f.read()
  assert "| laLTE |" in text and "laLTE-s0" in text
  assert {os.path.basename(x) for x in paths} >= {"niah_by_length.png", "lte_keep_map.png",
                                                  "lte_controller.png", "loss.png"}


@pytest.mark.xdist_group("smoke_study")
def test_a_study_folder_keeps_its_preset(smoke_study, tmp_path):
  study, _ = smoke_study
  other = reproduce.Study(study.workdir, preset_lib.get_preset("pilot"), smoke=True)
  with pytest.raises(ValueError, match="holds a study of another preset"):
    other.prepare()
