"""Argument validation shared by every public entry point.

Each check raises ``ValueError`` naming the argument and what is allowed, so a
user sees the mistake before XLA reports a shape error deep inside a trace.
"""
from __future__ import annotations

from typing import Any, Iterable, Sequence

import jax.numpy as jnp
import numpy as np

FLOAT_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)


def check_rank(name: str, x: Any, rank: int, layout: str) -> None:
  """Raise unless ``x`` has ``rank`` dimensions; ``layout`` names them, e.g. '[B, T, H, D]'."""
  ndim = getattr(x, "ndim", None)
  if ndim != rank:
    shape = getattr(x, "shape", type(x).__name__)
    raise ValueError(f"{name} must have rank {rank} with layout {layout}, got shape {shape}")


def check_shape(name: str, x: Any, expected: Sequence[int | None], layout: str) -> None:
  """Raise unless ``x.shape`` matches ``expected`` (None matches any size)."""
  check_rank(name, x, len(expected), layout)
  for got, want in zip(x.shape, expected):
    if want is not None and got != want:
      want_str = "[" + ", ".join("*" if w is None else str(w) for w in expected) + "]"
      raise ValueError(f"{name} must have shape {want_str} ({layout}), got {tuple(x.shape)}")


def check_float_dtype(name: str, x: Any, allowed: Iterable[Any] = FLOAT_DTYPES) -> None:
  allowed = tuple(jnp.dtype(a) for a in allowed)
  if jnp.dtype(x.dtype) not in allowed:
    names = ", ".join(a.name for a in allowed)
    raise ValueError(f"{name} must have dtype in ({names}), got {jnp.dtype(x.dtype).name}")


def check_int_dtype(name: str, x: Any) -> None:
  if not jnp.issubdtype(jnp.dtype(x.dtype), jnp.integer):
    raise ValueError(f"{name} must have an integer dtype, got {jnp.dtype(x.dtype).name}")


def check_choice(name: str, value: Any, allowed: Iterable[Any]) -> None:
  allowed = tuple(allowed)
  if value not in allowed:
    raise ValueError(f"{name} must be one of {allowed}, got {value!r}")


def check_positive_int(name: str, value: Any, *, allow_zero: bool = False) -> None:
  ok = isinstance(value, (int, np.integer)) and not isinstance(value, bool)
  if not ok or value < (0 if allow_zero else 1):
    bound = ">= 0" if allow_zero else ">= 1"
    raise ValueError(f"{name} must be an integer {bound}, got {value!r}")


def check_segment_ids(segment_ids: Any, batch: int, time: int) -> None:
  """segment_ids: [B, T] integers; equal ids form one document, 0 marks padding."""
  if segment_ids is None:
    return
  check_shape("segment_ids", segment_ids, (batch, time), "[batch, time]")
  check_int_dtype("segment_ids", segment_ids)


def check_plan_options(plan_options, implementation) -> None:
  """Kernel tuning options (the op's kernels' Plan fields) go with 'pallas' only."""
  if plan_options is None:
    return
  if implementation != "pallas":
    raise ValueError(f"plan_options is only accepted with implementation='pallas', got "
                     f"implementation={implementation!r}")
  if not isinstance(plan_options, dict):
    raise ValueError(f"plan_options must be None or a dict of Plan fields, got "
                     f"{type(plan_options).__name__}")
