"""Argument checks shared by every gated delta rule entry point."""
from __future__ import annotations

import numbers
from typing import Any

from lte_jax._checks import (check_float_dtype, check_rank, check_segment_ids,
                             check_shape, check_values)

BTHD = "[batch, time, heads, dim]"
BTH = "[batch, time, heads]"


def validate_args(q: Any, k: Any, v: Any, g: Any, beta: Any, *, scale: Any,
                  initial_state: Any, segment_ids: Any) -> tuple[int, int, int, int, int]:
  """Raise ValueError naming the first bad argument; return (B, T, H, Dk, Dv)."""
  check_rank("q", q, 4, BTHD)
  batch, time, heads, dk = q.shape
  check_shape("k", k, (batch, time, heads, dk), BTHD)
  check_shape("v", v, (batch, time, heads, None), BTHD)
  dv = v.shape[-1]
  check_shape("g", g, (batch, time, heads), BTH)
  check_shape("beta", beta, (batch, time, heads), BTH)
  for name, x in (("q", q), ("k", k), ("v", v), ("g", g), ("beta", beta)):
    check_float_dtype(name, x)
  if min(batch, time, heads, dk, dv) < 1:
    raise ValueError(f"batch, time, heads and head dims must be >= 1, got q "
                     f"{tuple(q.shape)}, v {tuple(v.shape)}")
  # Values are checked only where concrete (see check_values); the docstring of
  # chunk_gated_delta_rule says what traced bad values do.
  check_values("g", g, lambda x: x <= 0, "<= 0 (a log decay; no NaN)")
  check_values("beta", beta, lambda x: (x >= 0) & (x <= 1), "in [0, 1] (no NaN)")
  if initial_state is not None:
    check_shape("initial_state", initial_state, (batch, heads, dk, dv),
                "[batch, heads, key_dim, value_dim]")
    check_float_dtype("initial_state", initial_state)
  check_segment_ids(segment_ids, batch, time)
  if scale is not None:
    ok = isinstance(scale, numbers.Real) and not isinstance(scale, bool)
    if not ok or not scale > 0 or scale == float("inf"):
      raise ValueError(f"scale must be None or a finite positive number, got {scale!r}")
  return batch, time, heads, dk, dv
