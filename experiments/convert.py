r"""Convert a Hugging Face checkpoint into an lte_jax workdir that experiments.train resumes,
or (--to_hf) a trained workdir into a Hugging Face directory.

    python -m experiments.convert --from=/path/to/hf_model --to=/tmp/converted \
        [--config=GDN_Attn --config.data.source=jsonl ...]
    python -m experiments.convert --from=/path/to/workdir --to_hf=/tmp/hf_model [--overwrite]

Reads flash-linear-attention ``gated_deltanet`` and the reference's ``hybrid_gated_deltanet``
directories (config.json + safetensors). Writes, in WORKDIR:
  converted_model.json  the lte_jax ModelConfig (+ source and conversion notes)
  config.json           the resolved training config, as experiments.train writes it
  checkpoints/0/        an orbax TrainState at step 0: the converted parameters, a fresh
                        optimizer state, the LTE lambda controller (the reference's lambdas
                        when the checkpoint has them) and the input iterator's start
Then fine-tune with the command it prints: the same --config and overrides plus
--config.model.from_file=WORKDIR/converted_model.json. Keep the config the same in both
commands: the optimizer state's structure and the input iterator's position saved here
follow it (a changed data source or clipping switched off would not restore). Without
--config, overrides (--config.data.tokenizer=...) apply to the architecture's config. A
model whose vocabulary is smaller than the tokenizer's (the byte tokenizer's 259 ids by
default) needs its own: --config.data.tokenizer=PATH (tokenizer.json or a SentencePiece
.model; the error names the one in --from, if any).

With --to_hf, --from is a workdir (of experiments.train, or made by this script) and its
newest good checkpoint is written by lte_jax.convert.save_hf: config.json and
model.safetensors in FLA's gated_deltanet format (GDN, GDN_SWA, GDN_Attn, transformer) or
the reference's hybrid_gated_deltanet (laLTE, laNSA, NSA), the LTE lambda controller as the
reference's model.l1_lambda / model.num_kept, and the run's tokenizer (config.data.tokenizer;
the byte tokenizer as an equivalent tokenizer.json). A model the format cannot express is
refused naming the field, and nothing is written. --config flags do not apply: the
workdir's config.json holds the model.
"""
from __future__ import annotations

import contextlib
import json
import os
import shlex
import shutil
import sys
import tempfile
from typing import Iterator

import jax
import jax.numpy as jnp
import ml_collections
from absl import app, flags
from ml_collections import config_flags

from experiments import cli
from experiments import configs as config_files
from lte_jax import configs as configs_lib
from lte_jax import data as data_lib
from lte_jax import lte_controller
from lte_jax.convert import convert_hf, model_config_from_hf, read_config, save_hf
from lte_jax.convert import export as export_lib
from lte_jax.data.tokenizers import get_tokenizer
from lte_jax.training import checkpoint, experiment, optimizer, train_state
from lte_jax.training.train_state import TrainState

MODEL_FILE = "converted_model.json"

_FROM = flags.DEFINE_string("from", None, "Hugging Face model directory (config.json + "
                            "model.safetensors or model.safetensors.index.json with its shards).")
_TO = flags.DEFINE_string("to", None, "Workdir to create; must not hold checkpoints yet.")
_TO_HF = flags.DEFINE_string("to_hf", None, "The reverse direction: Hugging Face directory to "
                             "write from the --from workdir's newest good checkpoint.")
_OVERWRITE = flags.DEFINE_boolean("overwrite", False, "With --to_hf: replace a non-empty "
                                  "directory (everything it held is removed).")
_STRICT = flags.DEFINE_boolean("strict", True, "With --to_hf: refuse LTE controller targets "
                               "(target_kept, target_seq_len) the format cannot hold; "
                               "--nostrict exports anyway (they only steer fine-tuning).")
_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Training config the checkpoint is made for (a name from "
    "experiments/configs/ or a file; default: the architecture's config, e.g. GDN_Attn). Its "
    "model fields are replaced by the converted model; its optimizer and data settings shape "
    "the saved state.",
    lock_config=True)


def guess_arch(layers: tuple[str, ...]) -> str:
  """The architecture name closest to a layer pattern (only a label: the model comes from file)."""
  kinds = set(layers) - {"gdn"}
  if not kinds:
    return "GDN"
  if kinds == {"attn"} and "gdn" not in layers:
    return "transformer"
  names = {"swa": "GDN_SWA", "attn": "GDN_Attn", "lte": "laLTE", "nsa": "laNSA"}
  kind = sorted(kinds)[0]
  name = names[kind]
  return name if name in configs_lib.ARCHITECTURES else "GDN"


ALLOWED = cli.allowed_values({
    "--config": [*config_files.available(), "PATH to a config file"],
    "--from model_type": ("gated_deltanet (flash-linear-attention)",
                          "hybrid_gated_deltanet (the reference's LTE / NSA hybrids)"),
    "config.data.tokenizer": "'byte' or a path to the model's tokenizer.json / SentencePiece "
                             ".model",
    "config.data.source": data_lib.SOURCE_KINDS,
    "--to_hf model_type": ("gated_deltanet (GDN, GDN_SWA, GDN_Attn, transformer)",
                           "hybrid_gated_deltanet (laLTE, laNSA, NSA)"),
})
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")


def make_state(converted, exp: experiment.Experiment) -> TrainState:
  """The TrainState init_train_state would build, with the converted parameters."""
  model_def = train_state.make_model_def(exp.model)
  dtype = jnp.dtype(exp.model.param_dtype)
  params = jax.tree.map(lambda x: jnp.asarray(x, dtype), converted.params)
  want = jax.tree.map(lambda x: (x.shape, x.dtype), model_def.abstract_params)
  got = jax.tree.map(lambda x: (x.shape, x.dtype), params)
  if want != got:
    raise ValueError("the converted parameters do not match the training model's parameters "
                     "(is config.model.from_file the converted model?)")
  tx, _ = optimizer.make_optimizer(exp.optim, exp.steps)
  num_lte = len(model_def.lte_layers)
  controller = None
  if num_lte:
    controller = lte_controller.init_controller(num_lte, exp.model.lte.num_kv_heads)
    if converted.controller is not None:
      controller = controller.replace(lam=jnp.asarray(converted.controller["lam"], jnp.float32),
                                      kept_ema=jnp.asarray(converted.controller["kept_ema"],
                                                           jnp.float32))
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                    controller=controller,
                    rng=jax.random.key_data(jax.random.key(exp.seed + 2)),
                    skipped=jnp.zeros((), jnp.int32))


def check_paths(source: str, workdir: str) -> None:
  """ValueError unless --from is a directory and --to names a new directory, or an existing
  one without checkpoints, that is not --from itself (its config.json would be overwritten)."""
  if not isinstance(source, str) or not os.path.isdir(source):
    raise ValueError(f"--from must be a Hugging Face model directory (config.json + "
                     f"safetensors), got {source!r}")
  if not isinstance(workdir, str) or not workdir:
    raise ValueError(f"--to must name a directory to create, got {workdir!r}")
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise ValueError(f"--to={workdir}: a file exists and is not a directory; choose a new "
                     "workdir")
  if os.path.isdir(workdir) and os.path.samefile(source, workdir):
    raise ValueError(f"--to={workdir} is the Hugging Face directory --from={source}; choose a "
                     "new workdir (config.json there would be overwritten)")
  ckpt_dir = os.path.join(workdir, "checkpoints")
  if os.path.isdir(ckpt_dir) and os.listdir(ckpt_dir):
    raise ValueError(f"--to={workdir} already holds checkpoints; choose a new workdir")


def check_tokenizer(spec: str, vocab_size: int, source: str) -> None:
  """ValueError naming --config.data.tokenizer when tokenizer ``spec`` has more ids than the
  model's ``vocab_size`` (and the tokenizer file in ``source``, if it holds one)."""
  tokenizer = get_tokenizer(spec)
  if tokenizer.vocab_size <= vocab_size:
    return
  found = [os.path.join(source, name) for name in TOKENIZER_FILES
           if os.path.isfile(os.path.join(source, name))]
  fix = (f"--config.data.tokenizer={found[0]} (the tokenizer in --from)" if found else
         "--config.data.tokenizer=PATH to the model's tokenizer.json or SentencePiece .model")
  raise ValueError(f"the model's vocabulary holds {vocab_size} tokens, fewer than the "
                   f"{tokenizer.vocab_size} ids of config.data.tokenizer={spec!r}: pass {fix}")


def default_config_args(argv: list[str]) -> list[str]:
  """``argv`` with --config=<the --from model's architecture> added when it overrides config
  fields without naming a config (as the conversion itself defaults)."""
  if any(a == "--config" or a.startswith("--config=") for a in argv[1:]) or not any(
      a.startswith(("--config.", "--noconfig.")) for a in argv[1:]):
    return argv
  source = next((a.split("=", 1)[1] for a in argv[1:] if a.startswith("--from=")), None)
  if source is None and "--from" in argv[1:-1]:
    source = argv[argv.index("--from") + 1]
  try:
    model, _ = model_config_from_hf(read_config(source))
  except (ValueError, TypeError, OSError):  # no usable --from: say what to add instead
    cli.check_config_overrides(argv, config_files.available())
    raise
  return [argv[0], f"--config={guess_arch(model.layers)}", *argv[1:]]


@contextlib.contextmanager
def staged(workdir: str) -> Iterator[str]:
  """A fresh directory beside ``workdir`` to write into; its entries move into ``workdir``
  (created if missing) when the block succeeds, and it is deleted, with any parent folders
  made for it, when the block raises: a failed conversion leaves no partial workdir."""
  workdir = os.path.abspath(workdir)
  parent = os.path.dirname(workdir)
  made, folder = [], parent
  while not os.path.isdir(folder):
    made.append(folder)
    folder = os.path.dirname(folder)
  os.makedirs(parent, exist_ok=True)
  stage = tempfile.mkdtemp(prefix=f".{os.path.basename(workdir)}.converting-", dir=parent)
  try:
    yield stage
    if not os.path.isdir(workdir):
      os.rename(stage, workdir)
      return
    for name in os.listdir(stage):  # an existing workdir: checkpoints/ is empty or absent
      os.replace(os.path.join(stage, name), os.path.join(workdir, name))
    os.rmdir(stage)
  except BaseException:
    shutil.rmtree(stage, ignore_errors=True)
    for folder in made:  # innermost first; only folders this call created, if still empty
      try:
        os.rmdir(folder)
      except OSError:
        break
    raise


def convert_to_workdir(source: str, workdir: str,
                       config: ml_collections.ConfigDict | None = None,
                       config_args: list[str] = ()) -> list[str]:
  """Write the workdir; returns the experiments.train command line (argv) that resumes it.

  ``config_args``: the --config flags this config came from, repeated in that command.
  Everything is written to a directory beside ``workdir`` and moved in at the end, so a
  failure leaves ``workdir`` as it was.
  """
  check_paths(source, workdir)
  converted = convert_hf(source)
  model_file = os.path.join(os.path.abspath(workdir), MODEL_FILE)
  with staged(workdir) as stage:
    staged_model_file = os.path.join(stage, MODEL_FILE)
    with open(staged_model_file, "w") as f:
      json.dump({"source": converted.source, "model_type": converted.layout.model_type,
                 "notes": list(converted.layout.notes),
                 "model": json.loads(json.dumps(configs_lib.to_dict(converted.config),
                                                default=list))}, f, indent=2)
    if config is None:
      config = config_files.load(config_files.resolve(guess_arch(converted.config.layers)))
    config.model.from_file = staged_model_file
    exp = experiment.resolve(config)
    check_tokenizer(exp.data.tokenizer, converted.config.vocab_size, source)
    config.model.from_file = model_file
    state = make_state(converted, exp)
    data_iter = data_lib.make_train_iterator(exp.data)
    ckpt = checkpoint.Checkpointer(os.path.join(stage, "checkpoints"), **config.checkpoint)
    try:
      ckpt.save(0, state, data_iter, force=True)
    finally:
      ckpt.close()
    with open(os.path.join(stage, "config.json"), "w") as f:
      f.write(experiment.to_json(config, exp))
  config_args = [a for a in config_args if not a.startswith("--config.model.from_file")]
  if not any(a.startswith("--config=") for a in config_args):
    config_args.insert(0, f"--config={config.arch}")
  return ["python", "-m", "experiments.train", f"--workdir={workdir}", *config_args,
          f"--config.model.from_file={model_file}"]


def export_workdir(workdir: str, directory: str, *, overwrite: bool = False,
                   strict: bool = True):
  """Write the newest good checkpoint of ``workdir`` to the Hugging Face ``directory``
  (save_hf: the model, its LTE lambda controller, the run's tokenizer); returns the
  evals.loading.LoadedRun it came from. The paths are checked before anything is loaded."""
  from lte_jax.evals import loading  # pylint: disable=g-import-not-at-top
  if not isinstance(workdir, str) or not os.path.isdir(os.path.join(workdir, "checkpoints")):
    raise ValueError(f"--from must be a workdir written by experiments.train or "
                     f"experiments.convert (config.json and checkpoints/) when --to_hf is "
                     f"given, got {workdir!r}")
  if not isinstance(directory, str) or not directory:
    raise ValueError(f"--to_hf must name a directory to create, got {directory!r}")
  if os.path.isdir(directory) and os.path.samefile(workdir, directory):
    raise ValueError(f"--to_hf={directory} is the workdir --from={workdir}; choose a new "
                     "directory")
  try:
    export_lib.check_target(directory, overwrite)
    run = loading.load_run(workdir)
    save_hf(run.model, None, directory, tokenizer=run.data.tokenizer,
            controller=run.controller, overwrite=overwrite, strict=strict)
  except ValueError as err:  # save_hf's keyword arguments are this script's flags
    raise ValueError(str(err).replace("overwrite=True", "--overwrite").replace(
        "strict=False", "--nostrict")) from None
  return run


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  checkpoint.quiet_orbax_logs()
  source, workdir = flags.FLAGS["from"].value, _TO.value
  if (workdir is None) == (_TO_HF.value is None):
    sys.exit("cannot convert: give exactly one of --to (Hugging Face directory -> workdir) "
             "and --to_hf (workdir -> Hugging Face directory)")
  if _TO_HF.value is not None:
    try:
      run = export_workdir(source, _TO_HF.value, overwrite=_OVERWRITE.value,
                           strict=_STRICT.value)
    except (ValueError, OSError) as err:
      sys.exit(f"cannot export {source}: {err}")
    print(f"wrote {_TO_HF.value} from {run.checkpoint}; load it with "
          "lte_jax.convert.load_hf, or with transformers after `import fla`")
    return
  try:
    config_args = [a for a in sys.argv[1:] if a.startswith(("--config", "--noconfig"))]
    command = convert_to_workdir(source, workdir, _CONFIG.value, config_args)
  except (ValueError, OSError) as err:  # OSError: --to not writable, disk full
    sys.exit(f"cannot convert {source}: {err}")
  print(f"wrote {workdir}; fine-tune with:\n  " + " ".join(shlex.quote(a) for a in command))


def parse_flags(argv: list[str]) -> list[str]:
  cli.exit_on_help(argv, __doc__, __name__, ALLOWED)
  config_flags_given = [a.split("=", 1)[0] for a in argv[1:]
                        if a.startswith(("--config", "--noconfig"))]
  if any(a == "--to_hf" or a.startswith("--to_hf=") for a in argv[1:]) and config_flags_given:
    sys.exit(f"FATAL Flags parsing error: {config_flags_given[0]} does not apply with --to_hf: "
             "the --from workdir's config.json holds the model")
  try:
    argv = config_files.resolve_command_line(default_config_args(argv))
  except ValueError as err:
    sys.exit(f"FATAL Flags parsing error: {err}")
  return app.parse_flags_with_usage(argv)


if __name__ == "__main__":
  flags.mark_flags_as_required(["from"])
  app.run(main, flags_parser=parse_flags)
