"""Write evaluation results: JSON, a Markdown table, a depth x length heatmap PNG.

``results`` layout (what experiments.eval_retrieval builds):
  {"run": {...}, "lengths": [L, ...],
   "tasks": {task: {str(L): {"score": 0-100, "num_samples": n, ...}}},
   "memory": {"cache_bytes_per_sequence": {str(L): bytes}}}
NIAH entries hold "samples": [{"depth": %, "hit": 0/1}] for the heatmap.
"""
from __future__ import annotations

import json
import os

import numpy as np


def write_json(results: dict, path: str) -> None:
  with open(path, "w") as f:
    json.dump(results, f, indent=2, sort_keys=True)


def _mib(n: int) -> str:
  return f"{n / 2**20:.3f}"


def markdown_table(results: dict) -> str:
  """Score per task and length, then the decode-cache memory row."""
  lengths = [str(n) for n in results["lengths"]]
  head = "| task | " + " | ".join(lengths) + " |"
  rule = "|---|" + "---|" * len(lengths)
  rows = [head, rule]
  for task, by_len in results["tasks"].items():
    cells = [f"{by_len[n]['score']:.1f}" if n in by_len else "-" for n in lengths]
    rows.append(f"| {task} | " + " | ".join(cells) + " |")
  mem = results["memory"]["cache_bytes_per_sequence"]
  rows.append("| decode cache per sequence (MiB) | " + " | ".join(_mib(mem[n]) for n in lengths)
              + " |")
  run = results.get("run", {})
  title = f"Retrieval scores (0-100) of {run.get('arch', '?')} at step {run.get('step', '?')}"
  return f"{title}\n\n" + "\n".join(rows) + "\n"


def depth_grid(samples_by_length: dict, lengths: list[str], bins: int) -> np.ndarray:
  """[len(lengths), bins] mean hit (0-100) per depth bin; NaN where a bin is empty."""
  grid = np.full((len(lengths), bins), np.nan)
  for i, n in enumerate(lengths):
    samples = samples_by_length.get(n, {}).get("samples", [])
    hits = [[] for _ in range(bins)]
    for s in samples:
      hits[min(int(s["depth"] / 100 * bins), bins - 1)].append(s["hit"])
    for j, h in enumerate(hits):
      if h:
        grid[i, j] = 100.0 * float(np.mean(h))
  return grid


def write_heatmap(results: dict, path: str, bins: int = 10) -> bool:
  """One panel per NIAH task: accuracy by context length (rows) and needle depth (columns).

  Returns False (and writes nothing) when no task has per-sample depths.
  """
  tasks = [t for t, by_len in results["tasks"].items()
           if any("samples" in v for v in by_len.values())]
  if not tasks:
    return False
  try:
    import matplotlib  # pylint: disable=g-import-not-at-top
    matplotlib.use("Agg")
    from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError("the heatmap needs matplotlib: pip install 'lte_jax[eval]'") from e
  lengths = [str(n) for n in results["lengths"]]
  fig, axes = plt.subplots(1, len(tasks), figsize=(4.5 * len(tasks) + 1, 0.5 * len(lengths) + 2.5),
                           squeeze=False, layout="constrained")
  for ax, task in zip(axes[0], tasks):
    grid = depth_grid(results["tasks"][task], lengths, bins)
    image = ax.imshow(grid, vmin=0, vmax=100, cmap="RdYlGn", aspect="auto")
    ax.set_xticks(range(bins), [f"{100 * j // bins}" for j in range(bins)])
    ax.set_yticks(range(len(lengths)), lengths)
    ax.set_xlabel("needle depth (%, bin start)")
    ax.set_ylabel("context length (tokens)")
    ax.set_title(task)
  fig.colorbar(image, ax=axes[0].tolist(), label="accuracy (%)")
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return True


def write_all(results: dict, out_dir: str) -> dict[str, str]:
  """results.json, results.md and (with NIAH tasks) niah_heatmap.png under ``out_dir``."""
  os.makedirs(out_dir, exist_ok=True)
  paths = {"json": os.path.join(out_dir, "results.json"),
           "markdown": os.path.join(out_dir, "results.md")}
  write_json(results, paths["json"])
  with open(paths["markdown"], "w") as f:
    f.write(markdown_table(results))
  png = os.path.join(out_dir, "niah_heatmap.png")
  if write_heatmap(results, png):
    paths["heatmap"] = png
  return paths
