"""experiments/bench_kernels.py runs end to end on CPU at tiny shapes (no timing asserted):
the correctness check, timings, per-stage timings and the per-kernel launch sweep."""
from __future__ import annotations

import json
import subprocess
import sys

from experiments import bench_kernels
from tests import helpers

REPO = helpers.REPO


def test_smoke_run_checks_times_and_tunes(tmp_path):
  out = tmp_path / "bench_kernels.json"
  result = subprocess.run(
      [sys.executable, "-m", "experiments.bench_kernels", f"--out={out}", "--nofla",
       "--implementations=pallas,pallas:inverse_form=doubling;wy_operands=input;keep_states=True",
       "--shapes=1x32x1x16", "--check_shape=1x32x1x16", "--reps=1", "--stages",
       "--tune=gdn_wy_inverse,gdn_local_value_grads", "--tune_launch=1/1,4/2"],
      cwd=REPO, env=helpers.fast_env(), capture_output=True, text=True,
      timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  data = json.loads(out.read_text())
  assert all(r["ok"] for r in data["checks"]), data["checks"]
  assert {r["impl"] for r in data["rows"]} == {
      "lte_jax/pallas", "lte_jax/pallas:inverse_form=doubling;wy_operands=input;keep_states=True"}
  # Queued timings (comparable with FLA's do_bench) beside the synchronised ones.
  assert all(r["fwd_queued_ms"] > 0 and r["fwdbwd_queued_ms"] > 0 for r in data["rows"])
  assert {"inverse", "states", "output", "backward", "dv_local", "state_grads",
          "qk_grads", "wy_grads"} <= set(data["stages"][0])
  swept = {(r["kernel"], r["launch"], r["stage"]) for r in data["tune"]}
  assert swept == {("gdn_wy_inverse", "1/1", "inverse"), ("gdn_wy_inverse", "4/2", "inverse"),
                   ("gdn_local_value_grads", "1/1", "dv_local"),
                   ("gdn_local_value_grads", "4/2", "dv_local")}
  best = dict(e.split("=") for e in data["best_launch"].split("+"))
  assert set(best) >= {"gdn_wy_inverse", "gdn_local_value_grads"}, best


def test_best_launch_takes_each_kernels_fastest():
  rows = [dict(kernel="a", launch="1/1", stage_ms=2.0),
          dict(kernel="a", launch="4/2", stage_ms=1.0),
          dict(kernel="b", launch="8/3", stage_ms=0.5)]
  assert bench_kernels.best_launch(rows) == "a=4/2+b=8/3"
  # Kernels not swept keep their entry of the table in force.
  assert bench_kernels.best_launch(rows, {"a": (1, 1), "c": (2, 2)}) == "a=4/2+b=8/3+c=2/2"


def test_every_kernel_has_a_stage():
  from lte_jax.kernels.gated_delta_rule.backend import KERNELS
  assert set(bench_kernels.STAGE_OF_KERNEL) == set(KERNELS)
