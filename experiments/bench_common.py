"""Timing and checking helpers shared by the benchmark scripts (never used by tests)."""
from __future__ import annotations

import json
import os
import platform
import re
import statistics
import time
from typing import Any, Callable

import jax
import numpy as np


def rel_error(got, want) -> float:
  """||got - want|| / ||want|| in float64 (the device checks' error measure)."""
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  return float(np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-30))


def time_jax(fn: Callable[[], Any], *, warmup: int = 3, reps: int = 20,
             label: str | None = None) -> float:
  """Median wall time in ms of a jitted call, synchronising on its outputs. With a
  `label`, the first call's seconds (compilation, mostly) are printed as it ends: on a
  GPU a kernel's Triton compile can take minutes, and a run cut by its time limit must
  still say where it was."""
  start = time.perf_counter()
  jax.block_until_ready(fn())
  if label is not None:
    print(f"{label}: first call (compile + run) {time.perf_counter() - start:.1f} s", flush=True)
  for _ in range(warmup - 1):
    jax.block_until_ready(fn())
  times = []
  for _ in range(reps):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append((time.perf_counter() - start) * 1e3)
  return statistics.median(times)


def time_jax_queued(fn: Callable[..., Any], *, reps: int, calls: int = 20,
                    args_sets: list[tuple] | None = None) -> float:
  """Median ms per call of `calls` back-to-back dispatches with one sync at the end: the
  host's dispatch-and-sync round trip (0.1-0.5 ms a call on an H200 host) stays out,
  as in CUDA-event timings (triton's do_bench), so JAX and torch rows compare. Also for
  calls shorter than that round trip (decode steps). args_sets: fn takes one of these
  argument tuples, rotated call by call (inputs that together exceed the L2 cache, as
  do_bench flushes it); None: fn()."""
  call = (lambda i: fn()) if args_sets is None else (
      lambda i: fn(*args_sets[i % len(args_sets)]))
  for i in range(3):
    jax.block_until_ready(call(i))
  times = []
  for _ in range(max(reps // 4, 2)):
    start = time.perf_counter()
    outs = [call(i) for i in range(calls)]
    jax.block_until_ready(outs)
    times.append((time.perf_counter() - start) * 1e3 / calls)
  return statistics.median(times)


# The roofline of a device not in lte_jax.training.metrics' tables (CPU smoke runs): the
# H200's, the card the issues' bars are stated on.
H200_ROOFLINE = ("NVIDIA H200 (reference: this device is not listed)", 4.8e12, 989e12)


def roofline(device: Any = None) -> tuple[str, float, float]:
  """(card, HBM bytes/s, dense bf16 FLOP/s) of `device` (default: the first one), for a
  kernel's share of the roofline of the card it ran on; H200_ROOFLINE where unlisted."""
  from lte_jax.training import metrics
  device = device or jax.devices()[0]
  bandwidth, flops = metrics.peak_bandwidth(device), metrics.peak_flops(device)
  if bandwidth is None or flops is None:
    return H200_ROOFLINE
  return device.device_kind, bandwidth, flops


def device_time(fn: Callable[[], Any], label: str, *, calls: int, profile_dir: str,
                top: int = 8, key: str = "fwdbwd_device_ms") -> dict[str, Any]:
  """Summed kernel time per call of fn() (a jitted fwd+bwd) from a profiler trace of
  `calls` calls, written below profile_dir/<label>: {key: ms per call,
  'kernels': {name: ms per call} of the `top` longest kernels, also printed}. {} when
  calls <= 0 or off a GPU (no device planes to read) or when the trace holds no kernel."""
  if calls <= 0 or jax.default_backend() != "gpu":
    return {}
  from experiments import profile_summary
  out_dir = os.path.join(profile_dir, re.sub(r"[^A-Za-z0-9_.=-]", "_", label))
  path = profile_summary.trace_calls(fn, calls, out_dir)
  ops = profile_summary.op_times(path)
  if not ops:   # no device events: the profiler could not attach (CUPTI taken), not 0 ms
    return {}
  kernels = {r["name"]: round(r["total_ms"] / calls, 4) for r in ops[:top]}
  # Per kernel, as torch_device_ms prints the anchor's: the two lists side by side say
  # which of our kernels is behind which of theirs.
  for name, ms in kernels.items():
    print(f"  {label}: {ms:8.4f} ms  {name[:90]}", flush=True)
  return {key: sum(r["total_ms"] for r in ops) / calls, "kernels": kernels}


def torch_backward(out: Any, grad: Any, inputs: Any) -> None:
  """out.backward(grad) into fresh .grad buffers: `inputs`' grads are dropped first (a host
  step), so no gradient-accumulation kernel joins a timed torch backward; JAX's gradients
  are returned, never accumulated."""
  for x in inputs:
    x.grad = None
  out.backward(grad)


def torch_event_ms(fn: Callable[[], Any], reps: int) -> float:
  """Median ms of `reps` calls of fn() (a torch GPU computation, already warm), each
  between two CUDA events."""
  import torch
  times = []
  for _ in range(reps):
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    torch.cuda.synchronize()
    times.append(start.elapsed_time(end))
  return statistics.median(times)


def torch_device_ms(fn: Callable[[], Any], calls: int, trace_path: str,
                    top: int = 10) -> float | None:
  """Summed device time per call of fn() (a torch GPU computation) from torch's profiler:
  kernels, memcpys and memsets of `calls` calls, read from the Chrome trace it writes to
  trace_path. The torch counterpart of device_time: no host launch delay reaches it.
  Prints the `top` longest kernels per call. None when calls <= 0, torch has no GPU or the
  trace holds no device events."""
  import torch
  if calls <= 0 or not torch.cuda.is_available():
    return None
  from torch.profiler import ProfilerActivity, profile
  fn()
  torch.cuda.synchronize()
  with profile(activities=[ProfilerActivity.CUDA]) as prof:
    for _ in range(calls):
      fn()
    torch.cuda.synchronize()
  os.makedirs(os.path.dirname(os.path.abspath(trace_path)), exist_ok=True)
  prof.export_chrome_trace(trace_path)
  with open(trace_path) as f:
    events = json.load(f).get("traceEvents", [])
  per_name: dict[str, float] = {}
  for e in events:
    if e.get("ph") == "X" and e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset"):
      name = e.get("name", "?")
      per_name[name] = per_name.get(name, 0.0) + e.get("dur", 0)
  # Which of the anchor's kernels carry its time says where ours must catch up.
  for name, us in sorted(per_name.items(), key=lambda kv: -kv[1])[:top]:
    print(f"  {os.path.basename(trace_path)}: {us / 1e3 / calls:8.4f} ms  {name[:90]}")
  device_us = sum(per_name.values())
  return device_us / 1e3 / calls if device_us else None


def parse_implementation(entry: str) -> tuple[str, dict | None]:
  """A benchmark's implementation entry: 'pallas:block_q=64;num_warps=4' -> ('pallas',
  {'block_q': 64, 'num_warps': 4}); no ':' -> (entry, None). Integers are parsed,
  True/False/None too; anything else stays a string ('inverse_precision=tf32x3')."""
  name, _, spec = entry.partition(":")
  if not spec:
    return name, None
  from lte_jax.kernels.lowering import convert_value
  options = {}
  for item in filter(None, spec.split(";")):
    key, _, value = item.partition("=")
    options[key] = convert_value(value)
  return name, options


def environment() -> dict[str, Any]:
  env = {"jax": jax.__version__, "backend": jax.default_backend(),
         "device": jax.devices()[0].device_kind, "python": platform.python_version(),
         "date": time.strftime("%Y-%m-%d")}
  try:
    import torch
    env["torch"] = torch.__version__
    import triton
    env["triton"] = triton.__version__
    import fla
    env["fla"] = getattr(fla, "__version__", "?")
  except ImportError:
    pass
  return env


def print_table(rows: list[dict[str, Any]], columns: list[str], file=None) -> None:
  widths = {c: max([len(c)] + [len(_fmt(r.get(c))) for r in rows]) for c in columns}
  print(" | ".join(c.ljust(widths[c]) for c in columns), file=file)
  print("-+-".join("-" * widths[c] for c in columns), file=file)
  for r in rows:
    print(" | ".join(_fmt(r.get(c)).ljust(widths[c]) for c in columns), file=file, flush=True)


def _fmt(v: Any) -> str:
  if isinstance(v, float):
    return f"{v:.3f}" if v < 100 else f"{v:,.0f}"
  return "" if v is None else str(v)


def write_json(path: str, payload: dict[str, Any]) -> None:
  with open(path, "w") as f:
    json.dump(payload, f, indent=2)
  print(f"wrote {path}")


def anchor_ratios(rows: list[dict], round_: int) -> None:
  """vs_fla of round `round_`'s rows (bench_train --rounds): tokens/s over that round's FLA
  row's."""
  this = [r for r in rows if r["round"] == round_]
  anchor = next((r.get("tokens_per_s") for r in this if r["model"].startswith("FLA")), None)
  for r in this:
    if anchor and r.get("tokens_per_s"):
      r["vs_fla"] = r["tokens_per_s"] / anchor


def rounds_summary(rows: list[dict]) -> list[dict]:
  """Per model over the rounds: median, min and max of the step time and of vs_fla."""
  out = []
  for model in dict.fromkeys(r["model"] for r in rows):
    steps = [r["step_s"] for r in rows if r["model"] == model and r.get("step_s")]
    ratios = [r["vs_fla"] for r in rows if r["model"] == model and r.get("vs_fla")]
    if not steps:
      continue
    row = dict(model=model, rounds=len(steps), step_s_median=statistics.median(steps),
               step_s_min=min(steps), step_s_max=max(steps))
    if ratios:
      row.update(vs_fla_median=statistics.median(ratios), vs_fla_min=min(ratios),
                 vs_fla_max=max(ratios))
    out.append(row)
  return out
