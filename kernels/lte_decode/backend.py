"""The LTE decode kernel's side of the lowerings (the shared side: kernels/lowering.py).

GPU: the Triton lowering. The cache stays [B, S, Hkv, D] as the layer
holds it: a program reads one (batch, KV head) strip with a stride of Hkv * D,
and masked loads skip empty slots and the ragged end. TPU: Mosaic wants a
block's last two dims to be (slots, D), so the cache is transposed (and padded
to whole blocks) to [B, Hkv, S, D] first, an extra pass over it; scalars live
in SMEM.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as pltriton

from lte_jax.kernels import lowering
from lte_jax.kernels.lowering import PLATFORMS, default_platform  # noqa: F401  (re-exported)


@dataclasses.dataclass(frozen=True)
class Plan:
  """Static choices for one call: target lowering and tuning knobs (hashable).

  platform: 'gpu' (Triton lowering) or 'tpu' (Mosaic).
  interpret: run the kernel with the Pallas interpreter (CPU tests); the
    platform still decides its form (masked strided loads or a padded layout).
  block_k: cache slots per tile of the inner loop (power of two >= 16).
  split: cache slots per program (a multiple of block_k), or None: as few slots
    per program as keep `min_programs` programs in flight (flash-decoding's
    split-K; each split's partial softmax is combined afterwards).
  min_programs: target number of programs for split=None (GPU: a few per SM).
  num_warps, num_stages: Triton launch parameters.
  """
  platform: str
  interpret: bool = False
  block_k: int = 128
  split: int | None = None
  min_programs: int = 1024
  num_warps: int = 4
  num_stages: int = 2

  def __post_init__(self):
    lowering.check_platform(self.platform)
    lowering.check_block_sizes(self, "block_k")
    if self.split is not None and (not isinstance(self.split, int) or self.split < 1
                                   or self.split % self.block_k):
      raise ValueError(f"split must be None or a positive multiple of block_k={self.block_k}, "
                       f"got {self.split!r}")
    lowering.check_counts(self, "min_programs", "num_warps", "num_stages")

  @property
  def native_layout(self) -> bool:
    """The cache is read in place ([B, S, Hkv, D]) with masked loads (GPU only)."""
    return self.platform == "gpu"

  @property
  def min_rows(self) -> int:
    """Query rows per program are padded to this: Triton dots need >= 16; Mosaic 8."""
    return 16 if self.platform == "gpu" else 8

  def slots_per_program(self, slots: int, strips: int) -> int:
    """Slots each program reads, given `slots` per strip and `strips` = B * Hkv."""
    if self.split is not None:
      return self.split
    tiles = -(-slots // self.block_k)
    splits = max(1, min(tiles, -(-self.min_programs // strips)))
    return -(-tiles // splits) * self.block_k


def scalar_spec(plan: Plan) -> pl.BlockSpec:
  """A small int32 array every program reads whole, indexed by scalars (SMEM on TPU)."""
  if plan.platform == "tpu":
    return pl.BlockSpec(memory_space=pltpu.SMEM)
  return pl.BlockSpec(memory_space=None)


def load_tile(plan: Plan, ref: Any, start: jax.Array, size: int, valid_col: jax.Array) -> jax.Array:
  """Rows [start, start + size) of a [slots, D] ref, zero where valid_col [size, 1] is False.

  GPU: a masked load (invalid rows are never read: empty slots and the ragged end
  of the cache cost no bandwidth). TPU: the block is padded and in VMEM; a select.
  """
  window = ref.at[pl.ds(pl.multiple_of(start, size), size), :]
  if plan.platform == "gpu":
    mask = jnp.broadcast_to(valid_col, (size, ref.shape[-1]))
    return pltriton.load(window, mask=mask, other=0)
  tile = window[...]
  return jnp.where(valid_col, tile, jnp.zeros((), tile.dtype))


def call(kernel: Callable[..., None], plan: Plan, *, grid: tuple[int, ...],
         in_specs: Sequence[pl.BlockSpec], out_specs: Sequence[pl.BlockSpec],
         out_shape: Sequence[jax.ShapeDtypeStruct], name: str) -> Any:
  """lowering.call with this plan; every grid axis is parallel."""
  return lowering.call(kernel, platform=plan.platform, interpret=plan.interpret, grid=grid,
                       in_specs=in_specs, out_specs=out_specs, out_shape=out_shape, name=name,
                       num_warps=plan.num_warps, num_stages=plan.num_stages)
