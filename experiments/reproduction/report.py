"""The study's report: tables and plots from every model's study_eval.json and metrics.jsonl.

``write(workdir)`` reads WORKDIR/study.json, runs/*/study_eval.json, metrics.jsonl and
train_time.json, and writes WORKDIR/report/: results.json (everything gathered),
report.md (the tables REPRODUCTION.md quotes) and PNG plots (accuracy against length,
training and validation loss, LTE kept counts and lambdas over training, the LTE keep map
of one NIAH prompt).
"""
from __future__ import annotations

import glob
import json
import os
from collections import defaultdict

import numpy as np

from experiments.reproduction.preset import STUDY_ARCHS
from lte_jax.data.retrieval import NIAH_TASKS

_ARCH_ORDER = {a: i for i, a in enumerate(STUDY_ARCHS)}


def _read_jsonl(path: str) -> list[dict]:
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def gather(workdir: str) -> dict:
  """{'study': study.json, 'runs': {name: {'eval', 'metrics', 'time'}}} of a study folder."""
  with open(os.path.join(workdir, "study.json")) as f:
    study = json.load(f)
  runs = {}
  for path in sorted(glob.glob(os.path.join(workdir, "runs", "*"))):
    name = os.path.basename(path)
    entry = {"metrics": _read_jsonl(os.path.join(path, "metrics.jsonl"))}
    for key, file in (("eval", "study_eval.json"), ("time", "train_time.json")):
      if os.path.exists(os.path.join(path, file)):
        with open(os.path.join(path, file)) as f:
          entry[key] = json.load(f)
    runs[name] = entry
  return {"study": study, "runs": runs}


def _by_arch(runs: dict) -> dict[str, list[dict]]:
  out = defaultdict(list)
  for entry in runs.values():
    if "eval" in entry:
      out[entry["eval"]["arch"]].append(entry)
  return dict(sorted(out.items(), key=lambda kv: _ARCH_ORDER.get(kv[0], 99)))


def _cell(values: list[float], cis: list[tuple[float, float]] | None = None) -> str:
  """'mean' for one seed with its interval, 'mean (a / b)' over seeds."""
  if len(values) == 1:
    lo, hi = cis[0] if cis else (None, None)
    return f"{values[0]:.1f}" + (f" [{lo:.1f}-{hi:.1f}]" if lo is not None else "")
  return f"{np.mean(values):.1f} (" + " / ".join(f"{v:.1f}" for v in values) + ")"


def niah_table(gathered: dict) -> str:
  lengths = [m * gathered["study"]["preset"]["seq_len"]
             for m in gathered["study"]["preset"]["eval_multiples"]]
  cols = [(t, n) for t in NIAH_TASKS for n in lengths]
  head = "| arch | " + " | ".join(f"{t.replace('niah_single_', 'S-NIAH-')} @{n}" for t, n in cols)
  lines = [head + " |", "|---" * (len(cols) + 1) + "|"]
  for arch, entries in _by_arch(gathered["runs"]).items():
    cells = []
    for t, n in cols:
      e = [x["eval"]["niah"][f"{t}@{n}"] for x in entries]
      cells.append(_cell([v["teacher_forced"] for v in e], [tuple(v["ci95"]) for v in e]))
    lines.append(f"| {arch} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def greedy_table(gathered: dict) -> str:
  n = gathered["study"]["preset"]["seq_len"]
  lines = ["| arch | " + " | ".join(f"{t.replace('niah_single_', 'S-NIAH-')} greedy / "
                                    "teacher-forced" for t in NIAH_TASKS)
           + " | agreement | decode vs forward (rel. max, argmax agree) |",
           "|---" * (len(NIAH_TASKS) + 3) + "|"]
  for arch, entries in _by_arch(gathered["runs"]).items():
    cells = []
    for t in NIAH_TASKS:
      e = [x["eval"]["niah"][f"{t}@{n}"] for x in entries]
      cells.append(" ; ".join(f"{v.get('greedy', float('nan')):.0f} / {v['teacher_forced']:.0f}"
                              for v in e))
    agree = " ; ".join(f"{x['eval']['greedy_vs_teacher_forced_agreement']:.0f}%"
                       for x in entries)
    dec = " ; ".join(f"{x['eval']['decode_check']['rel_max']:.1e}, "
                     f"{100 * x['eval']['decode_check']['argmax_agree']:.1f}%" for x in entries)
    lines.append(f"| {arch} | " + " | ".join(cells) + f" | {agree} | {dec} |")
  return "\n".join(lines)


def mqar_table(gathered: dict) -> str:
  keys = None
  rows = []
  for arch, entries in _by_arch(gathered["runs"]).items():
    keys = keys or list(entries[0]["eval"]["mqar"])
    cells = [_cell([x["eval"]["mqar"][k]["accuracy"] for x in entries],
                   [tuple(x["eval"]["mqar"][k]["ci95"]) for x in entries]) for k in keys]
    rows.append(f"| {arch} | " + " | ".join(cells) + " |")
  if keys is None:
    return ""
  head = "| arch | " + " | ".join(f"{k.split('@')[0]} pairs @{k.split('@')[1]}" for k in keys)
  return "\n".join([head + " |", "|---" * (len(keys) + 1) + "|"] + rows)


def memory_ppl_table(gathered: dict) -> str:
  lengths = None
  rows = []
  for arch, entries in _by_arch(gathered["runs"]).items():
    ev = entries[0]["eval"]
    lengths = lengths or list(ev["memory"])
    mem = [f"{ev['memory'][n] / 2**20:.2f}" for n in lengths]
    ppl = [_cell([x["eval"]["perplexity"]["results"][n]["loss"] for x in entries])
           for n in lengths]
    secs = " / ".join(f"{x['time']['seconds']:.0f}" for x in entries if "time" in x)
    rows.append(f"| {arch} | " + " | ".join(mem) + " | " + " | ".join(ppl) + f" | {secs} |")
  if lengths is None:
    return ""
  head = ("| arch | " + " | ".join(f"cache MiB @{n}" for n in lengths) + " | "
          + " | ".join(f"held-out loss @{n}" for n in lengths) + " | train s |")
  return "\n".join([head, "|---" * (2 * len(lengths) + 2) + "|"] + rows)


def lte_table(gathered: dict) -> str:
  """Final lambda and kept tokens per LTE layer (mean over KV heads), the target, and the
  first logged step whose kept count is within the controller's band of the target."""
  target = gathered["study"]["windows"]["lte_budget"]
  lines = ["| run | layer | final lambda | final kept (target " + str(target) + ") | "
           "first step kept <= target | needle kept in cache |", "|---|---|---|---|---|---|"]
  for name, entry in sorted(gathered["runs"].items()):
    recs = [r for r in entry["metrics"] if "kept" in r]
    if not recs:
      continue
    keep = entry.get("eval", {}).get("lte_keep_map")
    kept = np.asarray([r["kept"] for r in recs])    # [records, layers, heads]
    lam = np.asarray([r["lam"] for r in recs])
    steps = [r["step"] for r in recs]
    for li in range(kept.shape[1]):
      mean = kept[:, li].mean(-1)
      reached = next((s for s, k in zip(steps, mean) if k <= target), None)
      needle = (f"{100 * np.mean(keep['needle_kept'][li]):.0f}% of heads' needle tokens"
                if keep else "")
      layer = keep["layers"][li] if keep else li
      lines.append(f"| {name} | {layer} | {lam[-1, li].mean():.2e} | {mean[-1]:.0f} | "
                   f"{reached if reached is not None else 'never'} | {needle} |")
  return "\n".join(lines)


def markdown(gathered: dict) -> str:
  s = gathered["study"]
  p = s["preset"]
  parts = [
      f"# Study report: preset {p['name']}",
      f"T = {p['seq_len']}, d_model {p['d_model']}, {p['num_layers']} layers, {p['steps']} "
      f"steps x {p['batch_size']} x {p['seq_len']} tokens; windows {s['windows']}; corpus "
      f"{s['corpus']['source']}, Python {s['corpus']['python']}, {s['corpus']['documents']} "
      f"documents, {s['corpus']['byte_tokens']:,} byte tokens.",
      "## S-NIAH, teacher-forced exact match (%) [95% interval; mean (seeds) over seeds]",
      niah_table(gathered),
      "## Greedy generation through the decode caches vs teacher forcing, at the training "
      "length", greedy_table(gathered),
      "## MQAR accuracy (%)", mqar_table(gathered),
      "## Decode-cache size and held-out loss (nats / byte)", memory_ppl_table(gathered),
      "## LTE controller and cache", lte_table(gathered)]
  return "\n\n".join(x for x in parts if x) + "\n"


def _plots(gathered: dict, out: str) -> list[str]:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top
  paths = []
  p = gathered["study"]["preset"]
  lengths = [m * p["seq_len"] for m in p["eval_multiples"]]
  by_arch = _by_arch(gathered["runs"])
  fig, axes = plt.subplots(1, len(NIAH_TASKS), figsize=(13, 3.6), squeeze=False,
                           layout="constrained")
  for ax, task in zip(axes[0], NIAH_TASKS):
    for arch, entries in by_arch.items():
      acc = [np.mean([x["eval"]["niah"][f"{task}@{n}"]["teacher_forced"] for x in entries])
             for n in lengths]
      ax.plot(lengths, acc, marker="o", label=arch)
    ax.set_xscale("log", base=2)
    ax.set_xticks(lengths, [str(n) for n in lengths])
    ax.axvline(p["seq_len"], color="grey", lw=0.8, ls=":")
    ax.set_title(task)
    ax.set_xlabel("context length (tokens)")
    ax.set_ylim(-3, 103)
  axes[0][0].set_ylabel("accuracy (%)")
  axes[0][-1].legend(fontsize=8)
  paths.append(os.path.join(out, "niah_by_length.png"))
  fig.savefig(paths[-1], dpi=110)
  plt.close(fig)

  fig, axes = plt.subplots(1, 2, figsize=(11, 3.6), layout="constrained")
  for name, entry in sorted(gathered["runs"].items()):
    recs = [r for r in entry["metrics"] if "loss" in r]
    axes[0].plot([r["step"] for r in recs], [r["loss"] for r in recs], label=name, lw=0.9)
    val = [r for r in entry["metrics"] if "val/loss" in r]
    axes[1].plot([r["step"] for r in val], [r["val/loss"] for r in val], marker="o", label=name)
  axes[0].set_title("training loss (incl. LTE regulariser)")
  axes[1].set_title("validation loss (held-out mixture)")
  for ax in axes:
    ax.set_xlabel("step")
  axes[0].set_yscale("log")
  axes[1].legend(fontsize=7)
  paths.append(os.path.join(out, "loss.png"))
  fig.savefig(paths[-1], dpi=110)
  plt.close(fig)

  lte_runs = {n: e for n, e in gathered["runs"].items() if any("kept" in r for r in e["metrics"])}
  if lte_runs:
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.6), layout="constrained")
    target = gathered["study"]["windows"]["lte_budget"]
    for name, entry in sorted(lte_runs.items()):
      recs = [r for r in entry["metrics"] if "kept" in r]
      steps = [r["step"] for r in recs]
      kept, lam = np.asarray([r["kept"] for r in recs]), np.asarray([r["lam"] for r in recs])
      for li in range(kept.shape[1]):
        axes[0].plot(steps, kept[:, li].mean(-1), lw=0.9, label=f"{name} LTE layer #{li}")
        axes[1].plot(steps, lam[:, li].mean(-1), lw=0.9, label=f"{name} LTE layer #{li}")
    axes[0].axhline(target, color="k", ls=":", lw=0.8)
    axes[0].set_title(f"kept tokens per sequence (mean of KV heads; target {target})")
    axes[1].set_title("lambda (mean of KV heads)")
    axes[1].set_yscale("log")
    for ax in axes:
      ax.set_xlabel("step")
    axes[0].legend(fontsize=6)
    paths.append(os.path.join(out, "lte_controller.png"))
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    name, entry = sorted(lte_runs.items())[0]
    keep = entry.get("eval", {}).get("lte_keep_map")
    if keep:
      rows = [(li, h, pos) for li, heads in zip(keep["layers"], keep["retained"])
              for h, pos in enumerate(heads)]
      fig, ax = plt.subplots(figsize=(12, 0.25 * len(rows) + 1.5), layout="constrained")
      t = keep["prompt_len"]
      for r, (li, h, pos) in enumerate(rows):
        ax.plot(pos, [r] * len(pos), "|", color="tab:blue", ms=6)
        ax.plot([t - 1 - keep["window"], t], [r, r], color="tab:green", lw=3, alpha=0.4)
      ax.axvspan(*keep["needle"], color="tab:red", alpha=0.25, label="needle")
      ax.set_yticks(range(len(rows)), [f"layer {li} head {h}" for li, h, _ in rows], fontsize=6)
      ax.set_xlabel(f"prompt position (of {t}); blue: retained slots, green: window")
      ax.set_title(f"{name}: LTE cache after the prompt ({keep['task']})")
      ax.legend(fontsize=7, loc="upper left")
      paths.append(os.path.join(out, "lte_keep_map.png"))
      fig.savefig(paths[-1], dpi=110)
      plt.close(fig)
  return paths


def write(workdir: str) -> list[str]:
  """Write WORKDIR/report/{results.json, report.md, *.png}; returns the paths."""
  gathered = gather(workdir)
  out = os.path.join(workdir, "report")
  os.makedirs(out, exist_ok=True)
  paths = [os.path.join(out, "results.json"), os.path.join(out, "report.md")]
  with open(paths[0], "w") as f:
    json.dump(gathered, f)
  with open(paths[1], "w") as f:
    f.write(markdown(gathered))
  return paths + _plots(gathered, out)
