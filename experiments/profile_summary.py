"""Where a jitted step's device time goes: trace a few calls, sum the kernels by name.

    python -m experiments.profile_summary PATH.xplane.pb [--top=30]

`trace_calls` runs a function under `jax.profiler.trace` and returns the trace file;
`op_times` reads it back with `jax.profiler.ProfileData` and adds up the events of the
accelerator's stream lines (kernels: XLA fusions, cuBLAS GEMMs, Pallas/Triton kernels by
their pallas_call names), so a benchmark can say which parts of a step hold the time
without TensorBoard. On a host without an accelerator there are no device planes; tests
read the host plane instead (`plane_prefix`).
"""
from __future__ import annotations

import collections
import glob
import os
from typing import Any, Callable, Iterable

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_integer("top", 30, "Rows of the table.")


def trace_calls(fn: Callable[[], Any], calls: int, out_dir: str) -> str:
  """Run fn() `calls` times (synchronising on each result) under the profiler; the
  path of the .xplane.pb trace written below out_dir."""
  import jax
  with jax.profiler.trace(out_dir):
    for _ in range(calls):
      jax.block_until_ready(fn())
  paths = sorted(glob.glob(os.path.join(out_dir, "**", "*.xplane.pb"), recursive=True),
                 key=os.path.getmtime)
  if not paths:
    raise FileNotFoundError(f"the profiler wrote no .xplane.pb below {out_dir}")
  return paths[-1]


def _stat(event, name: str):
  for key, value in event.stats:
    if key == name:
      return value
  return None


def op_times(path: str, *, plane_prefix: str = "/device:",
             line_filter: Callable[[str], bool] = lambda name: name.startswith("Stream"),
             ) -> list[dict]:
  """Per event name (kernel), summed over the planes whose name starts with plane_prefix
  and their lines that pass line_filter (by default a GPU's stream lines; when none pass,
  every line of the plane): rows dict(name, hlo_op, total_ms, count), longest first."""
  from jax.profiler import ProfileData
  data = ProfileData.from_file(path)
  totals: dict[str, list] = collections.defaultdict(lambda: [0.0, 0, None])
  for plane in data.planes:
    if not plane.name.startswith(plane_prefix):
      continue
    lines = list(plane.lines)
    chosen = [line for line in lines if line_filter(line.name)] or lines
    for line in chosen:
      for event in line.events:
        row = totals[event.name]
        row[0] += event.duration_ns / 1e6
        row[1] += 1
        row[2] = row[2] or _stat(event, "hlo_op")
  rows = [dict(name=name, hlo_op=op, total_ms=ms, count=n)
          for name, (ms, n, op) in totals.items()]
  return sorted(rows, key=lambda r: -r["total_ms"])


def per_call(rows: Iterable[dict], calls: int, top: int) -> list[dict]:
  """The `top` rows with ms per traced call and their share of all rows' time."""
  rows = list(rows)
  total = sum(r["total_ms"] for r in rows) or 1.0
  return [dict(r, ms_per_call=r["total_ms"] / calls, share=r["total_ms"] / total)
          for r in rows[:top]]


def main(argv):
  if len(argv) != 2:
    raise app.UsageError("usage: python -m experiments.profile_summary PATH.xplane.pb")
  from experiments import bench_common
  rows = per_call(op_times(argv[1]), 1, FLAGS.top)
  bench_common.print_table(rows, ["name", "hlo_op", "total_ms", "count", "share"])


if __name__ == "__main__":
  app.run(main)
