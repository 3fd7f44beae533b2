"""Perplexity by context length and loss by token position (experiments.eval_ppl).

A row of length L is one validation document with at least L (input, target)
pairs, cut to its first L: position p of every row is a real token at document
position p. The mean loss at p then says how well the model predicts with p
tokens of context; past the training length, how it extrapolates. Documents
shorter than L are left out of that length's rows (packing them would restart
positions inside a row).
"""
from __future__ import annotations

import json
import os
from typing import Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from lte_jax.training.metrics import perplexity


def document_rows(docs: Iterable[dict | None], lengths: Sequence[int],
                  max_rows: int) -> tuple[dict[int, dict[str, np.ndarray]], dict[str, int]]:
  """Rows of each length from tokenized documents (lte_jax.data.pipeline's dicts), in order.

  Returns ({L: {'inputs', 'targets': int32 [R, L]}}, {'documents': read, 'longest':
  the most (input, target) pairs of one}); R <= max_rows, the first documents long
  enough. Stops reading once every length has ``max_rows`` rows. ValueError names a
  length no document reaches.
  """
  rows = {n: [] for n in lengths}
  read = longest = 0
  for doc in docs:
    if doc is None:  # a record the source skipped
      continue
    read += 1
    size = len(doc["inputs"])
    longest = max(longest, size)
    for n, got in rows.items():
      if size >= n and len(got) < max_rows:
        got.append((doc["inputs"][:n], doc["targets"][:n]))
    if all(len(got) == max_rows for got in rows.values()):
      break
  short = [n for n, got in rows.items() if not got]
  if short:
    raise ValueError(f"length {short[0]} is beyond the validation data: none of its {read} "
                     f"documents has {short[0]} tokens (the longest has {longest}); use lengths "
                     f"<= {longest} or data with longer documents")
  out = {n: {"inputs": np.stack([r[0] for r in got]).astype(np.int32),
             "targets": np.stack([r[1] for r in got]).astype(np.int32)}
         for n, got in rows.items()}
  return out, {"documents": read, "longest": longest}


def token_losses(model: nnx.Module, inputs: np.ndarray, targets: np.ndarray,
                 batch_size: int) -> np.ndarray:
  """-log p(target) float32 [R, L] of single-document rows inputs / targets [R, L]."""
  graphdef, state = nnx.split(model)

  @jax.jit
  def nll(state, x, y):
    logits, _ = nnx.merge(graphdef, state)(x)  # no segment ids: one document a row
    return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), y)

  out = []
  for start in range(0, len(inputs), batch_size):
    x, y = inputs[start:start + batch_size], targets[start:start + batch_size]
    pad = batch_size - len(x)  # pad the last batch: one compiled shape
    if pad:
      x, y = (np.concatenate([a, np.zeros((pad,) + a.shape[1:], a.dtype)]) for a in (x, y))
    out.append(np.asarray(nll(state, x, y))[:batch_size - pad])
  return np.concatenate(out)


def position_loss(nll: np.ndarray, bin_size: int) -> np.ndarray:
  """Mean of nll [R, L] over rows and ``bin_size`` consecutive positions: [ceil(L / bin_size)]
  (the last bin holds the L % bin_size positions left when it does not divide)."""
  if not (isinstance(bin_size, int) and bin_size >= 1):
    raise ValueError(f"bin_size must be a positive integer, got {bin_size!r}")
  nll = np.asarray(nll, np.float64)
  if nll.ndim != 2:
    raise ValueError(f"nll must have shape [rows, length], got {nll.shape}")
  per_position = nll.mean(axis=0)
  starts = np.arange(0, per_position.shape[0], bin_size)
  return np.add.reduceat(per_position, starts) / np.diff(np.append(starts, len(per_position)))


def summarize(nll: np.ndarray, bin_size: int) -> dict:
  """Perplexity entry of one length: rows, tokens, loss, ppl, per-bin losses."""
  loss = float(np.mean(nll, dtype=np.float64))
  return {"rows": int(nll.shape[0]), "tokens": int(nll.size), "loss": loss,
          "ppl": perplexity(loss), "position_loss": position_loss(nll, bin_size).tolist()}


def markdown_table(results: dict) -> str:
  """Perplexity per length, as a Markdown table with a title line."""
  lines = ["| length | rows | tokens | loss | ppl |", "|---|---|---|---|---|"]
  for n in results["lengths"]:
    r = results["results"][str(n)]
    lines.append(f"| {n} | {r['rows']} | {r['tokens']} | {r['loss']:.4f} | {r['ppl']:.3f} |")
  run = results["run"]
  title = (f"Perplexity of {run['checkpoint']} (step {run['step']}, trained at length "
           f"{run['train_seq_len']}) on {results['data']['description']}")
  return title + "\n\n" + "\n".join(lines) + "\n"


def write_json(results: dict, path: str) -> None:
  with open(path, "w") as f:
    json.dump(results, f, indent=2, sort_keys=True)


def plot_position_loss(results: dict, path: str) -> None:
  """Loss by token position (bin means), one line per length, the training length marked."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  bin_size = results["bin_size"]
  fig, ax = plt.subplots(figsize=(7, 4))
  for n in results["lengths"]:
    losses = results["results"][str(n)]["position_loss"]
    centers = [min(i * bin_size + bin_size / 2, n) for i in range(len(losses))]
    ax.plot(centers, losses, marker="." if len(losses) < 40 else None, label=f"length {n}")
  train_len = results["run"]["train_seq_len"]
  if train_len <= max(results["lengths"]):
    ax.axvline(train_len, color="gray", linestyle="--", label=f"training length {train_len}")
  ax.set_xlabel("token position in the document")
  ax.set_ylabel(f"loss (nats/token, {bin_size}-token bins)")
  ax.set_title(f"Loss by position, step {results['run']['step']}")
  ax.legend()
  ax.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def write_all(results: dict, out_dir: str) -> dict[str, str]:
  """ppl.json and loss_by_position.png in ``out_dir``; returns their paths."""
  os.makedirs(out_dir, exist_ok=True)
  paths = {"json": os.path.join(out_dir, "ppl.json"),
           "plot": os.path.join(out_dir, "loss_by_position.png")}
  write_json(results, paths["json"])
  plot_position_loss(results, paths["plot"])
  return paths


def check_lengths(values: Sequence[str], flag: str = "--lengths") -> list[int]:
  """Positive integer lengths from strings; ValueError naming ``flag`` otherwise."""
  if not values:
    raise ValueError(f"{flag} must name at least one length, e.g. {flag}=1024,2048")
  try:
    lengths = [int(v) for v in values]
  except ValueError:
    raise ValueError(f"{flag} must be positive integers, got {','.join(values)!r}") from None
  bad = [n for n in lengths if n < 1]
  if bad:
    raise ValueError(f"{flag} must be positive integers, got {bad[0]}")
  return sorted(set(lengths))
