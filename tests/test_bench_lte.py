"""experiments/bench_lte.py runs end to end on CPU at its --smoke shapes (no timing asserted)."""
from __future__ import annotations

import json
import subprocess
import sys

from tests import helpers

REPO = helpers.REPO


def test_smoke_run_writes_every_section(tmp_path):
  out = tmp_path / "bench_lte.json"
  env = helpers.fast_env()
  result = subprocess.run(
      [sys.executable, "-m", "experiments.bench_lte", "--smoke", f"--out={out}",
       "--implementations=xla", "--attention_implementations=xla",
       "--decode_implementations=pallas,pallas:block_k=16;split=32,xla"],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  data = json.loads(out.read_text())
  assert data["env"]["backend"] == "cpu"
  checks = {r["impl"]: r for r in data["checks"]}
  for impl in ("lte_jax/xla", "lte_jax/decode-pallas", "lte_jax/decode-pallas:block_k=16;split=32",
               "lte_jax/decode-xla"):
    assert checks[impl]["ok"] is True, checks[impl]
  assert all(r["ok"] in (True, "skipped") for r in data["checks"]), data["checks"]
  timed = {r["impl"] for r in data["train"] if "fwd_ms" in r}
  assert {"lte_jax/xla", "lte_jax/swa-xla"} <= timed
  queued = {r["impl"] for r in data["train"] if r.get("fwdbwd_queued_ms", 0) > 0}
  assert timed <= queued, data["train"]
  decode = {(r["impl"], r["cache"]) for r in data["decode"] if "ms" in r}
  assert ("lte_jax/decode-pallas", "LTE 17+8") in decode
  assert ("jax/einsum", "full 256") in decode


def test_stages_section_times_every_part_of_the_pallas_op(tmp_path):
  out = tmp_path / "bench_lte.json"
  result = subprocess.run(
      [sys.executable, "-m", "experiments.bench_lte", "--smoke", f"--out={out}",
       "--sections=stages", "--implementations=pallas:block_q=16;block_k=16,xla"],
      cwd=REPO, env=helpers.fast_env(), capture_output=True, text=True,
      timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  (row,) = json.loads(out.read_text())["stages"]         # the xla entry has no stages
  assert row["impl"] == "lte_jax/pallas:block_q=16;block_k=16"
  parts = ("prepare", "forward", "delta", "dq", "dkv_band", "dkv_far", "backward")
  assert all(row[p] > 0 for p in parts), row
