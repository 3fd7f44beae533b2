r"""The paper's finding at small scale: which architecture remembers, at what memory.

    python -m experiments.reproduce --workdir=/tmp/study            # everything
    python -m experiments.reproduce --workdir=/tmp/study --stage=train --archs=laLTE
    python -m experiments.reproduce --workdir=/tmp/study --smoke    # toy size, CPU, ~1 min

Trains every architecture of the study (GDN, GDN_SWA, GDN_Attn, laLTE, laNSA, transformer;
two seeds for laLTE and GDN_SWA) at one preset (experiments/reproduction/preset.py: same
depth, width, data, steps and optimiser for all; the paper's windows scaled to the training
length) on the Python standard library's sources mixed with NIAH and MQAR documents, then
evaluates each (experiments/reproduction/evaluate.py: S-NIAH-1/2/3 at 1x, 2x and 4x the
training length, teacher-forced and greedy; MQAR; held-out loss by position; decode-cache
bytes; decode vs forward; the LTE cache's kept tokens around the needle) and writes the
report (WORKDIR/report: results.json, report.md, PNG plots).

Each model lives in WORKDIR/runs/<arch>-s<seed>: training resumes from its newest
checkpoint, and a finished stage (a run at its last step, a study_eval.json) is skipped, so
the study can be spread over many shorter jobs. --parallel=N trains and evaluates N models
at once in child processes on one GPU (small models leave most of it idle).
"""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time

from absl import app, flags, logging

from experiments import cli
from experiments import training_loop as train_lib
from experiments.configs.base import get_base_config
from experiments.reproduction import corpus as corpus_lib
from experiments.reproduction import preset as preset_lib
from experiments.reproduction import report as report_lib

STAGES = ("train", "eval", "report")

_WORKDIR = flags.DEFINE_string("workdir", None, "Study folder: corpus/, runs/, report/.")
_PRESET = flags.DEFINE_enum("preset", "small", list(preset_lib.PRESETS),
                            "Study size (experiments/reproduction/preset.py).")
_SMOKE = flags.DEFINE_bool("smoke", False, "The 'smoke' preset on a small slice of the corpus: "
                           "the whole pipeline at toy size on a CPU.")
_ARCHS = flags.DEFINE_list("archs", list(preset_lib.STUDY_ARCHS), "Architectures to run.")
_SEEDS = flags.DEFINE_integer("seeds", 2, "Seeds for the architectures the preset trains "
                              "twice (laLTE, GDN_SWA; at least 2); the others get one.",
                              lower_bound=1)
_STAGE = flags.DEFINE_list("stage", list(STAGES), f"Stages to run, of {STAGES}.")
_PARALLEL = flags.DEFINE_integer("parallel", 1, "Models trained and evaluated at once (child "
                                 "processes sharing the device).", lower_bound=1)
_SITE_PACKAGES = flags.DEFINE_bool(
    "site_packages", False, "Add the installed packages' .py sources to the corpus (where "
    "the Python install ships a small standard library). Fixed at the study's first run.")
_RUNS = flags.DEFINE_list("runs", None, "Models as 'arch:seed', instead of --archs / --seeds "
                          "(e.g. laLTE:1,GDN_SWA:1).")
_CHILD = flags.DEFINE_bool("child", False, "Set for --parallel's child processes (they leave "
                           "study.json and the report to the parent).")


def run_name(arch: str, seed: int) -> str:
  return f"{arch}-s{seed}"


def training_config(preset: preset_lib.StudyPreset, arch: str, seed: int, corpus_path: str,
                    model_file: str):
  """The experiments.train ConfigDict of one model of the study."""
  c = get_base_config()
  c.unlock()
  c.arch, c.seed, c.steps = arch, 42 + seed, preset.steps
  c.model.from_file = model_file
  c.model.dtype = preset.dtype
  c.model.init = "reference"            # the paper's recipe, where it does not depend on scale
  c.optim.weight_decay_mask = "all"
  c.optim.nonfinite = "skip_update"
  c.data.document_masking = False
  c.data.append_eos = False
  c.model.remat = "none"
  c.model.scan_layers = False
  c.optim.learning_rate = preset.learning_rate
  c.optim.warmup_steps = preset.warmup_steps
  c.optim.grad_accum = 1
  c.mesh.data, c.mesh.fsdp = -1, 1
  c.data.source, c.data.path, c.data.tokenizer = "jsonl", corpus_path, "byte"
  c.data.seq_len, c.data.batch_size = preset.seq_len, preset.batch_size
  c.data.mixture = dict(preset.mixture)
  c.data.mqar_seq_len = preset.mqar_seq_len
  c.data.mqar_num_pairs = preset.mqar_num_pairs
  c.eval.every = preset.steps // 6 if preset.steps >= 6 else preset.steps
  c.eval.batches = 4 if preset.name != "smoke" else 1
  c.eval.holdout = 0.01
  c.checkpoint.every = preset.checkpoint_every
  c.checkpoint.keep = 2  # the newest may be cut off mid-save; the one before resumes
  c.log.every = preset.log_every
  c.log.tensorboard = False
  return c


class Study:
  """Paths and stages of one study folder."""

  def __init__(self, workdir: str, preset: preset_lib.StudyPreset, smoke: bool,
               site_packages: bool = False):
    self.workdir, self.preset, self.smoke = workdir, preset, smoke
    self.site_packages = site_packages
    self.corpus_path = os.path.join(workdir, "corpus", "stdlib.jsonl")

  def run_dir(self, arch: str, seed: int) -> str:
    return os.path.join(self.workdir, "runs", run_name(arch, seed))

  def prepare(self, record_study: bool = True) -> dict:
    """The corpus (built once) and, with ``record_study``, the study's record of its preset."""
    os.makedirs(self.workdir, exist_ok=True)
    manifest = corpus_lib.build(self.corpus_path, max_bytes=400_000 if self.smoke else None,
                                site_packages=self.site_packages)
    record = os.path.join(self.workdir, "study.json")
    if not record_study:
      return manifest
    info = json.loads(json.dumps({  # as read back: lists for tuples
        "preset": dataclasses.asdict(self.preset), "corpus": manifest,
        "windows": preset_lib.scaled_windows(self.preset.seq_len)}))
    if os.path.exists(record):
      with open(record) as f:
        old = json.load(f)
      if old["preset"] != info["preset"]:
        raise ValueError(f"{self.workdir} holds a study of another preset "
                         f"({old['preset']['name']}): use another --workdir")
    with open(record, "w") as f:
      json.dump(info, f, indent=2)
    return manifest

  def train(self, arch: str, seed: int) -> None:
    path = self.run_dir(arch, seed)
    os.makedirs(path, exist_ok=True)
    model_file = os.path.join(path, "model.json")
    with open(model_file, "w") as f:
      json.dump(dataclasses.asdict(preset_lib.model_config(self.preset, arch)), f, default=list)
    config = training_config(self.preset, arch, seed, self.corpus_path, model_file)
    ckpts = os.path.join(path, "checkpoints")
    first = max([int(s) for s in os.listdir(ckpts) if s.isdigit()], default=0) if (
        os.path.isdir(ckpts)) else 0
    start = time.time()
    state = train_lib.train(config, path, prepare_workdir=lambda: train_lib.write_config(
        config, path))
    # Each job that trained adds a segment [first step, last step, seconds]: the time per
    # model in the report is their sum, resumed parts included.
    timing_path = os.path.join(path, "train_time.json")
    timing = {"segments": []}
    if os.path.exists(timing_path):
      with open(timing_path) as f:
        timing = json.load(f)
    if int(state.step) > first:
      timing["segments"].append([first, int(state.step), time.time() - start])
      timing.update(step=int(state.step),
                    seconds=sum(seg[2] for seg in timing["segments"]))
      with open(timing_path, "w") as f:
        json.dump(timing, f)

  def evaluate(self, arch: str, seed: int) -> None:
    from experiments.reproduction import evaluate as evaluate_lib  # jax-heavy: only here
    from lte_jax.data.tokenizers import get_tokenizer
    from lte_jax.evals import loading
    from lte_jax.training import experiment
    path = self.run_dir(arch, seed)
    out = os.path.join(path, "study_eval.json")
    if os.path.exists(out):
      logging.info("%s: evaluated already (%s)", run_name(arch, seed), out)
      return
    run = loading.load_run(path)
    if run.step < self.preset.steps:
      raise ValueError(f"{path} is at step {run.step} of {self.preset.steps}: train it first "
                       "(--stage=train)")
    exp = experiment.resolve(loading.read_run_config(path))
    start = time.time()
    print(f"evaluating {run_name(arch, seed)} (step {run.step})", flush=True)
    results = evaluate_lib.evaluate_model(run.model, get_tokenizer(run.data.tokenizer), run.data,
                                          exp.eval, self.preset)
    results.update(arch=arch, seed=seed, step=run.step, seconds=time.time() - start)
    with open(out + ".tmp", "w") as f:
      json.dump(results, f)
    os.replace(out + ".tmp", out)


def _children(study: Study, runs: list[tuple[str, int]], stages: list[str]) -> None:
  """Train / evaluate ``runs`` in --parallel child processes sharing the device."""
  pending = list(runs)
  active: list[tuple[subprocess.Popen, str]] = []
  fraction = max(0.05, 0.9 / _PARALLEL.value)
  failed = []
  logs = os.path.join(study.workdir, "logs")
  os.makedirs(logs, exist_ok=True)
  while pending or active:
    while pending and len(active) < _PARALLEL.value:
      arch, seed = pending.pop(0)
      name = run_name(arch, seed)
      cmd = [sys.executable, "-m", "experiments.reproduce", f"--workdir={study.workdir}",
             f"--preset={study.preset.name}", f"--runs={arch}:{seed}", "--child",
             f"--site_packages={study.site_packages}",
             f"--stage={','.join(stages)}"] + (["--smoke"] if study.smoke else [])
      env = dict(os.environ, XLA_PYTHON_CLIENT_MEM_FRACTION=f"{fraction:.2f}")
      log = open(os.path.join(logs, name + ".log"), "a")
      active.append((subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env), name))
      print(f"started {name} (log: {log.name})", flush=True)
    time.sleep(2)
    for proc, name in list(active):
      if proc.poll() is not None:
        active.remove((proc, name))
        print(f"{name}: {'done' if proc.returncode == 0 else f'FAILED ({proc.returncode})'}",
              flush=True)
        if proc.returncode:
          failed.append(name)
  if failed:
    raise RuntimeError(f"runs failed: {failed} (logs in {logs})")


def _parse_runs(values: list[str]) -> list[tuple[str, int]]:
  out = []
  for value in values:
    arch, sep, seed = value.strip().partition(":")
    if not sep or arch not in preset_lib.STUDY_ARCHS or not seed.isdigit():
      raise ValueError(f"--runs: {value!r} is not 'arch:seed' with arch one of "
                       f"{','.join(preset_lib.STUDY_ARCHS)} and seed an integer >= 0")
    out.append((arch, int(seed)))
  return out


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  if not _WORKDIR.value:
    raise app.UsageError("--workdir is required")
  stages = [s.strip() for s in _STAGE.value]
  bad = [s for s in stages if s not in STAGES]
  if bad:
    sys.exit(f"--stage: {bad[0]!r} is not a stage; allowed: {','.join(STAGES)}")
  archs = [a.strip() for a in _ARCHS.value]
  bad = [a for a in archs if a not in preset_lib.STUDY_ARCHS]
  if bad:
    sys.exit(f"--archs: {bad[0]!r} is not an architecture of the study; allowed: "
             f"{','.join(preset_lib.STUDY_ARCHS)}")
  preset = preset_lib.get_preset("smoke" if _SMOKE.value else _PRESET.value)
  study = Study(os.path.abspath(_WORKDIR.value), preset, _SMOKE.value, _SITE_PACKAGES.value)
  from lte_jax.training import checkpoint
  checkpoint.quiet_orbax_logs()
  try:
    study.prepare(record_study=not _CHILD.value)
    runs = (_parse_runs(_RUNS.value) if _RUNS.value
            else preset_lib.runs(preset, tuple(archs), _SEEDS.value))
  except ValueError as err:
    sys.exit(f"reproduce: {err}")
  work = [s for s in stages if s != "report"]
  if work and _PARALLEL.value > 1 and not _CHILD.value:
    _children(study, runs, work)
  else:
    for arch, seed in runs:
      if "train" in work:
        study.train(arch, seed)
      if "eval" in work:
        study.evaluate(arch, seed)
  if "report" in stages and not _CHILD.value:
    paths = report_lib.write(study.workdir)
    print("wrote " + ", ".join(paths), flush=True)


def parse_flags(argv: list[str]) -> list[str]:
  cli.exit_on_help(argv, __doc__, __name__, cli.allowed_values({
      "--preset": tuple(preset_lib.PRESETS), "--archs": preset_lib.STUDY_ARCHS,
      "--stage": STAGES}))
  return app.parse_flags_with_usage(argv)


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
