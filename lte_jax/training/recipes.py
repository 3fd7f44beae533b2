"""Training recipes: what a training config leaves unset, filled in by name (config.recipe).

experiments/configs/base.py leaves the fields of ``RECIPES`` unset (None); ``apply``
fills each one that is still None from the recipe that ``config.recipe`` names, so
whatever the config file or the command line sets wins:
``--config.recipe=paper --config.optim.weight_decay_mask=matrices`` is the paper's
recipe with that one change.

'default': a tiny model on the embedded corpus, minutes on a laptop CPU; decay on the
  matrices only, skipped non-finite steps leave everything but the step counters alone,
  normal(init_std) initialisation, documents masked from each other and ended by EOS.
'paper': the reference trainer's recipe (PAPER.md section 5; the authors' flame
  trainer): 256 sequences x 4096 tokens a step (1,048,576 tokens) in micro-batches of 8
  sequences per device, the accumulation derived from the devices that split the batch
  (32 on one device, 4 on eight; the reference: 8 x 2 GPUs x 16); 30720 steps at 1.4B
  (32.2B tokens) and 9537 at 0.4B (10.0B tokens: the fewest steps reaching 10^10);
  AdamW with weight decay on every parameter, 512 warm-up steps, a non-finite step
  that still advances the schedule and the LTE controller, the reference's
  initialisation, remat and the layer scan (memory only), FSDP over every device, and
  its data: BOS-only documents packed into rows that every mixer reads as one sequence
  (data.append_eos=False, data.document_masking=False; lte_jax.data.boundaries).
  Learning rate 3e-4, betas 0.9 / 0.95, eps 1e-15, weight decay 0.1, cosine to 0.1 x,
  clip 1.0, seed 42 and bf16 compute are base.py's values under both recipes.

A value may depend on the model size: {size: value}; a size without an entry must set
the field itself.
"""
from __future__ import annotations

import copy
from typing import Any

import jax
import ml_collections

from lte_jax.training import mesh as mesh_lib

RECIPES: dict[str, dict[str, Any]] = {
    "default": {
        "steps": 300,
        "data.seq_len": 256,
        "data.batch_size": 8,
        "optim.grad_accum": 1,
        "optim.warmup_steps": 30,
        "optim.weight_decay_mask": "matrices",
        "optim.nonfinite": "skip_step",
        "model.init": "normal",
        "model.remat": "none",
        "model.scan_layers": False,
        "mesh.data": -1,
        "mesh.fsdp": 1,
        "data.document_masking": True,
        "data.append_eos": True,
    },
    "paper": {
        "steps": {"0.4B": 9537, "1.4B": 30720},
        "data.seq_len": 4096,
        "data.batch_size": 256,
        "optim.micro_batch_per_device": 8,
        "optim.warmup_steps": 512,
        "optim.weight_decay_mask": "all",
        "optim.nonfinite": "skip_update",
        "model.init": "reference",
        "model.remat": "dots_mixers",
        "model.scan_layers": True,
        "mesh.data": 1,
        "mesh.fsdp": -1,
        "data.document_masking": False,
        "data.append_eos": False,
    },
}
# Fields filled together: a config that sets any one of them gets none from the recipe
# (the accumulation is either a count or derived from a per-device micro-batch).
_TOGETHER = (("optim.grad_accum", "optim.micro_batch_per_device"),)


def _get(config: ml_collections.ConfigDict, dotted: str) -> tuple[bool, Any]:
  """(exists, value) of the field 'a.b.c'."""
  node = config
  for key in dotted.split("."):
    if not isinstance(node, ml_collections.ConfigDict) or key not in node:
      return False, None
    node = node[key]
  return True, node


def _set(config: ml_collections.ConfigDict, dotted: str, value: Any) -> None:
  *parents, key = dotted.split(".")
  node = config
  for parent in parents:
    node = node[parent]
  node[key] = value


def recipe_name(config: ml_collections.ConfigDict) -> str:
  """config.recipe, checked ('default' for a config written before recipes existed)."""
  name = config.get("recipe", "default")
  if name not in RECIPES:
    raise ValueError(f"config.recipe must be one of {tuple(RECIPES)}, got {name!r}")
  return name


def apply(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """A copy of ``config`` with every unset (None) field of its recipe filled in.

  Fields the config does not have (a config written before they existed) stay
  absent: the dataclass defaults, the 'default' recipe's values, apply to them.
  """
  name = recipe_name(config)
  out = copy.deepcopy(config)
  values = RECIPES[name]
  held = {f for group in _TOGETHER
          if any(_get(config, f)[1] is not None for f in group) for f in group}
  for field, value in values.items():
    exists, current = _get(out, field)
    if not exists or current is not None or field in held:
      continue
    if isinstance(value, dict):
      size = config.get("size")
      if size not in value:
        raise ValueError(f"config.{field} is unset and recipe {name!r} sets it for sizes "
                         f"{sorted(value)} only, not config.size={size!r}: set "
                         f"config.{field}")
      value = value[size]
    _set(out, field, value)
  return out


def grad_accum_for(batch_size: int, micro_batch_per_device: int, batch_devices: int) -> int:
  """Micro-batches per update when each of ``batch_devices`` devices (the mesh's data x
  fsdp, which split the batch) takes ``micro_batch_per_device`` sequences a micro-batch:
  batch_size / (micro_batch_per_device x batch_devices), which must be a whole number."""
  for name, value in (("config.data.batch_size", batch_size),
                      ("config.optim.micro_batch_per_device", micro_batch_per_device),
                      ("batch_devices", batch_devices)):
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
      raise ValueError(f"{name} must be a positive integer, got {value!r}")
  per_micro = micro_batch_per_device * batch_devices
  if batch_size % per_micro:
    raise ValueError(f"config.data.batch_size={batch_size} must be a multiple of "
                     f"config.optim.micro_batch_per_device={micro_batch_per_device} x "
                     f"{batch_devices} device(s) splitting the batch (mesh data x fsdp) = "
                     f"{per_micro}")
  return batch_size // per_micro


def grad_accum(config: ml_collections.ConfigDict, num_devices: int | None = None) -> int:
  """Micro-batches per update of a filled config (``apply``): config.optim.grad_accum, or
  derived from config.optim.micro_batch_per_device and the devices of config.mesh that
  split the batch (``num_devices`` in all, default jax.device_count())."""
  accum = config.optim.get("grad_accum")
  micro = config.optim.get("micro_batch_per_device")
  if micro is None:
    if not isinstance(accum, int) or isinstance(accum, bool) or accum < 1:
      raise ValueError(f"config.optim.grad_accum must be a positive integer, got {accum!r}")
    return accum
  if accum is not None:
    raise ValueError(f"set one of config.optim.grad_accum ({accum!r}) and "
                     f"config.optim.micro_batch_per_device ({micro!r}), not both")
  devices = jax.device_count() if num_devices is None else num_devices
  data, fsdp, _ = mesh_lib.mesh_shape(**config.mesh, num_devices=devices)
  return grad_accum_for(config.data.batch_size, micro, data * fsdp)
