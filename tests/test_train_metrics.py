"""Metrics: peak-FLOPs table, FLOPs per token, JSONL/TensorBoard writer, progress line, summary."""
from __future__ import annotations

import io
import json
import os
import types

import numpy as np
import pytest

from lte_jax import configs
from lte_jax.training import metrics


@pytest.mark.parametrize("kind,flops", [("NVIDIA H200", 989e12), ("NVIDIA H100 80GB HBM3", 989e12),
                                        ("NVIDIA A100-SXM4-80GB", 312e12), ("TPU v4", 275e12),
                                        ("TPU v5 lite", 197e12), ("TPU v5p", 459e12),
                                        ("TPU v6 lite", 918e12), ("cpu", None)])
def test_peak_flops_by_device_kind(kind, flops):
  assert metrics.peak_flops(types.SimpleNamespace(device_kind=kind)) == flops


@pytest.mark.parametrize("kind,bandwidth", [
    ("NVIDIA H200", 4.8e12), ("NVIDIA H100 80GB HBM3", 3.35e12), ("NVIDIA H100 PCIe", 2.0e12),
    ("NVIDIA GH200 480GB", 4.0e12), ("NVIDIA A100-SXM4-80GB", 2.039e12), ("cpu", None)])
def test_peak_bandwidth_by_device_kind(kind, bandwidth):
  """More specific names win: GH200 is not an H200, an H100 PCIe not an SXM H100."""
  assert metrics.peak_bandwidth(types.SimpleNamespace(device_kind=kind)) == bandwidth


def test_flops_per_token_is_6n_plus_attention():
  cfg = configs.get_config("transformer", "tiny", num_layers=2)
  n, t = 1_000_000, 256
  a = cfg.attn
  attention = 2 * 3 * 4 * ((t + 1) / 2) * a.num_heads * a.head_dim  # 2 layers, fwd+bwd
  assert metrics.flops_per_token(cfg, n, t) == pytest.approx(6 * n + attention)
  swa = configs.get_config("GDN_SWA", "tiny", num_layers=2)
  # The window caps the context of the sliding-window layer.
  long_seq = metrics.flops_per_token(swa, n, 4096) - metrics.flops_per_token(swa, n, 2048)
  assert long_seq == pytest.approx(0.0)
  assert metrics.flops_per_token(swa, n, 32) < metrics.flops_per_token(swa, n, 256)


def test_writer_logs_scalars_per_layer_arrays_and_truncates_on_resume(tmp_path):
  workdir = str(tmp_path)
  writer = metrics.MetricsWriter(workdir, lte_layers=(1, 3), tensorboard=True)
  for step in (1, 2, 3):
    writer.write(step, dict(loss=np.float32(5.0 - step), lr=np.float32(1e-3),
                            skipped=np.bool_(False), kept=np.array([[2.0, 4.0], [6.0, 8.0]]),
                            lam=np.array([[1e-9, 1e-9], [2e-9, 4e-9]])))
  writer.close()
  records = [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl"))]
  assert [r["step"] for r in records] == [1, 2, 3]
  assert records[0]["loss"] == 4.0 and records[0]["skipped"] == 0.0
  assert records[0]["lte/kept/layer1"] == 3.0 and records[0]["lte/kept/layer3"] == 7.0
  assert records[0]["lte/lam/layer3"] == pytest.approx(3e-9)
  assert records[0]["kept"] == [[2.0, 4.0], [6.0, 8.0]]
  assert records[0]["lam"][0][0] == pytest.approx(1e-9)
  assert any(f.startswith("events.out.tfevents") for f in os.listdir(tmp_path / "tensorboard"))
  # A run resumed from step 1 drops what the first run logged after it.
  writer = metrics.MetricsWriter(workdir, tensorboard=False, resume_step=1)
  writer.write(2, dict(loss=9.0))
  writer.close()
  records = [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl"))]
  assert [(r["step"], r["loss"]) for r in records] == [(1, 4.0), (2, 9.0)]


def test_progress_prints_lines_when_not_a_terminal():
  stream = io.StringIO()
  progress = metrics.Progress(total_steps=100, start_step=0, stream=stream)
  progress.mark(1)
  progress.update(50, 3.25, 12345.0)
  progress.update(100, 3.0, 12000.0)
  progress.close()
  lines = stream.getvalue().splitlines()
  assert len(lines) == 2 and "\r" not in stream.getvalue()
  assert "step 50/100" in lines[0] and "loss 3.2500" in lines[0] and "12,345 tok/s" in lines[0]
  assert "ETA" in lines[0]
  silent = io.StringIO()
  metrics.Progress(10, 0, enabled=False, stream=silent).update(5, 1.0, 1.0)
  assert silent.getvalue() == ""


def test_summary_names_the_numbers():
  text = metrics.summary(steps=300, start_step=100, tokens=409600, seconds=125.0, final_loss=2.5,
                         skipped=1, tokens_per_s=4000.0, checkpoints=[200, 300],
                         workdir="/w", mfu=0.41)
  for part in ("100 -> 300", "200 this run", "1 skipped", "409,600", "02:05", "2.5000",
               "4,000 tokens/s", "MFU 41.0%", "[200, 300]", "/w/checkpoints"):
    assert part in text, part
  assert metrics.format_duration(3725) == "1:02:05"
