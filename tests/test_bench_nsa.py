"""experiments/bench_nsa.py runs end to end on CPU at a tiny shape (no timing asserted)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# No timing is asserted: XLA's costly optimisations (a third of the compile time, most of
# the run) are off, as tests/quick_compile.py does in process.
ENV = dict(os.environ, JAX_PLATFORMS="cpu", JAX_DISABLE_MOST_OPTIMIZATIONS="1")


def _run(*flags: str) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, "-m", "experiments.bench_nsa", *flags], cwd=REPO,
                        env=ENV, capture_output=True, text=True, timeout=300)


def test_smoke_run_checks_and_times_each_implementation(tmp_path):
  out = tmp_path / "bench_nsa.json"
  # 'missing' stands for an implementation this build does not register ('pallas' runs
  # interpreted on CPU: a minute of compiling). The check shape is the timed one, so the
  # check's compiled programs are the timing's.
  result = _run("--shapes=1x128x4x2x16", "--check_shape=1x128x4x2x16", "--block_size=16",
                "--block_count=3", "--window=31", "--reps=2", "--warmup=1", "--queued_calls=2",
                "--notorch", "--implementations=xla,missing", f"--out={out}")
  assert result.returncode == 0, result.stderr[-3000:]
  data = json.loads(out.read_text())
  assert data["environment"]["backend"] == "cpu" and data["environment"]["commit"]
  checks = {r["impl"]: r for r in data["checks"]}
  assert checks["lte_jax/missing"]["ok"] == "unavailable"
  xla = checks["lte_jax/xla"]
  assert xla["baseline"] == "lte_jax/reference" and xla["ok"] is True, xla
  assert all(0 < xla[n] < 1e-2 for n in ("o", "dq", "dk", "dv", "dgates")), xla
  rows = {(r["impl"], r["pass"]): r for r in data["results"]}
  assert set(rows) == {(f"lte_jax/{i}", p) for i in ("xla", "missing")
                       for p in ("fwd", "fwdbwd")}
  for p in ("fwd", "fwdbwd"):
    assert rows["lte_jax/missing", p]["status"] == "unavailable"
    timed = rows["lte_jax/xla", p]
    assert timed["status"] == "ok" and timed["ms"] > 0 and timed["queued_ms"] > 0, timed


def test_a_bad_shape_is_refused_naming_the_flag(tmp_path):
  result = _run("--shapes=4x4096x32x2", "--notorch", f"--out={tmp_path / 'x.json'}")
  assert result.returncode != 0
  assert "--shapes takes BxTxHqxHkvxD" in result.stderr, result.stderr[-2000:]
  assert not (tmp_path / "x.json").exists()
