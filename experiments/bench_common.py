"""Timing and checking helpers shared by the benchmark scripts (never used by tests)."""
from __future__ import annotations

import json
import platform
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


def print_table(rows: list[dict[str, Any]], columns: list[str]) -> None:
  widths = {c: max([len(c)] + [len(_fmt(r.get(c))) for r in rows]) for c in columns}
  print(" | ".join(c.ljust(widths[c]) for c in columns))
  print("-+-".join("-" * widths[c] for c in columns))
  for r in rows:
    print(" | ".join(_fmt(r.get(c)).ljust(widths[c]) for c in columns))


def _fmt(v: Any) -> str:
  if isinstance(v, float):
    return f"{v:.3f}" if v < 100 else f"{v:,.0f}"
  return "" if v is None else str(v)


def write_json(path: str, payload: dict[str, Any]) -> None:
  with open(path, "w") as f:
    json.dump(payload, f, indent=2)
  print(f"wrote {path}")
