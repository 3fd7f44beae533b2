r"""Perplexity of a trained checkpoint by context length, and its loss by token position.

    python -m experiments.eval_ppl --workdir=/tmp/lalte --lengths=1024,2048,4096

Loads the newest checkpoint of a workdir written by experiments.train (or
--checkpoint) and reads the run's validation documents: the corpus documents
its config.eval.holdout kept out of training (or its config.eval.path), or
--data_path instead. For each length L, up to --batches x --batch_size rows are
the first validation documents with at least L tokens, cut to L
(lte_jax/evals/perplexity.py). Writes ppl.json (loss, perplexity and the loss
per --bin positions of each length) and loss_by_position.png to --out, and
prints a table. A model whose loss keeps falling with position uses its long
context; past the training length (marked on the plot) the curve shows how it
extrapolates.
"""
from __future__ import annotations

import dataclasses
import os
import sys
import time

from absl import app, flags, logging

from experiments import cli
from lte_jax import data as data_lib
from lte_jax.data import holdout as holdout_lib
from lte_jax.evals import loading, perplexity
from lte_jax.training import checkpoint, evaluation, experiment

_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Workdir of experiments.train: config.json and checkpoints/ (the newest "
    "checkpoint is evaluated unless --checkpoint is given).")
_CHECKPOINT = flags.DEFINE_string(
    "checkpoint", None, "A checkpoint step directory (WORKDIR/checkpoints/<step>) or a "
    "checkpoints/ folder (its newest step). Its config is read from --workdir, or from the "
    "folder above checkpoints/.")
_LENGTHS = flags.DEFINE_list(
    "lengths", ["1024", "2048", "4096"], "Row lengths in tokens: each row is one validation "
    "document of at least that many tokens, cut to it.")
_BATCHES = flags.DEFINE_integer("batches", 4, "Batches of rows per length.", lower_bound=1)
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 1, "Rows per forward batch.", lower_bound=1)
_BIN = flags.DEFINE_integer("bin", 64, "Token positions averaged per point of the loss-by-"
                            "position curve.", lower_bound=1)
_DATA_PATH = flags.DEFINE_string(
    "data_path", None, "A glob of validation documents to read instead of the run's held-out "
    "ones (kind: --data_source).")
_DATA_SOURCE = flags.DEFINE_enum(
    "data_source", None, list(data_lib.SOURCE_KINDS), "Kind of --data_path (default: the run's "
    "config.data.source); 'embedded' reads every Python documentation topic.")
_OUT = flags.DEFINE_string(
    "out", None, "Folder for ppl.json and loss_by_position.png (default: WORKDIR/eval_ppl).")


def _validation(run_workdir: str) -> tuple[data_lib.DataConfig, holdout_lib.Split, str]:
  """(data config, split, description) of the documents to evaluate on."""
  exp = experiment.resolve(loading.read_run_config(run_workdir))
  data_cfg = dataclasses.replace(exp.data, mixture={"corpus": 1.0})
  if _DATA_PATH.value or _DATA_SOURCE.value:
    source = _DATA_SOURCE.value or data_cfg.source
    if source != "embedded" and not _DATA_PATH.value:
      raise ValueError(f"--data_path must name files for --data_source={source}")
    cfg = dataclasses.replace(data_cfg, source=source,
                              path=_DATA_PATH.value if source != "embedded" else None)
    return cfg, holdout_lib.Split("separate", 0, data_cfg.seed), (
        f"{source} {cfg.path or ''}".strip())
  if not exp.eval.separate and not exp.eval.holdout:
    raise ValueError(f"the run in {run_workdir} held out no documents (config.eval.holdout=0 "
                     "and no config.eval.path): pass --data_path with validation documents")
  cfg, split = evaluation.validation_data(exp.eval, data_cfg)
  what = ("held-out documents" if split.name == "validation" else "validation documents")
  return cfg, split, f"{what} of {cfg.source} {cfg.path or ''}".strip()


def _run_workdir() -> str:
  """The training workdir: --workdir, else the folder above --checkpoint's checkpoints/."""
  if _WORKDIR.value:
    return _WORKDIR.value
  path = os.path.abspath(os.path.expanduser(_CHECKPOINT.value))
  return os.path.dirname(os.path.dirname(path) if os.path.basename(path).isdigit() else path)


def evaluate() -> dict:
  lengths = perplexity.check_lengths(_LENGTHS.value)
  # The data first: a length the documents cannot fill fails before the slow model load.
  data_cfg, split, description = _validation(_run_workdir())
  docs = data_lib.make_document_dataset(
      dataclasses.replace(data_cfg, shuffle=False, num_epochs=1, worker_count=0), split=split)
  try:
    rows, stats = perplexity.document_rows((docs[i] for i in range(len(docs))), lengths,
                                           _BATCHES.value * _BATCH_SIZE.value)
  except ValueError as err:
    raise ValueError(f"--lengths: {err} (--data_path)") from None
  run = loading.load_run(_WORKDIR.value, _CHECKPOINT.value)
  logging.info("evaluating %s step %d on %s: %d documents read, longest %d tokens",
               run.checkpoint, run.step, description, stats["documents"], stats["longest"])
  results = {"run": {"checkpoint": run.checkpoint, "step": run.step,
                     "layers": list(run.model.config.layers),
                     "train_seq_len": run.data.seq_len},
             "data": {"description": description, "split": split.name,
                      "holdout": split.holdout, **stats},
             "lengths": lengths, "bin_size": _BIN.value, "results": {}}
  for n in lengths:
    start = time.time()
    nll = perplexity.token_losses(run.model, rows[n]["inputs"], rows[n]["targets"],
                                  _BATCH_SIZE.value)
    entry = perplexity.summarize(nll, _BIN.value)
    entry["seconds"] = round(time.time() - start, 2)
    results["results"][str(n)] = entry
    logging.info("length %d: loss %.4f, ppl %.3f (%d rows, %.1fs)", n, entry["loss"],
                 entry["ppl"], entry["rows"], entry["seconds"])
  return results


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  if not _WORKDIR.value and not _CHECKPOINT.value:
    raise app.UsageError("--workdir or --checkpoint is required")
  try:
    import matplotlib  # pylint: disable=g-import-not-at-top,unused-import
  except ImportError:
    sys.exit("eval_ppl: loss_by_position.png needs matplotlib: pip install -e '.[eval]'")
  checkpoint.quiet_orbax_logs()
  try:
    results = evaluate()
  except ValueError as err:
    sys.exit(f"eval_ppl: {err}")
  out = _OUT.value or os.path.join(
      _WORKDIR.value or os.path.dirname(os.path.dirname(results["run"]["checkpoint"])),
      "eval_ppl")
  paths = perplexity.write_all(results, out)
  print(perplexity.markdown_table(results), flush=True)
  print("wrote " + ", ".join(paths.values()), flush=True)


def parse_flags(argv: list[str]) -> list[str]:
  cli.exit_on_help(argv, __doc__, __name__,
                   cli.allowed_values({"--data_source": data_lib.SOURCE_KINDS}))
  return app.parse_flags_with_usage(argv)


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
