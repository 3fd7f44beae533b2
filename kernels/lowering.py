"""What every kernel folder shares about the two Pallas lowerings.

GPU kernels go through the Triton lowering (deprecated in JAX 0.11 in favour of
Mosaic GPU: keeping the choice here makes a move cheap), TPU kernels through
Mosaic. Each folder's backend.py adds only what is its own (its Plan's tuning
fields, token layouts, block specs) and calls `call` here.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable, Sequence

import jax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as pltriton

PLATFORMS = ("gpu", "tpu")


def default_platform() -> str:
  """'tpu' on TPU, else 'gpu' (the CPU only runs the kernels interpreted)."""
  return "tpu" if jax.default_backend() == "tpu" else "gpu"


def check_platform(platform: str) -> None:
  if platform not in PLATFORMS:
    raise ValueError(f"platform must be one of {PLATFORMS}, got {platform!r}")


def check_block_sizes(plan: Any, *names: str) -> None:
  """Each named field of `plan` is a power of two >= 16 (Triton dots need every dim >= 16;
  powers of two tile T and D evenly)."""
  for name in names:
    value = getattr(plan, name)
    if not _is_int(value) or value < 16 or value & (value - 1):
      raise ValueError(f"{name} must be a power of two >= 16, got {value!r}")


def check_counts(plan: Any, *names: str) -> None:
  """Each named field of `plan` (warps, stages, program counts) is an integer >= 1."""
  for name in names:
    value = getattr(plan, name)
    if not _is_int(value) or value < 1:
      raise ValueError(f"{name} must be an integer >= 1, got {value!r}")


Launch = tuple[tuple[str, int, int], ...]


def parse_launch(value: Any, kernels: Sequence[str]) -> Launch:
  """Per-kernel Triton launch parameters, normalised to ((name, num_warps, num_stages), ...).

  `value`: '' / () (none), a string 'name=warps/stages+name=warps/stages' (what benchmark
  flags pass; ',' also separates), a mapping name -> (warps, stages), or the normalised
  tuple. `kernels`: the folder's kernel names; anything else is refused with the list, so
  a typo cannot silently time the defaults.
  """
  if isinstance(value, str):
    entries = []
    for item in filter(None, (s.strip() for s in re.split("[,+]", value))):
      name, sep, spec = item.partition("=")
      warps, slash, stages = spec.partition("/")
      if not (sep and slash):
        raise ValueError(f"launch entries look like 'kernel=warps/stages', got {item!r}")
      try:
        entries.append((name.strip(), int(warps), int(stages)))
      except ValueError:
        raise ValueError(f"launch warps and stages must be integers, got {item!r}") from None
  elif isinstance(value, dict):
    entries = [(name, *ws) if isinstance(ws, (tuple, list)) else (name, ws)
               for name, ws in value.items()]
  else:
    entries = [tuple(e) for e in value]
  out = []
  for entry in entries:
    if len(entry) != 3:
      raise ValueError(f"launch entries are (kernel, num_warps, num_stages), got {entry!r}")
    name, warps, stages = entry
    if name not in kernels:
      raise ValueError(f"launch names unknown kernel {name!r}; kernels: {sorted(kernels)}")
    for what, n in (("num_warps", warps), ("num_stages", stages)):
      if not _is_int(n) or n < 1:
        raise ValueError(f"launch {what} of {name!r} must be an integer >= 1, got {n!r}")
    out.append((name, warps, stages))
  return tuple(sorted(dict((n, (n, w, s)) for n, w, s in out).values()))


DEFAULT_WARPS, DEFAULT_STAGES = 4, 2


def resolve_launch(plan: Any, kernels: Sequence[str], table: dict) -> None:
  """Fill a frozen Plan's num_warps / num_stages / launch in place.

  The measured per-kernel `table` applies on a real (not interpreted) GPU unless the plan
  gives a uniform num_warps / num_stages (the table would otherwise override it silently;
  the unset one of the two defaults to 4 warps / 2 stages). `launch` entries override the
  table, or the uniform values, for the kernels they name only, so one kernel can be
  re-launched without restating the others.
  """
  untouched = plan.num_warps is None and plan.num_stages is None
  measured = table if untouched and plan.platform == "gpu" and not plan.interpret else ()
  merged = {name: (warps, stages) for name, warps, stages in parse_launch(measured, kernels)}
  if plan.launch is not None:
    merged.update({name: (warps, stages)
                   for name, warps, stages in parse_launch(plan.launch, kernels)})
  for name, default in (("num_warps", DEFAULT_WARPS), ("num_stages", DEFAULT_STAGES)):
    if getattr(plan, name) is None:
      object.__setattr__(plan, name, default)
  check_counts(plan, "num_warps", "num_stages")
  object.__setattr__(plan, "launch", parse_launch(merged, kernels))


def launch_params(plan: Any, name: str) -> tuple[int, int]:
  """(num_warps, num_stages) of kernel `name`: its entry in plan.launch, else the plan's
  num_warps / num_stages."""
  for kernel, warps, stages in plan.launch:
    if kernel == name:
      return warps, stages
  return plan.num_warps, plan.num_stages


def _option_fields(plan_cls: Any, exclude: Sequence[str]) -> list[str]:
  """The Plan fields a caller may set: all but platform, interpret and `exclude`."""
  return sorted(f.name for f in dataclasses.fields(plan_cls)
                if f.name not in ("platform", "interpret", *exclude))


def check_option_keys(options: dict, plan_cls: Any, exclude: Sequence[str] = ()) -> None:
  """Plan keyword arguments from a caller: only fields other than platform, interpret and
  `exclude` (fields the op sets from its own arguments)."""
  allowed = _option_fields(plan_cls, exclude)
  unknown = sorted(set(options) - set(allowed))
  if unknown:
    raise ValueError(f"plan_options has unknown keys {unknown}; allowed: {allowed}")


def make_plan(plan_cls: Any, platform: str | None, interpret: bool | None,
              options: dict | None) -> Any:
  """plan_cls for `platform` (None: the default backend's); `interpret` None: on CPU only;
  `options`: its other fields, e.g. from `parse_options` (platform and interpret refused:
  they are arguments of their own)."""
  options = dict(options or {})
  for name in ("platform", "interpret"):
    if name in options:
      raise ValueError(f"plan_options must not set {name!r} (pass it as its own argument)")
  check_option_keys(options, plan_cls)
  if interpret is None:
    interpret = jax.default_backend() == "cpu"
  return plan_cls(platform or default_platform(), interpret=interpret, **options)


def parse_options(text: str, plan_cls: Any, exclude: Sequence[str] = ()) -> dict:
  """'block_v=32;num_warps=8;keep_states=True' -> Plan keyword arguments (for flags and
  config strings). Values: integers, True/False/None, else the string itself (the Plan
  validates them); keys must be fields of `plan_cls` other than platform, interpret and
  `exclude` (fields the op sets from its own arguments)."""
  allowed = _option_fields(plan_cls, exclude)
  options = {}
  for item in filter(None, (s.strip() for s in text.split(";"))):
    name, sep, value = item.partition("=")
    name, value = name.strip(), value.strip()
    if not sep:
      raise ValueError(f"plan options must look like 'name=value;...', got {item!r}")
    if name not in allowed:
      raise ValueError(f"unknown plan option {name!r}; allowed: {allowed}")
    options[name] = convert_value(value)
  return options


def convert_value(value: str) -> Any:
  """A flag value: an integer, True/False/None, else the string."""
  try:
    return int(value)
  except ValueError:
    return {"True": True, "False": False, "None": None}.get(value, value)


def _is_int(value) -> bool:
  return isinstance(value, int) and not isinstance(value, bool)


def call(kernel: Callable[..., None], *, platform: str, interpret: bool,
         grid: tuple[int, ...], in_specs: Sequence[Any], out_specs: Sequence[Any],
         out_shape: Sequence[jax.ShapeDtypeStruct], name: str, num_warps: int,
         num_stages: int, sequential_last: bool = False, scratch_shapes: Sequence[Any] = (),
         vmem_limit_bytes: int | None = None,
         input_output_aliases: dict[int, int] | None = None,
         num_scalar_prefetch: int = 0) -> Any:
  """pallas_call with the lowering's parameters.

  Every grid axis is parallel except, with `sequential_last`, the last (TPU
  "arbitrary": Mosaic runs it in order; Triton grids have no order, so GPU
  kernels must not ask for it). Scratch memory is a TPU notion. Interpreted, the
  TPU form runs in the TPU interpreter (it models VMEM/SMEM and the grid's order,
  poisons uninitialised memory and raises on out-of-bounds reads), the GPU form
  in the generic one. input_output_aliases: {input index: output index}, an output that
  updates its input's buffer in place (pallas_call's argument). num_scalar_prefetch (TPU
  only): the first that many inputs are int arrays in SMEM, read before the grid runs and
  passed to every index_map after the grid indices (blocks chosen by data).
  """
  if platform == "tpu":
    semantics = ("parallel",) * (len(grid) - 1) + (
        "arbitrary" if sequential_last else "parallel",)
    params = pltpu.CompilerParams(dimension_semantics=semantics,
                                  vmem_limit_bytes=vmem_limit_bytes)
  else:
    assert not sequential_last and not scratch_shapes, "Triton grids are unordered"
    params = pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages)
  if not interpret:
    mode: Any = False
  else:
    mode = pltpu.InterpretParams() if platform == "tpu" else True
  if num_scalar_prefetch:
    assert platform == "tpu", "scalar prefetch is a Mosaic notion"
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=num_scalar_prefetch, grid=grid, in_specs=list(in_specs),
        out_specs=list(out_specs), scratch_shapes=list(scratch_shapes))
  else:
    grid_spec = pl.GridSpec(grid=grid, in_specs=list(in_specs), out_specs=list(out_specs),
                            scratch_shapes=list(scratch_shapes))
  return pl.pallas_call(kernel, grid_spec=grid_spec, out_shape=list(out_shape),
                        compiler_params=params, interpret=mode, name=name,
                        input_output_aliases=dict(input_output_aliases or {}))
