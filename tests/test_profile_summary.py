"""experiments/profile_summary.py and bench_train --profile_steps / --hlo_copies, on the CPU.

The CPU has no device planes, so the kernel sums are checked on the host plane's XLA
lines (the same reading code; a GPU's stream lines differ only by name); bench_train's
wiring runs end to end at the tiny preset.
"""
from __future__ import annotations

import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

from experiments import profile_summary
from tests import helpers

REPO = helpers.REPO


def test_op_times_sums_the_traced_calls(tmp_path):
  x = jnp.ones((256, 256))
  f = jax.jit(lambda x: jnp.tanh(x @ x).sum())
  f(x).block_until_ready()
  path = profile_summary.trace_calls(lambda: f(x), 3, str(tmp_path))
  assert path.endswith(".xplane.pb")
  rows = profile_summary.op_times(path, plane_prefix="/host:CPU",
                                  line_filter=lambda name: name.startswith("tf_XLA"))
  assert rows and all(r["total_ms"] >= 0 and r["count"] >= 1 for r in rows)
  assert [r["total_ms"] for r in rows] == sorted((r["total_ms"] for r in rows), reverse=True)
  top = profile_summary.per_call(rows, 3, 2)
  assert len(top) == min(2, len(rows))
  assert abs(top[0]["ms_per_call"] * 3 - top[0]["total_ms"]) < 1e-9
  assert 0 < sum(r["share"] for r in profile_summary.per_call(rows, 3, len(rows))) < 1 + 1e-9
  # No accelerator here: no device plane, so nothing to sum (not an error).
  assert profile_summary.op_times(path) == []


def test_bench_train_profiles_its_steps(tmp_path):
  out = tmp_path / "bench_train.json"
  result = subprocess.run(
      [sys.executable, "-m", "experiments.bench_train", "--nofla", "--archs=GDN",
       "--study_preset=smoke", "--batch=1", "--seq_len=64", "--steps=1", "--warmup=0",
       "--profile_steps=1", f"--profile_dir={tmp_path / 'profile'}", "--hlo_copies=5",
       f"--out={out}"],
      cwd=REPO, env=helpers.fast_env(), capture_output=True, text=True,
      timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "GDN: copies in the compiled step" in result.stderr      # --hlo_copies' table
  assert "| memcpy | count | mib" in result.stderr
  assert "GDN: activation stacks the step's loops carry" in result.stderr
  (row,) = json.loads(out.read_text())["results"]
  assert row["tokens_per_s"] > 0 and row["profile"] == []    # CPU: no device plane
  assert row["round"] == 0
  assert list((tmp_path / "profile" / "GDN").rglob("*.xplane.pb"))
  # --study_preset: the study's model of the architecture, at the given batch and length.
  from experiments.reproduction import preset
  from lte_jax.training import train_state
  smoke_gdn = train_state.make_model_def(preset.model_config(preset.get_preset("smoke"), "GDN"))
  assert row["params"] == train_state.num_params(smoke_gdn)
  assert "study preset smoke, median of 1 steps" in result.stdout
  assert row["tokens_per_s"] == pytest.approx(64 / row["step_s"])


def test_bench_train_study_preset_needs_nofla():
  result = subprocess.run(
      [sys.executable, "-m", "experiments.bench_train", "--study_preset=smoke", "--archs=GDN"],
      cwd=REPO, env=helpers.fast_env(), capture_output=True, text=True,
      timeout=120)
  assert result.returncode != 0 and "add --nofla" in result.stderr


def test_bench_train_rounds_compare_within_a_round():
  """--rounds: each round's rows are set against that round's FLA row; the summary gives
  each model's median, min and max over the rounds; a failed row joins neither."""
  from experiments import bench_common
  rows = [dict(model="FLA 0.6.0 GatedDeltaNet", round=0, step_s=0.30, tokens_per_s=100.0),
          dict(model="lte_jax GDN", round=0, step_s=0.28, tokens_per_s=110.0),
          dict(model="FLA 0.6.0 GatedDeltaNet", round=1, step_s=0.27, tokens_per_s=120.0),
          dict(model="lte_jax GDN", round=1, step_s=0.26, tokens_per_s=126.0),
          dict(model="lte_jax laLTE", round=1, error="timeout after 5 s")]
  for round_ in (0, 1):
    bench_common.anchor_ratios(rows, round_)
  assert rows[1]["vs_fla"] == pytest.approx(1.10) and rows[3]["vs_fla"] == pytest.approx(1.05)
  assert "vs_fla" not in rows[4]
  summary = {r["model"]: r for r in bench_common.rounds_summary(rows)}
  assert set(summary) == {"FLA 0.6.0 GatedDeltaNet", "lte_jax GDN"}
  gdn = summary["lte_jax GDN"]
  assert gdn["rounds"] == 2 and gdn["step_s_min"] == 0.26 and gdn["step_s_max"] == 0.28
  assert gdn["vs_fla_median"] == pytest.approx(1.075) and gdn["vs_fla_min"] == pytest.approx(1.05)
