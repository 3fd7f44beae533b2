"""Argument validation shared by every public entry point.

Each check raises ``ValueError`` naming the argument and what is allowed, so a
user sees the mistake before XLA reports a shape error deep inside a trace.
"""
from __future__ import annotations

from typing import Any, Callable, Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

FLOAT_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)
# Sizes, windows and positions meet int32 index arithmetic inside the ops.
MAX_INT32 = 2 ** 31 - 1


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
  """An int >= 1 (>= 0 with allow_zero) and <= MAX_INT32."""
  ok = isinstance(value, (int, np.integer)) and not isinstance(value, bool)
  if not ok or value < (0 if allow_zero else 1):
    bound = ">= 0" if allow_zero else ">= 1"
    raise ValueError(f"{name} must be an integer {bound}, got {value!r}")
  if value > MAX_INT32:
    raise ValueError(f"{name} must be an integer <= 2**31 - 1 (int32 index arithmetic), "
                     f"got {value!r}")


def check_nonempty(name: str, x: Any, layout: str) -> None:
  """Raise if any dimension of ``x`` is 0 (an empty batch, sequence or head)."""
  if any(n == 0 for n in x.shape):
    raise ValueError(f"{name} must have every dimension >= 1 ({layout}), got shape "
                     f"{tuple(x.shape)}")


def concrete(x: Any) -> np.ndarray | None:
  """x's values as numpy when they are known here, None when traced (under jit, grad or
  vmap) or spread over several processes. Values are checked only when concrete: a
  traced check would need a host sync (or checkify), so under jit each op documents
  what bad values do instead. Reading a device array here waits for it."""
  if x is None or isinstance(x, jax.core.Tracer):
    return None
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    return None   # spread over processes: no one host holds the values
  return np.asarray(x)


def check_values(name: str, x: Any, ok: Callable[[np.ndarray], np.ndarray],
                 allowed: str) -> None:
  """Raise unless ok(values) holds at every entry of a concrete ``x`` (traced: no check),
  naming the first bad entry."""
  values = concrete(x)
  if values is None:
    return
  if values.dtype.kind in "fV":   # 'V': bfloat16
    values = values.astype(np.float64)
  bad = ~ok(values)
  if not bad.any():
    return
  if values.ndim == 0:
    raise ValueError(f"{name} must be {allowed}, got {values.item()!r}")
  where = tuple(int(i) for i in np.argwhere(bad)[0])
  raise ValueError(f"{name} must be {allowed}, got {values[where].item()!r} at index "
                   f"{where} ({int(bad.sum())} bad entries)")


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
