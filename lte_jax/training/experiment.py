"""Turn a training ConfigDict (experiments/configs/*.py) into validated dataclass configs.

The ConfigDict is what a person edits and overrides on the command line; the
library takes frozen dataclasses. This module is the one place where the two
meet, so every unknown or ill-typed field is reported here with the valid names.
"""
from __future__ import annotations

import dataclasses
import json
from typing import Any

import ml_collections

from lte_jax import configs as configs_lib
from lte_jax import data as data_lib
from lte_jax.training import recipes
from lte_jax.training.evaluation import EvalConfig, validation_data
from lte_jax.training.optimizer import OptimizerConfig, learning_rate_schedule

_MIXER_CONFIGS = ("gdn", "attn", "swa", "lte", "nsa")
# The mixer config fields config.model may set as <mixer>_<field> (experiments/configs/base.py).
_MIXER_FIELDS = {"lte": ("dropout", "scorer_dtype", "plan_options"),
                 "gdn": ("plan_options", "conv_implementation")}


@dataclasses.dataclass(frozen=True)
class Experiment:
  """Everything a run needs, validated."""
  model: configs_lib.ModelConfig
  data: data_lib.DataConfig
  optim: OptimizerConfig
  steps: int
  seed: int
  grad_accum: int
  eval: EvalConfig = EvalConfig()


def _dataclass_from(cls: type, values: dict, prefix: str) -> Any:
  valid = {f.name for f in dataclasses.fields(cls)}
  unknown = sorted(set(values) - valid)
  if unknown:
    raise ValueError(f"unknown {prefix} field(s) {unknown}; valid fields: {sorted(valid)}")
  return cls(**values)


# Fields of config.model that change parameter shapes: a model read from a file keeps its own.
_SHAPE_FIELDS = ("num_layers", "d_model", "intermediate_size", "vocab_size")


def _model_from_file(path: str, overrides: dict) -> configs_lib.ModelConfig:
  """A ModelConfig JSON file (bare, or under a "model" key as in a workdir's config.json)."""
  fixed = sorted(k for k in overrides if k in _SHAPE_FIELDS)
  if fixed:
    raise ValueError(f"config.model.{fixed[0]} cannot be set together with config.model.from_file "
                     f"({path}): the file fixes the model's shapes")
  try:
    with open(path) as f:
      data = json.load(f)
  except (OSError, json.JSONDecodeError) as err:
    raise ValueError(f"config.model.from_file={path!r} is not a readable JSON file: {err}") from err
  if isinstance(data, dict) and isinstance(data.get("model"), dict):
    data = data["model"]
  return configs_lib.replace(configs_lib.from_dict(data), **overrides)


def model_config(config: ml_collections.ConfigDict) -> configs_lib.ModelConfig:
  """The ModelConfig of ``config.arch`` / ``config.size`` with ``config.model`` overrides.

  With ``config.model.from_file`` the model comes from that JSON file instead (e.g. one
  written by experiments.convert); only dtype, remat and the fields below apply on top.
  """
  overrides = {k: v for k, v in config.model.to_dict().items() if v is not None}
  # config.model.<mixer>_<field> -> that mixer config's <field> (_MIXER_FIELDS).
  mixer_fields = {mixer: {name: overrides.pop(f"{mixer}_{name}") for name in names
                          if f"{mixer}_{name}" in overrides}
                  for mixer, names in _MIXER_FIELDS.items()}
  implementation = overrides.pop("implementation", None)
  from_file = overrides.pop("from_file", None)
  if from_file is None:
    model = configs_lib.get_config(config.arch, config.size, **overrides)
  else:
    model = _model_from_file(from_file, overrides)
  if implementation is not None:
    model = configs_lib.replace(model, **{
        name: configs_lib.replace(getattr(model, name), implementation=implementation)
        for name in _MIXER_CONFIGS})
  for mixer, fields in mixer_fields.items():
    if fields:
      model = configs_lib.replace(model, **{
          mixer: configs_lib.replace(getattr(model, mixer), **fields)})
  return model


def describe_model(config: ml_collections.ConfigDict) -> str:
  """How logs and run names refer to the model: 'laLTE 0.4B', or the file it is read from."""
  from_file = config.model.get("from_file")
  return f"the model of {from_file}" if from_file else f"{config.arch} {config.size}"


def data_config(config: ml_collections.ConfigDict,
                model: configs_lib.ModelConfig) -> data_lib.DataConfig:
  values = config.data.to_dict()
  field, source = values.get("text_field", "text"), values.get("source")
  if field != "text" and source not in data_lib.FIELD_SOURCES:
    raise ValueError(f"config.data.text_field={field!r} names a field of {data_lib.FIELD_SOURCES} "
                     f"records, but config.data.source={source!r} has none: drop text_field or "
                     "set the source")
  values["mixture"] = {k: float(v) for k, v in values.get("mixture", {}).items() if v}
  values["model_vocab_size"] = model.vocab_size
  return _dataclass_from(data_lib.DataConfig, values, "config.data")


def optimizer_config(config: ml_collections.ConfigDict) -> OptimizerConfig:
  values = config.optim.to_dict()
  values.pop("grad_accum", None)   # the train step's, not the optimizer's
  values.pop("micro_batch_per_device", None)
  return _dataclass_from(OptimizerConfig, values, "config.optim")


def eval_config(config: ml_collections.ConfigDict) -> EvalConfig:
  """config.eval as an EvalConfig; a config without an eval section (a run written before
  it existed) evaluates nothing and holds nothing out."""
  if "eval" not in config:
    return EvalConfig()
  return _dataclass_from(EvalConfig, config.eval.to_dict(), "config.eval")


def resolve(config: ml_collections.ConfigDict, *, num_devices: int | None = None) -> Experiment:
  """Validate ``config`` and build the dataclass configs of a run.

  Unset fields take the values of ``config.recipe`` (lte_jax.training.recipes). With
  ``config.optim.micro_batch_per_device`` the accumulation follows from the devices
  that split the batch: ``num_devices`` in all (default jax.device_count()).
  """
  config = recipes.apply(config)
  for name in ("steps", "seed"):
    value = config[name]
    if not isinstance(value, int) or value < (1 if name == "steps" else 0):
      raise ValueError(f"config.{name} must be an integer >= {1 if name == 'steps' else 0}, "
                       f"got {value!r}")
  model = model_config(config)
  data = data_config(config, model)
  grad_accum = recipes.grad_accum(config, num_devices)
  if data.batch_size % grad_accum:
    raise ValueError(f"config.data.batch_size={data.batch_size} must be divisible by "
                     f"config.optim.grad_accum={grad_accum}")
  optim = optimizer_config(config)
  learning_rate_schedule(optim, config.steps)  # checks warmup_steps < steps
  evaluation = eval_config(config)
  if evaluation.path is not None and (evaluation.source or data.source) == "embedded":
    raise ValueError(f"config.eval.path={evaluation.path!r} is not read by the 'embedded' source "
                     f"(config.eval.source={evaluation.source!r}, default config.data.source): set "
                     f"config.eval.source to one of {data_lib.FILE_SOURCES}")
  if evaluation.every:
    validation_data(evaluation, data)  # checks there is something to validate on
  return Experiment(model=model, data=data, optim=optim, steps=config.steps,
                    seed=config.seed, grad_accum=grad_accum, eval=evaluation)


def to_json(config: ml_collections.ConfigDict, experiment: Experiment) -> str:
  """The resolved run: the ConfigDict as given plus the dataclass configs it produced."""
  def plain(x):
    return json.loads(json.dumps(dataclasses.asdict(x), default=list))
  return json.dumps({
      "config": config.to_dict(),
      "model": plain(experiment.model),
      "data": plain(experiment.data),
      "optim": plain(experiment.optim),
      "grad_accum": experiment.grad_accum,
      "eval": plain(experiment.eval),
  }, indent=2, sort_keys=True, default=str)
