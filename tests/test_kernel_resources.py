"""experiments/kernel_resources.py: the TTIR hook works on this jax for the GDN and LTE
kernels, and (with the Triton wheel, the 'ptx' extra) the kernels compile for sm_90 with
their resources read back."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest

from lte_jax.kernels.gated_delta_rule.backend import GPU_SHARED_MEMORY

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KERNELS = {"gdn_wy_inverse", "gdn_wy_transform", "gdn_chunk_states", "gdn_chunk_outputs",
           "gdn_local_value_grads", "gdn_chunk_state_grads", "gdn_chunk_qk_grads",
           "gdn_wy_grads"}


def _run(tmp_path, *flags, shape="1x128x2x256"):
  out = tmp_path / "resources.json"
  result = subprocess.run(
      [sys.executable, "-m", "experiments.kernel_resources", f"--shapes={shape}",
       f"--out={out}", *flags],
      cwd=REPO, env=dict(os.environ, JAX_PLATFORMS="cpu"), capture_output=True, text=True,
      timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  return json.loads(out.read_text())["rows"]


def test_every_kernel_is_captured_once_with_its_launch(tmp_path):
  # fuse_wy=False: the W / U path runs every kernel (the default has no WY transform).
  rows = _run(tmp_path, "--nocompile",
              "--implementations=pallas:fuse_wy=False;decay_on=values;recurrence_block_v=64;"
              "launch=gdn_wy_inverse=2/1")
  launch = {r["kernel"]: (r["warps"], r["stages"]) for r in rows}
  assert len(rows) == len(launch) and set(launch) == KERNELS
  assert launch["gdn_wy_inverse"] == (2, 1)           # the launch entry
  assert launch["gdn_chunk_states"][1] == 2           # value side at Dk = 256: capped stages
  assert all("regs" not in r for r in rows)


def test_lte_attention_kernels_are_captured(tmp_path):
  rows = _run(tmp_path, "--nocompile", "--op=lte", "--window=64", shape="1x256x2x64")
  assert {r["kernel"] for r in rows} == {"lte_attention_fwd", "lte_attention_dq",
                                         "lte_attention_dkv_band", "lte_attention_dkv_far"}


def test_nsa_kernels_are_captured_with_their_gpu_launch(tmp_path):
  rows = _run(tmp_path, "--nocompile", "--op=nsa", "--kv_heads=1", "--block_size=16",
              "--block_count=3", shape="1x64x2x16")
  launch = {r["kernel"]: (r["warps"], r["stages"]) for r in rows}
  assert launch == {"nsa_selected_fwd": (2, 2), "nsa_selected_dq": (2, 2),
                    "nsa_selected_dkv": (4, 2)}


@pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                    reason="needs the Triton wheel (pip install -e '.[ptx]')")
def test_kernels_compile_and_report_resources(tmp_path):
  rows = _run(tmp_path, "--kernels=gdn_chunk_(states|outputs)$")
  assert {r["kernel"] for r in rows} == {"gdn_chunk_states", "gdn_chunk_outputs"}
  for r in rows:
    assert "error" not in r, r
    assert 0 < r["regs"] <= 255 and r["stack"] >= 0 and 0 < r["shared"] <= GPU_SHARED_MEMORY, r
