"""examples/: the custom-model example runs as a script at a few steps (training with the LTE
regulariser and controller, then decoding through the layers' caches equal to the forward)."""
from __future__ import annotations

import math
import os
import re
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Fast compiles (this checks plumbing, not speed); XLA's CPU fusion emitters off halves the
# compile time of the example's small programs.
ENV = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_backend_optimization_level=0 "
           "--xla_llvm_disable_expensive_passes=true --xla_cpu_use_fusion_emitters=false")


def test_custom_model_trains_and_decodes_as_its_forward():
  done = subprocess.run([sys.executable, "examples/custom_model.py", "--steps=4"], cwd=REPO,
                        env=ENV, capture_output=True, text=True, timeout=300)
  assert done.returncode == 0, done.stderr[-3000:]
  lines = done.stdout.splitlines()
  steps = [re.match(r"step +(\d+)  copy loss (\S+)  kept (\S+) of 24 \(target 4.0\)  "
                    r"lambda (\S+)$", line) for line in lines[:-1]]
  assert len(steps) == 4 and all(steps), lines
  assert all(math.isfinite(float(m[2])) for m in steps)
  # Every token is kept at the start (scorer bias 0.5), above the target of 4 per row of 24,
  # so the controller raised lambda by 1.5 after step 3 (interval 4).
  assert [m[4] for m in steps] == ["1.00e-09"] * 3 + ["1.50e-09"]
  assert all(float(m[3]) > 4 for m in steps)
  last = re.fullmatch(r"max \|decode - forward\| logit difference over 22 tokens: (\S+)",
                      lines[-1])
  assert last and float(last[1]) < 1e-4, lines[-1]
