"""The NSA selected-block kernels' side of the lowerings (the shared side: kernels/lowering.py).

GPU kernels use the Triton lowering, TPU kernels Mosaic; both run the same kernel bodies
and differ in where K and V live (`Layout`), where the integer tables live (SMEM on TPU)
and in the compiler parameters (`call`). Queries are grouped by KV head: q, o, dO and
dq are [B, Tp, Hkv, Gp, D] (a free reshape of [B, T, Hq, D]) in both forms, so one
token's query heads are one [Gp, D] tile.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import jax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from lte_jax.kernels import lowering
from lte_jax.kernels.lowering import PLATFORMS, default_platform  # noqa: F401  (re-exported)

# The folder's pallas_calls, by the names they carry (profiles, Plan.launch).
KERNELS = ("nsa_selected_fwd", "nsa_selected_dq", "nsa_selected_dkv")
# Tokens per program of the query-side kernels. GPU: one, FLA's parallel_nsa grid
# (B * T * Hkv programs keep every SM busy). TPU: a grid step costs ~0.35 us, so a
# program walks several tokens.
_DEFAULT_BLOCK_T = {"gpu": 1, "tpu": 8}
_DEFAULT_VMEM_MIB = 48
# Measured on an H100 (2026-12-07, BENCHMARKS.md, 32 / 2 heads of 64, blocks of 64, 16
# selected): 2 warps take the forward kernel from 1.42 to 1.17 ms and dq from 1.38 to 1.14
# at 4 x 4096 (1.52 -> 1.26, 1.51 -> 1.24 at 1 x 16384). dk/dv keeps 4 / 2: 2 warps slowed
# its earlier form from 4.06 to 7.20 ms; its current form is not yet tuned.
GPU_LAUNCH: dict[str, tuple[int, int]] = {"nsa_selected_fwd": (2, 2), "nsa_selected_dq": (2, 2)}


@dataclasses.dataclass(frozen=True)
class Plan:
  """Static choices for one call: target lowering and tuning knobs (hashable).

  platform: 'gpu' (Triton lowering) or 'tpu' (Mosaic).
  interpret: run the kernels with the Pallas interpreter (CPU tests); the platform still
    decides the layout and the kernel parameters.
  block_t: query tokens per program of the forward and dq kernels (a power of two; None:
    1 on GPU, 8 on TPU).
  num_warps, num_stages: Triton launch parameters of every kernel without a `launch`
    entry (None: 4 and 2).
  launch: per-kernel (num_warps, num_stages), e.g. 'nsa_selected_dkv=2/2'
    (lowering.parse_launch; names in KERNELS).
  vmem_limit_mib: Mosaic's scoped VMEM limit (the TPU kernels keep one (batch, KV head)'s
    whole K and V, and in the dk/dv kernel its whole Q and dO, in VMEM).
  """
  platform: str
  interpret: bool = False
  block_t: int | None = None
  num_warps: int | None = None
  num_stages: int | None = None
  launch: Any = None
  vmem_limit_mib: int = _DEFAULT_VMEM_MIB

  def __post_init__(self):
    lowering.check_platform(self.platform)
    if self.block_t is None:
      object.__setattr__(self, "block_t", _DEFAULT_BLOCK_T[self.platform])
    if (not isinstance(self.block_t, int) or isinstance(self.block_t, bool) or self.block_t < 1
        or self.block_t & (self.block_t - 1)):
      raise ValueError(f"block_t must be a power of two >= 1, got {self.block_t!r}")
    lowering.check_counts(self, "vmem_limit_mib")
    lowering.resolve_launch(self, KERNELS, GPU_LAUNCH)

  @property
  def native_layout(self) -> bool:
    """K and V stay [B, T, Hkv, D] (GPU: strided Triton blocks, no transposes)."""
    return self.platform == "gpu"

  @property
  def pads_dims(self) -> bool:
    """Triton dots need power-of-two dims >= 16: the group and head dims are padded
    (zero rows and columns are inert). Mosaic takes a block's full dims."""
    return self.platform == "gpu"


def make_plan(platform: str | None = None, interpret: bool | None = None,
              options: dict | None = None) -> Plan:
  """Plan for `platform` (None: the default backend's); `interpret` None: on CPU only;
  `options`: Plan fields, e.g. from `parse_options`."""
  return lowering.make_plan(Plan, platform, interpret, options)


def parse_options(text: str) -> dict:
  """'block_t=2;num_warps=2' -> {'block_t': 2, 'num_warps': 2} (for benchmark flags)."""
  return lowering.parse_options(text, Plan)


def call(kernel: Callable[..., None], plan: Plan, *, grid: tuple[int, ...],
         in_specs: Sequence[Any], out_specs: Sequence[pl.BlockSpec],
         out_shape: Sequence[jax.ShapeDtypeStruct], name: str) -> Any:
  """lowering.call with this plan; every grid axis is parallel."""
  num_warps, num_stages = lowering.launch_params(plan, name)
  return lowering.call(kernel, platform=plan.platform, interpret=plan.interpret, grid=grid,
                       in_specs=in_specs, out_specs=out_specs, out_shape=out_shape, name=name,
                       num_warps=num_warps, num_stages=num_stages,
                       vmem_limit_bytes=plan.vmem_limit_mib * 2 ** 20)


def table_row(plan: Plan, table: jax.Array) -> pl.BlockSpec:
  """Row (b, h, n) of an int32 table [B, Hkv, N, 1, length] on a (B, Hkv, N) grid -> ref
  [1, length], read one scalar at a time as ref[0, i] (SMEM on TPU; the unit dim makes
  the block's last two dims the array's, as Mosaic requires)."""
  space = {"memory_space": pltpu.SMEM} if plan.platform == "tpu" else {}
  return pl.BlockSpec((pl.squeezed, pl.squeezed, pl.squeezed, 1, table.shape[-1]),
                      lambda b, h, n: (b, h, n, 0, 0), **space)


def table_head(plan: Plan, table: jax.Array) -> pl.BlockSpec:
  """As table_row, for a table [B, Hkv, 1, 1, length] of one row a (batch, KV head)."""
  space = {"memory_space": pltpu.SMEM} if plan.platform == "tpu" else {}
  return pl.BlockSpec((pl.squeezed, pl.squeezed, pl.squeezed, 1, table.shape[-1]),
                      lambda b, h, n: (b, h, 0, 0, 0), **space)


@dataclasses.dataclass(frozen=True)
class Layout:
  """Where the kernels' token tensors live.

  Grouped queries (q, o, dO, dq and the per-row statistics): [B, Tp, Hkv, Gp, d] on both
  platforms; a token's rows are one [Gp, d] tile (Mosaic: the block's last two dims are
  the array's). K, V (and dk, dv): [B, Tp, Hkv, d] as the caller has them on GPU (native),
  [B, Hkv, Tp, d] on TPU, where a block's last two dims must be (rows, d).
  """
  native: bool

  def kv_to_kernel(self, x: jax.Array) -> jax.Array:
    return x if self.native else x.transpose(0, 2, 1, 3)

  def kv_from_kernel(self, x: jax.Array) -> jax.Array:
    return x if self.native else x.transpose(0, 2, 1, 3)

  def kv_sequence(self, time: int, d: int) -> pl.BlockSpec:
    """All rows of KV head h on a (B, Hkv, n) grid -> ref [Tp, d]."""
    if self.native:
      return pl.BlockSpec((pl.squeezed, time, pl.squeezed, d), lambda b, h, n: (b, 0, h, 0))
    return pl.BlockSpec((pl.squeezed, pl.squeezed, time, d), lambda b, h, n: (b, h, 0, 0))

  def kv_block(self, rows: int, d: int) -> pl.BlockSpec:
    """Rows [n * rows, (n + 1) * rows) of KV head h -> ref [rows, d]."""
    if self.native:
      return pl.BlockSpec((pl.squeezed, rows, pl.squeezed, d), lambda b, h, n: (b, n, h, 0))
    return pl.BlockSpec((pl.squeezed, pl.squeezed, rows, d), lambda b, h, n: (b, h, n, 0))

  def kv_shape(self, batch: int, time: int, heads: int, d: int) -> tuple[int, ...]:
    return (batch, time, heads, d) if self.native else (batch, heads, time, d)

  @staticmethod
  def group_block(tokens: int, rows: int, d: int) -> pl.BlockSpec:
    """Tokens [n * tokens, (n + 1) * tokens) of KV head h's query group -> ref [tokens, rows, d]."""
    return pl.BlockSpec((pl.squeezed, tokens, pl.squeezed, rows, d),
                        lambda b, h, n: (b, n, h, 0, 0))

  @staticmethod
  def group_sequence(time: int, rows: int, d: int) -> pl.BlockSpec:
    """Every token of KV head h's query group -> ref [Tp, rows, d]."""
    return pl.BlockSpec((pl.squeezed, time, pl.squeezed, rows, d),
                        lambda b, h, n: (b, 0, h, 0, 0))
