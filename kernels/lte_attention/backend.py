"""The LTE attention kernels' side of the lowerings (the shared side: kernels/lowering.py).

GPU kernels use the Triton lowering, TPU kernels Mosaic. Unlike the GDN kernels no kernel accumulates across grid steps: every
program loops over its own key (or query) blocks, so both lowerings run the same
kernel bodies; they differ in the token layout (`Tokens`), in where the loop
bounds live (SMEM on TPU) and in the compiler parameters (`call`).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import jax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from lte_jax.kernels import lowering
from lte_jax.kernels.lte_attention import sets
from lte_jax.kernels.lowering import PLATFORMS, default_platform  # noqa: F401  (re-exported)
# Block sizes when the plan leaves them out. GPU: 64 x 64 tiles keep the fp32
# [64, 64] logits and the [64, D] accumulators of D = 64 heads in registers at 4 warps.
# TPU: 128-row tiles fill the MXU.
_DEFAULT_BLOCKS = {"gpu": 64, "tpu": 128}
_DEFAULT_VMEM_MIB = 48
# Plan.far_gather: Mosaic has no row gather, so the TPU form always copies.
FAR_GATHERS = ("copy", "kernel")
# The folder's pallas_calls, by the names they carry (profiles, Plan.launch).
KERNELS = ("lte_attention_fwd", "lte_attention_dq", "lte_attention_dkv_band",
           "lte_attention_dkv_far")


# Per-kernel launch parameters measured on the H200 (bench_lte, BENCHMARKS.md): at
# (4, 4096, 16, 64), w 768, 512 retained, 3 pipeline stages took fwd / fwd+bwd from
# 0.746 / 1.702 to 0.684 / 1.609 ms; 128-row tiles at 8 warps sped the forward (0.704)
# but slowed the backward (2.389).
GPU_LAUNCH: dict[str, tuple[int, int]] = {name: (4, 3) for name in KERNELS}


@dataclasses.dataclass(frozen=True)
class Plan:
  """Static choices for one call: target lowering and tuning knobs (hashable).

  platform: 'gpu' (Triton lowering) or 'tpu' (Mosaic).
  interpret: run the kernels with the Pallas interpreter (CPU tests); the
    platform still decides the layout and the kernel parameters.
  block_q, block_k: query rows and key rows per tile of the forward and dq kernels
    (powers of two >= 16: Triton dots need every dim >= 16). None: 64 on GPU,
    128 on TPU.
  block_q_dkv, block_k_dkv: the same for the dk/dv kernels (None: block_q, block_k).
  num_warps, num_stages: Triton launch parameters of every kernel without a `launch` entry
    (None: 4 and 2). Giving either sets every kernel not named in `launch` (no GPU_LAUNCH).
  launch: per-kernel (num_warps, num_stages), e.g. 'lte_attention_fwd=8/3'
    (lowering.parse_launch; names in KERNELS), overriding the kernels it names only: on a
    real GPU with num_warps and num_stages None, the rest keep GPU_LAUNCH
    (lowering.resolve_launch).
  vmem_limit_mib: Mosaic's scoped VMEM limit; the TPU kernels keep one (batch,
    head)'s whole sequence of K/V (or Q/dO) in VMEM, more than the 16-32 MiB default
    at T = 4096 with grouped heads.
  far_gather: how the far-key kernels reach the far keys' rows: 'copy' (K and V gathered
    into compact [B, Hkv, Tp, D] arrays by XLA before the forward, dq and far dk/dv
    kernels, and the far dk/dv scatter-added back to the sequence afterwards) or 'kernel'
    (GPU only: each kernel loads a compact tile's rows straight from K and V by their
    indices, and the far dk/dv kernel adds into the band kernel's dk/dv in place, so
    neither the copies nor the scatter exist: ~1 GB less traffic per layer at 8 x 4096
    x 16 x 64). None: 'kernel' on GPU (H100, 8 x 4096 x 16 x 64, fwd+bwd device ms
    'copy' -> 'kernel': 2.449 -> 2.298 with 512 far keys a head, 4.509 -> 4.274 with
    3,800; BENCHMARKS.md), 'copy' on TPU.
  far_compaction: how the far keys are packed into their compact slots (sets.far_keys):
    'scatter' (each kept token to its slot, from a running count) or 'sort' (a stable
    argsort of every row). H200, (4, 4096, 16, 64): the glue stage before the kernels
    took 0.31 ms with 'sort' and 0.22 with 'scatter', each jitted alone.
  """
  platform: str
  interpret: bool = False
  block_q: int | None = None
  block_k: int | None = None
  block_q_dkv: int | None = None
  block_k_dkv: int | None = None
  num_warps: int | None = None
  num_stages: int | None = None
  launch: Any = None
  vmem_limit_mib: int = _DEFAULT_VMEM_MIB
  far_compaction: str = "scatter"
  far_gather: str | None = None

  def __post_init__(self):
    lowering.check_platform(self.platform)
    if self.far_gather is None:
      object.__setattr__(self, "far_gather", "kernel" if self.platform == "gpu" else "copy")
    gathers = FAR_GATHERS if self.platform == "gpu" else ("copy",)
    if self.far_gather not in gathers:
      raise ValueError(f"far_gather must be one of {gathers} on {self.platform}, "
                       f"got {self.far_gather!r}")
    if self.far_compaction not in sets.FAR_COMPACTIONS:
      raise ValueError(f"far_compaction must be one of {sets.FAR_COMPACTIONS}, "
                       f"got {self.far_compaction!r}")
    default = _DEFAULT_BLOCKS[self.platform]
    for name, fallback in (("block_q", default), ("block_k", default),
                           ("block_q_dkv", self.block_q or default),
                           ("block_k_dkv", self.block_k or default)):
      if getattr(self, name) is None:
        object.__setattr__(self, name, fallback)
    lowering.check_block_sizes(self, "block_q", "block_k", "block_q_dkv", "block_k_dkv")
    lowering.check_counts(self, "vmem_limit_mib")
    lowering.resolve_launch(self, KERNELS, GPU_LAUNCH)

  @property
  def native_layout(self) -> bool:
    """Token tensors stay [B, T, H, D] (GPU: strided Triton blocks, no transposes)."""
    return self.platform == "gpu"

  @property
  def pad_head_dim(self) -> bool:
    """Triton blocks need power-of-two dims >= 16; Mosaic takes a block's full dims."""
    return self.platform == "gpu"

  @property
  def gathers_far_rows(self) -> bool:
    """The kernels load far keys' rows by index (far_gather='kernel')."""
    return self.far_gather == "kernel"

  @property
  def time_multiple(self) -> int:
    """T is padded to a multiple of every block (all powers of two: the largest)."""
    return max(self.block_q, self.block_k, self.block_q_dkv, self.block_k_dkv)


def make_plan(platform: str | None = None, interpret: bool | None = None,
              options: dict | None = None) -> Plan:
  """Plan for `platform` (None: the default backend's); `interpret` None: on CPU only;
  `options`: Plan fields, e.g. from `parse_options`."""
  return lowering.make_plan(Plan, platform, interpret, options)


def parse_options(text: str) -> dict:
  """'block_q=64;block_k=32;num_warps=4' -> {'block_q': 64, ...} (for benchmark flags)."""
  return lowering.parse_options(text, Plan)


def call(kernel: Callable[..., None], plan: Plan, *, grid: tuple[int, ...],
         in_specs: Sequence[Any], out_specs: Sequence[pl.BlockSpec],
         out_shape: Sequence[jax.ShapeDtypeStruct], name: str,
         input_output_aliases: dict[int, int] | None = None) -> Any:
  """lowering.call with this plan; every grid axis is parallel."""
  num_warps, num_stages = lowering.launch_params(plan, name)
  return lowering.call(kernel, platform=plan.platform, interpret=plan.interpret, grid=grid,
                       in_specs=in_specs, out_specs=out_specs, out_shape=out_shape, name=name,
                       num_warps=num_warps, num_stages=num_stages,
                       vmem_limit_bytes=plan.vmem_limit_mib * 2 ** 20,
                       input_output_aliases=input_output_aliases)


def scalars(plan: Plan, table: jax.Array, head: Callable[[Any], Any]) -> pl.BlockSpec:
  """Row (b, head(h)) of an int32 table of loop bounds [B, H, 1, length] on a (B, H, n)
  grid -> ref [1, length], read one scalar at a time as ref[0, i]. SMEM on TPU, one row
  rather than the whole table, so its size does not grow with the batch; the unit dim
  makes the block's last two dims the array's, as Mosaic requires."""
  space = {"memory_space": pltpu.SMEM} if plan.platform == "tpu" else {}
  return pl.BlockSpec((pl.squeezed, pl.squeezed, 1, table.shape[-1]),
                      lambda b, h, n: (b, head(h), 0, 0), **space)


@dataclasses.dataclass(frozen=True)
class Tokens:
  """Where the rows of a token tensor (q, k, v, o, dO and their gradients) live.

  native (GPU): [B, T, H, D] as the caller has them; a Triton block reads rows
  with a stride of H * D. Otherwise (TPU): [B, H, T, D], because Mosaic wants a
  block's last two dims to be (rows, D).
  """
  native: bool

  def to_kernel(self, x: jax.Array) -> jax.Array:     # [B, T, H, D] -> layout
    return x if self.native else x.transpose(0, 2, 1, 3)

  def from_kernel(self, x: jax.Array) -> jax.Array:   # layout -> [B, T, H, D]
    return x if self.native else x.transpose(0, 2, 1, 3)

  def shape(self, batch: int, time: int, heads: int, d: int) -> tuple[int, ...]:
    return (batch, time, heads, d) if self.native else (batch, heads, time, d)

  def time_axis(self) -> int:
    return 1 if self.native else 2

  def block(self, rows: int, d: int, head: Callable[[Any], Any] = lambda h: h) -> pl.BlockSpec:
    """Rows [n*rows, (n+1)*rows) of head head(h) on a (B, H, n) grid -> ref [rows, d]."""
    if self.native:
      return pl.BlockSpec((pl.squeezed, rows, pl.squeezed, d),
                          lambda b, h, n: (b, n, head(h), 0))
    return pl.BlockSpec((pl.squeezed, pl.squeezed, rows, d), lambda b, h, n: (b, head(h), n, 0))

  def sequence(self, time: int, d: int, *, group: int | None = None,
               head: Callable[[Any], Any] = lambda h: h) -> pl.BlockSpec:
    """All rows of head head(h) (ref [T, d]) or of the `group` heads
    [h * group, (h + 1) * group) (ref [T, group, d] native, [group, T, d] otherwise)."""
    if group is None:
      if self.native:
        return pl.BlockSpec((pl.squeezed, time, pl.squeezed, d),
                            lambda b, h, n: (b, 0, head(h), 0))
      return pl.BlockSpec((pl.squeezed, pl.squeezed, time, d),
                          lambda b, h, n: (b, head(h), 0, 0))
    if self.native:
      return pl.BlockSpec((pl.squeezed, time, group, d), lambda b, h, n: (b, 0, h, 0))
    return pl.BlockSpec((pl.squeezed, group, time, d), lambda b, h, n: (b, h, 0, 0))

  def rows(self, ref, start, size: int, g=None) -> jax.Array:
    """Rows [start, start + size) of a `sequence` ref (of group member g) -> [size, d]."""
    rows = pl.ds(start, size)
    if g is None:
      return ref[rows, :]
    return ref[rows, g, :] if self.native else ref[g, rows, :]
