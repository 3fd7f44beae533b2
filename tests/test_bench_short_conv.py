"""experiments/bench_short_conv.py runs end to end on CPU at tiny shapes (no timing asserted)."""
from __future__ import annotations

import json
import subprocess
import sys

from tests import helpers

REPO = helpers.REPO


def test_smoke_run_checks_and_times_each_implementation(tmp_path):
  out = tmp_path / "bench_short_conv.json"
  result = subprocess.run(
      [sys.executable, "-m", "experiments.bench_short_conv", "--shapes=1x48x32",
       "--check_shape=1x40x16", "--reps=2", "--nofla", f"--out={out}",
       "--implementations=pallas:block_t=16;block_c=16,xla"],
      cwd=REPO, env=helpers.fast_env(), capture_output=True, text=True,
      timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  data = json.loads(out.read_text())
  assert len(data["checks"]) == 4 and all(r["ok"] for r in data["checks"]), data["checks"]
  timed = {(r["impl"], r["segments"]) for r in data["results"]}
  assert timed == {(f"lte_jax/{i}", s) for i in ("pallas:block_t=16;block_c=16", "xla")
                   for s in (False, True)}
