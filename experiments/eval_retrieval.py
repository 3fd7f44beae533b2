r"""Evaluate a trained checkpoint on the retrieval tasks of EVALS.md (repository root).

    python -m experiments.eval_retrieval --workdir=/tmp/lalte \
        --tasks=niah_single_1,niah_single_2,niah_single_3,mqar --lengths=1024,2048,4096

Loads the newest checkpoint of a workdir written by experiments.train (or
--checkpoint), builds --num_samples examples per task and length, scores them
with each task's public metric and writes results.json, results.md and
niah_heatmap.png (accuracy by context length and needle depth) to --out_dir,
with the decode-cache bytes per sequence at each length and each task's chance
level (the score of a uniform guess of the answer).
"""
from __future__ import annotations

import os
import sys
import time

from absl import app, flags, logging

from experiments import cli
from lte_jax.data.retrieval import NIAH_TASKS
from lte_jax.data.tokenizers import get_tokenizer
from lte_jax.evals import evaporate, loading, report, tasks as tasks_lib
from lte_jax.evals.memory import cache_bytes_per_sequence
from lte_jax.training import checkpoint

_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Workdir of experiments.train: config.json and checkpoints/ (the newest "
    "checkpoint is evaluated unless --checkpoint is given; one that is unreadable or fails "
    "its checksums is skipped, with a warning, for the one before it).")
_CHECKPOINT = flags.DEFINE_string(
    "checkpoint", None, "A checkpoint step directory (WORKDIR/checkpoints/<step>) or a "
    "checkpoints/ folder (its newest step). Its config is read from --workdir, or from the "
    "folder above checkpoints/.")
_TASKS = flags.DEFINE_list(
    "tasks", ["niah_single_1", "niah_single_2", "niah_single_3", "mqar"],
    f"Comma-separated tasks, from {', '.join(tasks_lib.TASKS)}.")
_LENGTHS = flags.DEFINE_list(
    "lengths", ["1024", "2048", "4096"], "Context lengths in tokens (max_seq_length of RULER: "
    "BOS + prompt + the 128 generated tokens fit it; MQAR sequences fill it). At least "
    f"{tasks_lib.NIAH_MAX_NEW_TOKENS + 2} for NIAH tasks (more: the prompt's own tokens), "
    f"4 x max(--mqar_num_pairs, 1) + 1 for mqar, {evaporate.WINDOW_MARGIN + 1} for EVAPORATE "
    "tasks.")
_NUM_SAMPLES = flags.DEFINE_integer(
    "num_samples", 500, "Examples per task and length (RULER: 500). EVAPORATE tasks use the "
    "first num_samples records of their file.", lower_bound=1)
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 8, "Sequences per generation / forward batch.",
                                   lower_bound=1)
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the synthetic examples.")
_OUT_DIR = flags.DEFINE_string(
    "out_dir", None, "Where results.json, results.md and niah_heatmap.png go "
    "(default: WORKDIR/eval_retrieval).")
_DATA_DIR = flags.DEFINE_string(
    "data_dir", None, "Folder with local copies of the EVAPORATE-style data: <task>.parquet or "
    f"<task>.jsonl for {', '.join(evaporate.EVAPORATE_TASKS)}.")
_TOKENIZER = flags.DEFINE_string(
    "tokenizer", None, "Tokenizer spec ('byte' or a local tokenizer.json / .model); default: "
    "the training run's.")
_MQAR_NUM_PAIRS = flags.DEFINE_integer(
    "mqar_num_pairs", 0, "MQAR key-value pairs N (0: L/16 as zoology's sweep, capped by the "
    "MQAR vocab).", lower_bound=0)
_MQAR_ALPHA = flags.DEFINE_float("mqar_alpha", 0.01, "MQAR query-slot power-law exponent a.")
_DEPTH_BINS = flags.DEFINE_integer("depth_bins", 10, "Needle-depth bins of the heatmap.",
                                   lower_bound=1)


ALLOWED = cli.allowed_values({
    "--tasks": tasks_lib.TASKS,
    "--lengths": "integers; at least "
                 f"{tasks_lib.NIAH_MAX_NEW_TOKENS + 2} (+ the prompt) for NIAH tasks, "
                 "4 x max(--mqar_num_pairs, 1) + 1 for mqar, "
                 f"{evaporate.WINDOW_MARGIN + 1} for {', '.join(evaporate.EVAPORATE_TASKS)}",
    "--tokenizer": "'byte' or a path to the model's tokenizer.json / SentencePiece .model",
})


def check_tokenizer(tokenizer, spec: str, vocab_size: int) -> None:
  """ValueError naming --tokenizer when ``tokenizer`` has ids the model has no row for."""
  if tokenizer.vocab_size > vocab_size:
    raise ValueError(f"the tokenizer {spec!r} has {tokenizer.vocab_size} ids but the model's "
                     f"vocabulary only {vocab_size}: pass the model's own tokenizer with "
                     "--tokenizer=PATH (its tokenizer.json or SentencePiece .model)")


def min_length(task: str, mqar_num_pairs: int = 0) -> tuple[int, str]:
  """(smallest --lengths value ``task`` runs at, why), independent of the tokenizer."""
  if task == "mqar":
    pairs = max(mqar_num_pairs, 1)
    return 4 * pairs + 1, f"BOS + 4 x {pairs} MQAR tokens (--mqar_num_pairs, at least 1)"
  if task in evaporate.EVAPORATE_TASKS:
    return evaporate.WINDOW_MARGIN + 1, (f"{evaporate.WINDOW_MARGIN} tokens stay free for the "
                                         "answer, at least one for the document")
  return tasks_lib.NIAH_MAX_NEW_TOKENS + 2, (
      f"BOS + the prompt + {tasks_lib.NIAH_MAX_NEW_TOKENS} generated tokens; the prompt takes "
      "tens of tokens more, how many depends on the tokenizer")


def check_flags(tasks: list[str], lengths: list[str], *, mqar_num_pairs: int = 0,
                mqar_alpha: float = 0.01) -> tuple[list[str], list[int]]:
  """(task names, context lengths) from the --tasks and --lengths strings; ValueError
  naming the flag and what it allows, before anything is loaded."""
  if not tasks:
    raise ValueError(f"--tasks must name at least one task from {tasks_lib.TASKS}, got none")
  for task in tasks:
    if task not in tasks_lib.TASKS:
      raise ValueError(f"--tasks must name tasks from {tasks_lib.TASKS}, got {task!r}")
    if tasks.count(task) > 1:
      raise ValueError(f"--tasks names {task!r} more than once")
  if not lengths:
    raise ValueError("--lengths must name at least one context length (integers, e.g. "
                     "--lengths=1024,2048), got none")
  try:
    sizes = [int(x) for x in lengths]
  except ValueError:
    raise ValueError(f"--lengths must be integers (context lengths in tokens), got "
                     f"{list(lengths)}") from None
  for n in sizes:
    if sizes.count(n) > 1:
      raise ValueError(f"--lengths names {n} more than once")
  if mqar_alpha <= 0 and "mqar" in tasks:
    raise ValueError(f"--mqar_alpha must be > 0, got {mqar_alpha}")
  for task in tasks:
    minimum, why = min_length(task, mqar_num_pairs)
    if min(sizes) < minimum:
      raise ValueError(f"--lengths must be integers >= {minimum} for --tasks={task} ({why}), "
                       f"got {min(sizes)}")
  return list(tasks), sizes


def evaluate() -> dict:
  task_names, lengths = check_flags(list(_TASKS.value), list(_LENGTHS.value),
                                    mqar_num_pairs=_MQAR_NUM_PAIRS.value,
                                    mqar_alpha=_MQAR_ALPHA.value)
  for task in task_names:  # fail before loading anything when a data file is missing
    if task in evaporate.EVAPORATE_TASKS:
      evaporate.data_file(_DATA_DIR.value, task)
  run = loading.load_run(_WORKDIR.value, _CHECKPOINT.value)
  model, cfg = run.model, run.model.config
  spec = _TOKENIZER.value or run.data.tokenizer
  tokenizer = get_tokenizer(spec)
  check_tokenizer(tokenizer, spec, cfg.vocab_size)
  logging.info("evaluating %s (%s) step %d", run.checkpoint, ",".join(cfg.layers), run.step)
  results = {"run": {"checkpoint": run.checkpoint, "step": run.step, "layers": list(cfg.layers),
                     "arch": _arch_name(cfg.layers), "tokenizer": repr(tokenizer)},
             "lengths": lengths, "tasks": {},
             "memory": {"cache_bytes_per_sequence": {
                 str(n): cache_bytes_per_sequence(model, n) for n in lengths}}}
  common = dict(num_samples=_NUM_SAMPLES.value, batch_size=_BATCH_SIZE.value)
  for task in task_names:
    results["tasks"][task] = {}
    for n in lengths:
      start = time.time()
      if task in NIAH_TASKS:
        out = tasks_lib.run_niah(model, tokenizer, task, n, seed=_SEED.value, **common)
      elif task == "mqar":
        out = tasks_lib.run_mqar(model, length=n, vocab_size=run.data.mqar_vocab_size,
                                 offset=run.data.mqar_vocab_offset, bos_id=tokenizer.bos_id,
                                 seed=_SEED.value, num_pairs=_MQAR_NUM_PAIRS.value,
                                 alpha=_MQAR_ALPHA.value, **common)
      else:
        out = tasks_lib.run_evaporate(model, tokenizer, task, n, data_dir=_DATA_DIR.value,
                                      **common)
      out["seconds"] = round(time.time() - start, 2)
      results["tasks"][task][str(n)] = out
      logging.info("%s @ %d: %.1f (%d samples, %.1fs)", task, n, out["score"],
                   out["num_samples"], out["seconds"])
  return results


def _arch_name(layers) -> str:
  from lte_jax import configs  # pylint: disable=g-import-not-at-top
  for arch in configs.ARCHITECTURES:
    if configs.get_config(arch, "tiny", num_layers=len(layers)).layers == tuple(layers):
      return arch
  return "custom"


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  if not _WORKDIR.value and not _CHECKPOINT.value:
    raise app.UsageError("--workdir or --checkpoint is required")
  checkpoint.quiet_orbax_logs()
  try:
    results = evaluate()
  except ValueError as err:
    sys.exit(f"eval_retrieval: {err}")
  out_dir = _OUT_DIR.value or os.path.join(
      _WORKDIR.value or os.path.dirname(os.path.dirname(results["run"]["checkpoint"])),
      "eval_retrieval")
  paths = report.write_all(results, out_dir)
  print(report.markdown_table(results), flush=True)
  print("wrote " + ", ".join(paths.values()), flush=True)


def parse_flags(argv: list[str]) -> list[str]:
  cli.exit_on_help(argv, __doc__, __name__, ALLOWED)
  return app.parse_flags_with_usage(argv)


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
