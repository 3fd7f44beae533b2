"""Write evaluation results: JSON, a Markdown table, a depth x length heatmap PNG.

``results`` layout (what experiments.eval_retrieval builds):
  {"run": {...}, "lengths": [L, ...],
   "tasks": {task: {str(L): {"score": 0-100, "num_samples": n, "chance": 0-100 or None,
                             "chance_basis": str, ...}}},
   "memory": {"cache_bytes_per_sequence": {str(L): bytes}}}
NIAH entries hold "samples": [{"depth": %, "hit": 0/1}] for the heatmap. The table's
last column is each task's chance level, so a score near zero reads against it.
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


def _chance_cell(by_len: dict) -> str:
  """The chance levels of a task's entries: one value, a range, '~0' or '-' (unknown)."""
  levels = sorted({e["chance"] for e in by_len.values() if e.get("chance") is not None})
  if not levels:
    return "-"
  show = lambda c: "~0" if c < 0.005 else f"{c:.2g}"
  return show(levels[0]) if len(levels) == 1 else f"{show(levels[0])}-{show(levels[-1])}"


def markdown_table(results: dict) -> str:
  """Score per task and length with the task's chance level, the decode-cache memory row,
  then what each chance level is the score of."""
  lengths = [str(n) for n in results["lengths"]]
  head = "| task | " + " | ".join(lengths) + " | chance |"
  rule = "|---|" + "---|" * (len(lengths) + 1)
  rows, notes = [head, rule], []
  for task, by_len in results["tasks"].items():
    cells = [f"{by_len[n]['score']:.1f}" if n in by_len else "-" for n in lengths]
    rows.append(f"| {task} | " + " | ".join(cells) + f" | {_chance_cell(by_len)} |")
    bases = {n: e["chance_basis"] for n, e in by_len.items() if "chance_basis" in e}
    if len(set(bases.values())) == 1:
      notes.append(f"- {task}: {next(iter(bases.values()))}")
    elif bases:
      notes.append(f"- {task}: " + "; ".join(f"at {n}: {b}" for n, b in bases.items()))
  mem = results["memory"]["cache_bytes_per_sequence"]
  rows.append("| decode cache per sequence (MiB) | " + " | ".join(_mib(mem[n]) for n in lengths)
              + " | |")
  run = results.get("run", {})
  title = f"Retrieval scores (0-100) of {run.get('arch', '?')} at step {run.get('step', '?')}"
  text = f"{title}\n\n" + "\n".join(rows) + "\n"
  if notes:
    text += ("\nchance: the score (0-100) of guessing the answer uniformly at random\n"
             + "\n".join(notes) + "\n")
  return text


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
