"""The NSA decode kernel's side of the lowerings (the shared side: kernels/lowering.py).

GPU: the Triton lowering. The cache stays [B, L, Hkv, D] as the layer holds it; one
program per (batch, KV head) gets that head's strip (a stride of Hkv * D between rows)
and loads the rows of each block it reads with a masked load at the block's index, so
only the selected blocks and the window cost bandwidth. TPU: Mosaic. A block's last two
dims must be whole or (8, 128)-aligned, so a step's block is (block_size, Hkv, D) of the
untransposed cache (transposing it would copy the whole cache every step), chosen by
its index from scalar-prefetched tables; the kernel keeps its head's rows. That reads
the Hkv heads of every block: a cache kept [B, Hkv, L, D] would avoid it.
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

# The folder's pallas_call, by the name it carries (profiles).
KERNELS = ("nsa_decode",)


@dataclasses.dataclass(frozen=True)
class Plan:
  """Static choices for one call: target lowering and launch (hashable).

  platform: 'gpu' (Triton lowering) or 'tpu' (Mosaic).
  interpret: run the kernel with the Pallas interpreter (CPU tests); the platform still
    decides its form (a loop in one program, or an ordered grid axis of blocks).
  num_warps, num_stages: Triton launch parameters (not measured yet: the defaults).
  """
  platform: str
  interpret: bool = False
  num_warps: int = 4
  num_stages: int = 2

  def __post_init__(self):
    lowering.check_platform(self.platform)
    lowering.check_counts(self, "num_warps", "num_stages")

  @property
  def min_rows(self) -> int:
    """Query rows per program are padded to this: Triton dots need >= 16; Mosaic 8."""
    return 16 if self.platform == "gpu" else 8

  def check_block_size(self, block_size: int, cache_len: int) -> None:
    """A kernel tile is one block of the cache: Triton tiles are powers of two >= 16;
    Mosaic blocks take whole 8-row sublane groups (or the whole cache)."""
    if self.platform == "gpu":
      ok = block_size >= 16 and not block_size & (block_size - 1)
      allowed = "a power of two >= 16"
    else:
      ok = block_size % 8 == 0 or block_size == cache_len
      allowed = "a multiple of 8"
    if not ok:
      raise ValueError(f"block_size must be {allowed} for the {self.platform!r} NSA decode "
                       f"kernel, got {block_size!r}")


def load_block(plan: Plan, ref: Any, head: jax.Array, start: jax.Array, size: int,
               readable: jax.Array) -> jax.Array:
  """One block of the cache for KV head `head`: [size, D], zero where readable [size, 1]
  is False.

  GPU: `ref` is the head's strip [L, D]; rows [start, start + size) are read with a
  masked load (unreadable rows cost no bandwidth). TPU: `ref` is the step's block
  [size, Hkv, D] in VMEM; the head is picked with static slices (no dynamic sublane
  index), then a select.
  """
  if plan.platform == "gpu":
    window = ref.at[pl.ds(pl.multiple_of(start, size), size), :]
    mask = jnp.broadcast_to(readable, (size, ref.shape[-1]))
    return pltriton.load(window, mask=mask, other=0)
  tile = ref[:, 0, :]
  for h in range(1, ref.shape[1]):
    tile = jnp.where(head == h, ref[:, h, :], tile)
  return jnp.where(readable, tile, jnp.zeros((), tile.dtype))


def call(kernel: Callable[..., None], plan: Plan, *, grid: tuple[int, ...],
         in_specs: Sequence[pl.BlockSpec], out_specs: Sequence[pl.BlockSpec],
         out_shape: Sequence[jax.ShapeDtypeStruct], scratch_shapes: Sequence[Any] = (),
         num_scalar_prefetch: int = 0) -> Any:
  """lowering.call with this plan; on TPU the last grid axis (the blocks) runs in order."""
  tpu = plan.platform == "tpu"
  return lowering.call(kernel, platform=plan.platform, interpret=plan.interpret, grid=grid,
                       in_specs=in_specs, out_specs=out_specs, out_shape=out_shape,
                       name=KERNELS[0], num_warps=plan.num_warps, num_stages=plan.num_stages,
                       sequential_last=tpu, scratch_shapes=scratch_shapes,
                       num_scalar_prefetch=num_scalar_prefetch)


def scalar_spec() -> pl.BlockSpec:
  """A small int32 array a GPU program reads whole, indexed by scalars."""
  return pl.BlockSpec(memory_space=None)


def vmem(shape: tuple[int, ...]) -> Any:
  """An fp32 VMEM scratch buffer (TPU)."""
  return pltpu.VMEM(shape, jnp.float32)
