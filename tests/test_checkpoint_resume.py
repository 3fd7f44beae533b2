"""Killed and resumed training reproduces the uninterrupted run (subprocesses of the real CLI).

Run A trains the tiny run's 16 steps in one go. Run B is stopped with SIGTERM
(it must save and exit cleanly), resumed and killed with SIGKILL between two
periodic saves (no chance to save), and resumed again to the end. B's losses
must equal A's at every step.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import numpy as np
import pytest

from tests import helpers

REPO = helpers.REPO
STEPS = helpers.TINY_STEPS
FLAGS = helpers.TINY_RUN_FLAGS  # every step logged, saved every 4
# Both runs compile under the same (fast-compiling) flags, so they are bitwise comparable.
ENV = helpers.fast_env()


def command(workdir):
  return helpers.train_command(workdir, *FLAGS)


def losses(workdir) -> dict[int, float]:
  out = {}
  path = os.path.join(workdir, "metrics.jsonl")
  if os.path.exists(path):
    with open(path) as f:
      for line in f:
        if line.strip():
          record = json.loads(line)
          assert record["step"] not in out, f"step {record['step']} logged twice"
          out[record["step"]] = record["loss"]
  return out


def start_and_signal(workdir, after_step: int, sig: int) -> subprocess.CompletedProcess:
  """Start a run and send ``sig`` once it has logged ``after_step``."""
  proc = subprocess.Popen(command(workdir), cwd=REPO, env=ENV, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
  deadline = time.time() + 240
  try:
    while proc.poll() is None and time.time() < deadline:
      logged = losses(workdir) if os.path.exists(os.path.join(workdir, "metrics.jsonl")) else {}
      if logged and max(logged) >= after_step:
        proc.send_signal(sig)
        break
      time.sleep(0.01)
    stdout, stderr = proc.communicate(timeout=120)
  finally:
    if proc.poll() is None:
      proc.kill()
  return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
  result = losses(helpers.tiny_run(tmp_path_factory))
  assert sorted(result) == list(range(1, STEPS + 1))
  return result


@pytest.mark.xdist_group("tiny_run")
def test_sigterm_then_sigkill_then_resume_reproduces_the_uninterrupted_losses(
    uninterrupted, tmp_path):
  workdir = tmp_path / "b"
  ckpt_dir = workdir / "checkpoints"

  term = start_and_signal(workdir, 3, signal.SIGTERM)
  assert term.returncode == 0, term.stderr[-3000:]
  assert "stopping at step" in term.stderr
  stopped_at = max(losses(workdir))
  assert stopped_at < STEPS
  assert str(stopped_at) in os.listdir(ckpt_dir), os.listdir(ckpt_dir)  # saved on the way out
  assert "run summary" in term.stdout

  # Past the periodic save at 8 (4 after a stop at 3), well before the end.
  kill = start_and_signal(workdir, stopped_at + 6, signal.SIGKILL)
  assert kill.returncode == -signal.SIGKILL, kill.stderr[-3000:]
  assert f"restored checkpoint {ckpt_dir / str(stopped_at)}" in kill.stderr
  killed_at = max(losses(workdir))
  assert stopped_at < killed_at < STEPS

  final = subprocess.run(command(workdir), cwd=REPO, env=ENV, capture_output=True, text=True,
                         timeout=300)
  assert final.returncode == 0, final.stderr[-3000:]
  assert "restored checkpoint" in final.stderr
  resumed = losses(workdir)
  assert sorted(resumed) == list(range(1, STEPS + 1))
  steps = sorted(uninterrupted)
  np.testing.assert_allclose([resumed[s] for s in steps], [uninterrupted[s] for s in steps],
                             rtol=1e-6)
