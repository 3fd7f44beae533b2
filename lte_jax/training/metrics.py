"""Training metrics: a JSONL file and TensorBoard events, a progress line, FLOPs and MFU.

MFU = model FLOPs per second / peak bf16 FLOPs of the devices. Model FLOPs per
token = 6 x parameters (forward + backward of every matmul) + the mixers'
sequence-dependent work, which 6N leaves out (see ``flops_per_token``).
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import Any, Callable, Mapping

import jax
import numpy as np
from absl import logging

from lte_jax import configs as configs_lib

# Dense bf16 peak FLOP/s per device, matched against jax.Device.device_kind
# (first substring hit wins, so more specific names come first).
PEAK_BF16_FLOPS: tuple[tuple[str, float], ...] = (
    ("H200", 989e12),
    ("H100", 989e12),
    ("H800", 989e12),
    ("GH200", 989e12),
    ("B200", 2250e12),
    ("A100", 312e12),
    ("A800", 312e12),
    ("L40S", 362e12),
    ("L4", 121e12),
    ("A10", 125e12),
    ("TPU v6 lite", 918e12),   # v6e
    ("TPU v6e", 918e12),
    ("TPU v5 lite", 197e12),   # v5e
    ("TPU v5e", 197e12),
    ("TPU v5p", 459e12),
    ("TPU v5", 459e12),
    ("TPU v4", 275e12),
    ("TPU v3", 123e12),
)


# HBM bandwidth per device (bytes/s), matched as PEAK_BF16_FLOPS (GH200 before H200, the
# PCIe H100 before the SXM one): the memory side of a kernel's roofline.
PEAK_HBM_BYTES_PER_S: tuple[tuple[str, float], ...] = (
    ("GH200", 4.0e12),
    ("H200", 4.8e12),
    ("H100 PCIe", 2.0e12),
    ("H100", 3.35e12),
    ("H800", 3.35e12),
    ("B200", 8.0e12),
    ("A100-SXM4-80GB", 2.039e12),
    ("A100", 1.555e12),
)


def _by_device_kind(table: tuple[tuple[str, float], ...], device: jax.Device) -> float | None:
  kind = getattr(device, "device_kind", "").lower()
  for name, value in table:
    if name.lower() in kind:
      return value
  return None


def peak_flops(device: jax.Device) -> float | None:
  """Peak bf16 FLOP/s of one device, or None when unknown (CPU, unlisted chips)."""
  return _by_device_kind(PEAK_BF16_FLOPS, device)


def peak_bandwidth(device: jax.Device) -> float | None:
  """HBM bytes/s of one device, or None when unknown (CPU, unlisted chips)."""
  return _by_device_kind(PEAK_HBM_BYTES_PER_S, device)


def _mixer_flops(mixer: str, cfg: configs_lib.ModelConfig, seq_len: int) -> float:
  """Forward FLOPs per token of a mixer's sequence-dependent part (not its projections)."""
  if mixer in ("attn", "swa", "lte"):
    sub = {"attn": cfg.attn, "swa": cfg.swa, "lte": cfg.lte}[mixer]
    # Mean keys per query under a causal mask: (T + 1) / 2 for full attention,
    # capped by the window for SWA. LTE trains on the dense causal mask (its
    # retention gates keys softly), so it costs what full attention costs.
    context = (seq_len + 1) / 2
    if mixer == "swa":
      context = min(context, sub.window_size)
    return 4.0 * context * sub.num_heads * sub.head_dim  # QK^T and PV
  if mixer == "nsa":
    n = cfg.nsa
    # Per query, the work of the algorithm (the XLA path does more, see ops/nsa_attention):
    # ~T / (2 x block) complete compressed blocks, the tokens of block_count blocks (at
    # most the causal context) and the window.
    causal = (seq_len + 1) / 2
    context = seq_len / (2 * n.block_size) + min(n.block_count * n.block_size, causal)
    if n.window_size is not None:
      context += min(causal, n.window_size)
    return 4.0 * context * n.num_heads * n.head_dim
  if mixer == "gdn":
    g = cfg.gdn
    dk, dv, c = g.head_dim, g.head_v_dim, min(g.chunk_size, seq_len)
    # Chunked delta rule: state read + update (2 x 2 Dk Dv) plus intra-chunk
    # attention over ~c/2 earlier tokens of the chunk on keys and values.
    return g.num_heads * (4.0 * dk * dv + 2.0 * (c / 2) * (dk + dv) * 2)
  raise ValueError(f"unknown mixer {mixer!r}")


def flops_per_token(cfg: configs_lib.ModelConfig, num_params: int, seq_len: int) -> float:
  """Training FLOPs per token: 6N + 3 x the mixers' sequence-dependent forward FLOPs."""
  seq = sum(_mixer_flops(m, cfg, seq_len) for m in cfg.layers)
  return 6.0 * num_params + 3.0 * seq


def format_duration(seconds: float) -> str:
  seconds = max(0, int(seconds))
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


class Progress:
  """A one-line progress display: \\r-updated on a terminal, plain log lines otherwise."""

  def __init__(self, total_steps: int, start_step: int, enabled: bool = True, stream=None):
    self.total = total_steps
    self.start = start_step
    self.enabled = enabled
    self.stream = stream or sys.stdout
    self.tty = self.stream.isatty()
    self.mark(start_step)

  def mark(self, step: int) -> None:
    """Measure the ETA from here (call after the compiling first step)."""
    self.start, self.t0 = step, time.time()

  def update(self, step: int, loss: float, tokens_per_s: float,
             val_loss: float | None = None) -> None:
    if not self.enabled:
      return
    done = step - self.start
    elapsed = time.time() - self.t0
    eta = elapsed / done * (self.total - step) if done > 0 else float("nan")
    width = 24
    filled = int(width * step / max(self.total, 1))
    val = f"val {val_loss:.4f} (ppl {perplexity(val_loss):.2f}) " if val_loss is not None else ""
    line = (f"[{'#' * filled}{'.' * (width - filled)}] step {step}/{self.total} "
            f"loss {loss:.4f} {tokens_per_s:,.0f} tok/s {val}"
            f"ETA {format_duration(eta) if math.isfinite(eta) else '--:--'}")
    if self.tty:
      self.stream.write("\r" + line)
      self.stream.flush()
    else:
      self.stream.write(line + "\n")
      self.stream.flush()

  def close(self) -> None:
    if self.enabled and self.tty:
      self.stream.write("\n")
      self.stream.flush()


def perplexity(loss: float) -> float:
  """exp(mean cross entropy); inf where exp overflows."""
  return math.exp(loss) if loss < 700 else math.inf


def _scalars(metrics: Mapping[str, Any], lte_layers: tuple[int, ...]) -> dict[str, float]:
  """Flatten [L, H] per-layer arrays into per-layer scalars (mean over KV heads)."""
  out = {}
  for key, value in metrics.items():
    value = np.asarray(value)
    if value.ndim == 0:
      out[key] = float(value)
    elif value.ndim == 2 and value.shape[0] == len(lte_layers):
      for layer, row in zip(lte_layers, value):
        out[f"lte/{key}/layer{layer}"] = float(row.mean())
  return out


class MetricsWriter:
  """Appends one JSON object per logged step to ``metrics.jsonl`` and writes TensorBoard events.

  Only process 0 writes. ``resume_step`` truncates records after it, so the
  file of a resumed run reads as if it had never stopped.
  """

  def __init__(self, workdir: str, *, lte_layers: tuple[int, ...] = (),
               tensorboard: bool = True, resume_step: int = 0):
    self.active = jax.process_index() == 0
    self.lte_layers = lte_layers
    self.path = os.path.join(workdir, "metrics.jsonl")
    self._tb = None
    if not self.active:
      return
    os.makedirs(workdir, exist_ok=True)
    self._truncate(resume_step)
    self._file = open(self.path, "a")
    if tensorboard:
      import tensorboardX  # deferred: only the writer process needs it
      self._tb = tensorboardX.SummaryWriter(os.path.join(workdir, "tensorboard"),
                                            purge_step=resume_step + 1 if resume_step else None)

  def _truncate(self, resume_step: int) -> None:
    if not os.path.exists(self.path):
      return
    with open(self.path) as f:
      keep = [line for line in f if line.strip() and json.loads(line)["step"] <= resume_step]
    with open(self.path, "w") as f:
      f.writelines(keep)

  def write(self, step: int, metrics: Mapping[str, Any]) -> dict[str, float]:
    """Log ``metrics`` (scalars and [L, H] LTE arrays) at ``step``; returns the scalars."""
    scalars = _scalars(metrics, self.lte_layers)
    if not self.active:
      return scalars
    record = {"step": int(step), **scalars}
    for key in ("kept", "lam"):
      if key in metrics and np.ndim(metrics[key]) == 2:
        record[key] = np.asarray(metrics[key], np.float64).tolist()
    self._file.write(json.dumps(record) + "\n")
    self._file.flush()
    if self._tb is not None:
      for key, value in scalars.items():
        self._tb.add_scalar(key, value, step)
    return scalars

  def close(self) -> None:
    if not self.active:
      return
    self._file.close()
    if self._tb is not None:
      self._tb.close()


class TrainLogger:
  """What the train loop reports: metrics every ``log_every`` steps, progress, throughput, MFU.

  The first step of a run compiles; it is timed apart and left out of tokens/s.
  ``flops_per_token`` and ``peak_flops`` (of all devices together, None when
  unknown) give MFU. ``bad_records`` (e.g. the data iterator's) returns the
  corpus records skipped so far (``lte_jax.data.BadRecords``): logged as
  ``data/bad_records``, warned about when it grows, and in the summary.
  """

  def __init__(self, workdir: str, *, total_steps: int, start_step: int, tokens_per_step: int,
               log_every: int, lte_layers: tuple[int, ...] = (), flops_per_token: float = 0.0,
               peak_flops: float | None = None, progress: bool = True, tensorboard: bool = True,
               bad_records: Callable[[], Any] | None = None):
    if not isinstance(log_every, int) or log_every < 1:
      raise ValueError(f"log.every must be a positive integer, got {log_every!r}")
    self.total, self.start, self.every = total_steps, start_step, log_every
    self.tokens_per_step = tokens_per_step
    self.flops_per_token, self.peak = flops_per_token, peak_flops
    main = jax.process_index() == 0
    self.writer = MetricsWriter(workdir, lte_layers=lte_layers, tensorboard=tensorboard,
                                resume_step=start_step)
    self.progress = Progress(total_steps, start_step, enabled=progress and main)
    self.t_start = self.t_steady = self.t_last = self.t_end = time.time()
    self.last_step = start_step + 1
    self.loss, self.rate, self.mfu = float("nan"), float("nan"), None
    self.skipped = 0
    self.bad_records, self.bad = bad_records, 0
    self.validation: tuple[int, float] | None = None  # (step, val/loss) of the newest

  def step_done(self, step: int, state: Any, metrics: Mapping[str, Any],
                validation: Mapping[str, float] | None = None) -> None:
    """Record ``step``; ``validation`` (lte_jax.training.evaluation, run after this step)
    is written with it whatever log.every says, its 'val/seconds' left out of tokens/s."""
    if step == self.start + 1:
      jax.block_until_ready(state)
      self.t_steady = self.t_last = time.time()
      self.progress.mark(step)
      logging.info("first step (with compilation) took %.1f s", self.t_last - self.t_start)
    elif validation is not None:
      pause = validation.get("val/seconds", 0.0)
      self.t_steady, self.t_last, self.progress.t0 = (
          self.t_steady + pause, self.t_last + pause, self.progress.t0 + pause)
    if validation is not None:
      self.validation = (step, float(validation["val/loss"]))
    elif step % self.every and step != self.total:
      return
    metrics = dict(jax.device_get(metrics))
    metrics.update(validation or {})
    if self.bad_records is not None:
      metrics["data/bad_records"] = self.bad_records().count
    if step > self.last_step:
      self.rate = self.tokens_per_step * (step - self.last_step) / (time.time() - self.t_last)
      metrics["tokens_per_s"] = self.rate
      if self.peak:
        self.mfu = metrics["mfu"] = self.rate * self.flops_per_token / self.peak
    scalars = self.writer.write(step, metrics)
    self.loss = scalars["loss"]
    skipped = int(scalars.get("skipped_total", 0))
    if skipped > self.skipped:
      logging.warning("step %d: %d step(s) skipped so far for non-finite gradients", step, skipped)
      self.skipped = skipped
    bad = int(scalars.get("data/bad_records", 0))
    if bad > self.bad:
      logging.warning("step %d: bad data records: %s", step, self.bad_records().describe())
      self.bad = bad
    self.progress.update(step, self.loss, self.rate,
                         self.validation[1] if self.validation else None)
    self.t_last, self.last_step = time.time(), step

  def stop_clock(self) -> None:
    self.t_end = time.time()

  def summary(self, step: int, *, skipped: int, checkpoints: list[int], workdir: str) -> str:
    steady = max(step - self.start - 1, 0)
    rate = (steady * self.tokens_per_step / (self.t_end - self.t_steady)
            if steady and self.t_end > self.t_steady else self.rate)
    return summary(steps=step, start_step=self.start,
                   tokens=(step - self.start) * self.tokens_per_step,
                   seconds=self.t_end - self.t_start, final_loss=self.loss, skipped=skipped,
                   tokens_per_s=rate, checkpoints=checkpoints, workdir=workdir, mfu=self.mfu,
                   validation=self.validation,
                   bad_records=self.bad_records() if self.bad_records else None)

  def close(self) -> None:
    self.progress.close()
    self.writer.close()


def summary(*, steps: int, start_step: int, tokens: int, seconds: float, final_loss: float,
            skipped: int, tokens_per_s: float, checkpoints: list[int], workdir: str,
            mfu: float | None, validation: tuple[int, float] | None = None,
            bad_records: Any = None) -> str:
  """The end-of-run report (throughput leaves out the first, compiling step and the
  evaluations); ``validation``: (step, val/loss) of the newest evaluation;
  ``bad_records``: the corpus records skipped (``lte_jax.data.BadRecords``)."""
  rate = tokens_per_s
  lines = [
      "run summary",
      f"  steps        {start_step} -> {steps} ({steps - start_step} this run, {skipped} skipped)",
      f"  tokens       {tokens:,} this run",
      f"  time         {format_duration(seconds)} ({seconds:.1f} s, compilation included)",
      f"  final loss   {final_loss:.4f}",
      *([f"  val loss     {validation[1]:.4f} (ppl {perplexity(validation[1]):.2f}) at step "
         f"{validation[0]}"] if validation else []),
      f"  throughput   {rate:,.0f} tokens/s" + (f", MFU {mfu:.1%}" if mfu is not None else ""),
      f"  checkpoints  {checkpoints if checkpoints else 'none'} in {workdir}/checkpoints",
      *([f"  bad records  {bad_records.describe()}"] if bad_records is not None else []),
  ]
  return "\n".join(lines)
