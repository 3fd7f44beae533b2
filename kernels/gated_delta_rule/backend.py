"""The GDN kernels' side of the lowerings (the shared side: kernels/lowering.py).

GPU kernels use the Triton lowering, TPU kernels Mosaic. The two differ in how a sequential recurrence is written:
Triton programs run in no particular order, so the recurrence is a loop inside
one program per (batch*head, value block); Mosaic runs the grid in order, so the
chunk axis is the last ("arbitrary") grid axis and the state lives in fp32 VMEM
scratch. `Plan.sequential_in_grid` says which form a kernel must take.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Sequence

import jax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from lte_jax.kernels import lowering
from lte_jax.kernels.gated_delta_rule import chunk_math as cm
from lte_jax.kernels.lowering import PLATFORMS, default_platform  # noqa: F401  (re-exported)


# The folder's pallas_calls, by the names they carry (profiles, Plan.launch).
KERNELS = ("gdn_wy_inverse", "gdn_wy_transform", "gdn_chunk_states", "gdn_chunk_outputs",
           "gdn_local_value_grads", "gdn_chunk_state_grads", "gdn_chunk_qk_grads",
           "gdn_wy_grads")


# Per-kernel launch parameters measured on the H200 at (4, 4096, 16, 128), bf16
# (`bench_kernels --tune`; BENCHMARKS.md "What moved the numbers"), ms of the stage that
# runs the kernel at a uniform 4 warps / 2 stages -> here. The inverse's 16 x 16 products
# are latency bound: one warp per program lets more chunks run at once. Kernels not listed
# keep 4 / 2: no other launch beat it by more than the ~0.03 ms run-to-run spread.
GPU_LAUNCH: dict[str, tuple[int, int]] = {
    "gdn_wy_inverse": (1, 1),       # 1.16 -> 0.52
    "gdn_wy_transform": (4, 1),     # states stage 1.00 -> 0.80
    "gdn_chunk_states": (4, 3),     # states stage 1.00 -> 0.83
    "gdn_chunk_outputs": (4, 3),    # 0.59 -> 0.32, timed on a grid over value blocks
                                    # (it now loops over them: worth re-tuning)
    "gdn_chunk_state_grads": (8, 2),   # 0.56 -> 0.54
    "gdn_wy_grads": (4, 1),         # 0.58 -> 0.53 (4/3 0.61, 8/2 0.72)
}


# Launches that replace GPU_LAUNCH's where the key width is above 128 (Plan.launch_for):
# the forward recurrence at 8 warps / 2 stages on [256, 64] state blocks beat 4 / 3 on
# [256, 32] (H100, (4, 4096, 8, 256), fwd 0.662 against 0.693 ms; BENCHMARKS.md).
WIDE_KEY_LAUNCH: dict[str, tuple[int, int]] = {
    "gdn_chunk_states": (8, 2),
}
WIDE_KEYS = 128

# The recurrences' value blocks shrink until they run this many programs (the H200 has 132
# SMs): Plan.recurrence_block_v.
RECURRENCE_PROGRAMS = 128
_MIN_RECURRENCE_BLOCK = 16
# ... and no wider than keeps the carried fp32 state within this many registers a thread
# (of 255): on the H100 the [256, 64] forward state at 4 warps spilled 880 bytes a thread,
# [256, 32] ran spill-free and its stage 0.750 -> 0.611 ms (BENCHMARKS.md).
STATE_REGISTERS = 64


@dataclasses.dataclass(frozen=True)
class Plan:
  """Static choices for one call: target lowering and tuning knobs (hashable).

  platform: 'gpu' (Triton lowering) or 'tpu' (Mosaic).
  interpret: run the kernels with the Pallas interpreter (CPU tests); the
    platform still decides the kernels' form (loop or sequential grid).
  chunk: tokens per chunk (power of two, >= 16: Triton dots need dims >= 16).
  block_v: value columns per program of the GPU recurrences, and per step of the GPU
    kernels' loops over value columns (power of two).
  block_k: key columns per step of the backward's loops over key columns (qk_grads,
    wy_grads; power of two, GPU): bounds their [C, block_k] fp32 accumulators.
  recurrence_block_v: GPU: value columns per program of the two sequential recurrences
    only (`gdn_chunk_states`, `gdn_chunk_state_grads`). The recurrences run B * H * Dv /
    block programs, each over every chunk in a row, so with few (batch x head) sequences
    most of the GPU idles. None: block_v, halved (down to 16) while that leaves fewer than
    RECURRENCE_PROGRAMS programs (`recurrence_value_block`; H200, (1, 16384, 16, 128),
    fwd+bwd 3.09 ms at 64 columns, 2.51 at 16; BENCHMARKS.md).
  fuse_wy: GPU: both recurrences take T instead of W and U (the WY identity multiplied
    out): the forward's V_new = T (beta V - beta qd (K h)), the reverse one's
    W^T dV = K^T (beta qd T^T dV). So no WY transform kernel runs, forward or backward,
    W and U never reach HBM, and each chunk step loads T [C, C] (and the K tile it loads
    anyway) instead of W [C, Dk] (and U). With keep_states the forward takes the unfused
    path (it keeps W). Decays on the value side in the forward (decay_on 'keys' turns it
    off); the TPU form ignores it. On by default: less kernel time at every benchmark
    shape (H100, fwd+bwd 2.004 -> 1.761 ms at (4, 4096, 16, 128), 2.767 -> 2.494 at
    (4, 4096, 8, 256); BENCHMARKS.md).
  wide_key_launch: per-kernel (num_warps, num_stages) above Dk = WIDE_KEYS (`launch_for`),
    in `launch`'s forms. None: WIDE_KEY_LAUNCH's entries on a real GPU, less the kernels
    named in `launch` (a caller's launch for a kernel holds at every Dk) and none when a
    uniform num_warps / num_stages is given; () elsewhere.
  num_warps, num_stages: Triton launch parameters of every kernel without a `launch` entry
    (None: 4 and 2). Giving either sets every kernel not named in `launch` (no GPU_LAUNCH).
  launch: per-kernel (num_warps, num_stages), e.g. 'gdn_wy_inverse=2/1,gdn_chunk_outputs=8/2'
    (lowering.parse_launch; names in KERNELS), overriding the kernels it names only: on a
    real GPU with num_warps and num_stages None, the rest keep GPU_LAUNCH
    (lowering.resolve_launch).
  inverse_precision: products of the (I + A)^-1 inverse: 'highest' (fp32) or,
    GPU only, 'tf32x3' (three TF32 tensor-core passes, close to fp32) or 'tf32' (one
    pass, about 1e-3 relative: FLA's solve_tril precision). None: on a GPU 'tf32' when T
    is stored in bf16/fp16 anyway (wy_operands='input' with such inputs: its rounding
    is coarser than TF32's), else 'tf32x3'; 'highest' elsewhere (`inverse_precision_for`).
    'highest' made the forward 6.6x slower than 'tf32x3' at the same errors against the
    fp32 reference, and 'tf32' halves the inverse stage again where T is bf16 anyway, with
    unchanged errors (H200; BENCHMARKS.md).
  inverse_form: 'blocked' (16 x 16 blocks by forward substitution; None on GPU) or
    'doubling' (full C x C masked doubling, log2(C) levels of two C x C products; None on
    TPU, where 16-lane blocks fit the (8, 128) tiles badly). inverse.py says more. On the
    H200 (triton 3.6) 'doubling' takes over 4 minutes of Triton compilation per jit.
  wy_operands: the products with T (the forward's WY transform, the backward's dT, dA and
    T^T dV, T^T dW): 'fp32' (T and the operands in fp32 at inverse_precision) or 'input'
    (both rounded to the inputs' dtype, bf16 operands on the tensor cores, as FLA's
    recompute_w_u and WY backward; the default). fp32 inputs always take 'fp32'. Errors
    against the fp32 reference (1x512x2x64 bf16, interpreted): o 3.8e-3 and grads <= 3.8e-3
    with 'input', against 3.3e-3 and <= 3.4e-3 with 'fp32'. 'input' is the default: H200,
    (4, 4096, 16, 128), fwd / fwd+bwd 1.40 / 6.05 -> 0.92 / 4.33 ms (BENCHMARKS.md).
  decay_on: where the recurrences (kernels `gdn_chunk_states`, `gdn_chunk_state_grads`)
    apply the per-token decay factors: 'keys' (scale the [C, Dk] key and query tiles in
    fp32, then cast them for the dot) or 'values' (scale the [C, block_v] value-side tiles
    instead, as FLA's recurrence does, so K and Q go into the dots as loaded). Same math,
    rounding moved to the other operand. 'auto' (default): on GPU 'values' for the forward
    recurrence, and for the reverse one up to Dk = 128; else 'keys' (`decays_on_values`).
    Why 'auto': at Dk = 256 'values' takes the forward stage 0.750 -> 0.611 ms (the 'keys'
    form spills) but the reverse 0.653 -> 0.888 (H100); at Dk = 128 it takes (1, 16384, 16,
    128) fwd+bwd 4.075 -> 3.512 ms (H200; BENCHMARKS.md). In the 'values' form K and Q feed
    the dots straight from the loads, which Triton pipelines through shared memory, so its
    stages are capped to what fits (`stages_that_fit`: three stages of 64-column blocks at
    Dk = 256 would ask 254 KB of the 227 KB). The TPU form is untimed and keeps 'keys'.
  keep_states: the forward keeps W [T, Dk], the per-chunk states h [N, Dk, Dv] and V_new
    [T, Dv] (state dtype, per batch*head) for the backward, which then skips the WY
    transform and the state recurrence (0.8 ms of the 6.0 ms fwd+bwd at (4, 4096, 16, 128)
    on the H200). The forward writes them to HBM anyway, so keeping them costs memory only:
    134 + 2 x 67 MB there in bf16, held from the forward to the backward (one layer at a
    time under remat); fwd+bwd 4.33 -> 4.06 ms there. Off by default so that no per-token
    intermediates live between forward and backward (FLA's backward recomputes them too);
    on through plan_options.
  qk_key_grid: GPU: the backward's dq / dk / dW kernel (`gdn_chunk_qk_grads`) takes its
    key blocks (block_k columns) as a third grid axis, one program per (batch*head, chunk,
    key block), as FLA's chunk_bwd_dqkwg does, instead of walking them in a loop inside
    one program. Each program recomputes dS = dO V_new^T (C x C x Dv) and reloads the
    value-side tiles; its per-token scalar gradients are partial sums that XLA adds up.
    On by default: the kernel's stage 1.88 -> 1.22 ms at (4, 4096, 8, 256), 0.91 -> 0.75
    at Dk = 128 (H200; BENCHMARKS.md).
  output_value_grid: GPU: the outputs kernel (`gdn_chunk_outputs`) and the backward's
    dV_local kernel (`gdn_local_value_grads`) take value blocks (block_v columns) as a third
    grid axis, as FLA's chunk_fwd_o and chunk_bwd_dv_local do, each program summing Q K^T
    (and Q h) over key blocks (block_k) in a pipelined loop and recomputing the scores,
    instead of one program per chunk walking the value blocks with the scores computed
    once. Built for (4, 4096, 8, 256), where FLA's chunk_fwd_o took 0.16 ms against the
    outputs stage's 0.35 (H200); off by default: slower on the H100, fwd 0.720 -> 0.844 ms
    at that shape (BENCHMARKS.md "Tried and not kept").
  """
  platform: str
  interpret: bool = False
  chunk: int = 64
  block_v: int = 64
  block_k: int = 64
  recurrence_block_v: int | None = None
  num_warps: int | None = None
  num_stages: int | None = None
  launch: Any = None
  inverse_precision: str | None = None
  inverse_form: str | None = None
  wy_operands: str = "input"
  decay_on: str = "auto"
  keep_states: bool = False
  qk_key_grid: bool = True
  output_value_grid: bool = False
  fuse_wy: bool = True
  wide_key_launch: Any = None

  def __post_init__(self):
    lowering.check_platform(self.platform)
    if self.inverse_form is None:
      object.__setattr__(self, "inverse_form", "blocked" if self.platform == "gpu" else "doubling")
    forms = ("blocked", "doubling") if self.platform == "gpu" else ("doubling",)
    if self.inverse_form not in forms:
      raise ValueError(f"inverse_form must be one of {forms} on {self.platform}, "
                       f"got {self.inverse_form!r}")
    for name in ("keep_states", "qk_key_grid", "output_value_grid", "fuse_wy"):
      if not isinstance(getattr(self, name), bool):
        raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")
    if self.wy_operands not in ("fp32", "input"):
      raise ValueError(f"wy_operands must be 'fp32' or 'input', got {self.wy_operands!r}")
    if self.decay_on not in ("auto", "keys", "values"):
      raise ValueError(f"decay_on must be 'auto', 'keys' or 'values', got {self.decay_on!r}")
    allowed = ("highest", "tf32x3", "tf32") if self.has_tf32 else ("highest",)
    if self.inverse_precision is not None and self.inverse_precision not in allowed:
      where = "a GPU" if self.has_tf32 else f"{self.platform}{' interpreted' * self.interpret}"
      raise ValueError(f"inverse_precision must be one of {allowed} on {where}, "
                       f"got {self.inverse_precision!r}")
    lowering.check_block_sizes(self, "chunk", "block_v", "block_k")
    if self.recurrence_block_v is not None:
      lowering.check_block_sizes(self, "recurrence_block_v")
    # The kernels a caller re-launched by name keep that launch at every key width.
    named = (() if self.launch is None
             else tuple(name for name, *_ in lowering.parse_launch(self.launch, KERNELS)))
    measured = (self.num_warps is None and self.num_stages is None and self.platform == "gpu"
                and not self.interpret)
    lowering.resolve_launch(self, KERNELS, GPU_LAUNCH)
    wide = self.wide_key_launch
    if wide is None:
      wide = {name: launch for name, launch in WIDE_KEY_LAUNCH.items()
              if measured and name not in named}
    object.__setattr__(self, "wide_key_launch", lowering.parse_launch(wide, KERNELS))

  def launch_for(self, kernel: str, dk: int | None = None) -> tuple[int, int]:
    """(num_warps, num_stages) of `kernel` at key width dk: its `wide_key_launch` entry
    above WIDE_KEYS, else its resolved launch."""
    if dk is not None and dk > WIDE_KEYS:
      for name, warps, stages in self.wide_key_launch:
        if name == kernel:
          return warps, stages
    return lowering.launch_params(self, kernel)

  @property
  def fuses_wy(self) -> bool:
    """The recurrences take T, not W and U (`fuse_wy`): GPU form, the forward's decays on
    the value side (its only form; 'auto' puts them there on GPU), and no keep_states
    (which keeps W for the backward)."""
    return (self.fuse_wy and not self.keep_states and not self.sequential_in_grid
            and self.decay_on != "keys")

  @property
  def sequential_in_grid(self) -> bool:
    return self.platform == "tpu"

  @property
  def has_tf32(self) -> bool:
    """TF32 passes exist on NVIDIA tensor cores only (the interpreter's CPU dots lack them)."""
    return self.platform == "gpu" and not self.interpret

  def inverse_precision_for(self, input_dtype) -> str:
    """The inverse's product precision for inputs of `input_dtype` (see the field)."""
    if self.inverse_precision is not None:
      return self.inverse_precision
    if not self.has_tf32:
      return "highest"
    return "tf32" if self.wy_dtype(input_dtype) != jax.numpy.float32 else "tf32x3"

  def inverse_dot_precision(self, input_dtype) -> Any:
    """`inverse_precision_for` as a dot precision argument."""
    return {"tf32x3": jax.lax.DotAlgorithmPreset.TF32_TF32_F32_X3,
            "tf32": jax.lax.DotAlgorithmPreset.TF32_TF32_F32}.get(
                self.inverse_precision_for(input_dtype), jax.lax.Precision.HIGHEST)

  def t_product(self, input_dtype) -> Callable[..., jax.Array]:
    """chunk_math.mm for the products with T (WY transform, WY backward, the fuse_wy
    recurrences): operands in `wy_dtype` when that is low precision (bf16 tensor-core
    products, as FLA), else fp32 at the inverse's precision."""
    dtype = self.wy_dtype(input_dtype)
    if dtype != jax.numpy.float32:
      return functools.partial(cm.mm, dtype=dtype)
    return functools.partial(cm.mm, precision=self.inverse_dot_precision(input_dtype))

  def wy_dtype(self, input_dtype) -> Any:
    """Storage and product dtype of T and the WY operands: the inputs' with
    wy_operands='input' (unless fp32), else fp32."""
    low = self.wy_operands == "input" and jax.numpy.dtype(input_dtype) != jax.numpy.float32
    return jax.numpy.dtype(input_dtype) if low else jax.numpy.dtype("float32")

  def decays_on_values(self, dk: int, *, backward: bool = False) -> bool:
    """Whether the forward (or, `backward`, the reverse) recurrence puts the decay factors
    on the value side (`decay_on`)."""
    if self.decay_on == "auto":
      return self.platform == "gpu" and (not backward or dk <= 128)
    return self.decay_on == "values"

  def value_block(self, dv: int) -> int:
    """Value columns per program of the recurrences and per step of the other kernels'
    value loops (GPU: bounds the [Dk, block] fp32 state tiles that Triton stages in shared
    memory; TPU: all of Dv, VMEM holds it)."""
    return dv if self.platform == "tpu" else min(self.block_v, dv)

  def recurrence_value_block(self, dv: int, sequences: int, dk: int | None = None,
                             kernel: str | None = None) -> int:
    """Value columns per program of the GPU recurrence `kernel` over `sequences` (batch x
    head) rows (`recurrence_block_v`); given dk and kernel, also no more than keep the
    fp32 [dk, block] state within STATE_REGISTERS a thread at that kernel's warps."""
    if self.platform == "tpu":
      return self.value_block(dv)
    if self.recurrence_block_v is not None:
      return min(self.recurrence_block_v, dv)
    block = self.value_block(dv)
    while block > _MIN_RECURRENCE_BLOCK and sequences * (dv // block) < RECURRENCE_PROGRAMS:
      block //= 2
    if dk is not None and kernel is not None:
      threads = 32 * (self.launch_for(kernel, dk)[0] or 4)
      while block > _MIN_RECURRENCE_BLOCK and dk * block > STATE_REGISTERS * threads:
        block //= 2
    return block

  def key_block(self, dk: int) -> int:
    """Key columns per step of the backward's key loops (GPU; TPU: all of Dk, since lane
    slices narrower than 128 fit Mosaic's tiles badly and VMEM holds the whole chunk)."""
    return dk if self.platform == "tpu" else min(self.block_k, dk)


def check_plan_options(options: dict) -> None:
  """Caller-given Plan fields: not platform / interpret (arguments of their own) nor chunk
  (the op's chunk_size)."""
  lowering.check_option_keys(options, Plan, exclude=("chunk",))


def parse_options(text: str) -> dict:
  """'keep_states=True;block_v=32' -> Plan keyword arguments (configs and flags); the chunk
  comes from the op's chunk_size."""
  return lowering.parse_options(text, Plan, exclude=("chunk",))


# Shared memory one Hopper block may claim (H100 / H200: 227 KB).
GPU_SHARED_MEMORY = 227 * 1024


def stages_that_fit(num_stages: int, step_bytes: int, fixed_bytes: int) -> int:
  """The most pipeline stages, at most num_stages and at least 1, for which that many
  copies of one loop step's loaded tiles (`step_bytes`) beside `fixed_bytes` of other
  shared tiles fit in GPU_SHARED_MEMORY. (Triton's one recorded refusal, the value-side
  states kernel at Dk = 256: 3 x 72 KB of W, K, U tiles + 32 KB of bf16 state = 254 KB,
  the figure it reported.)"""
  room = (GPU_SHARED_MEMORY - fixed_bytes) // max(step_bytes, 1)
  return max(1, min(num_stages, room))


def call(kernel: Callable[..., None], plan: Plan, *, grid: tuple[int, ...],
         in_specs: Sequence[pl.BlockSpec], out_specs: Sequence[pl.BlockSpec],
         out_shape: Sequence[jax.ShapeDtypeStruct], sequential_last: bool = False,
         scratch_shapes: Sequence[Any] = (), name: str,
         shared_bytes: tuple[int, int] | None = None, dk: int | None = None) -> Any:
  """lowering.call with this plan; `sequential_last` marks the last grid axis as
  ordered (TPU "arbitrary"); scratch is a TPU-only notion. shared_bytes (GPU): (bytes one
  loop step loads, other shared bytes) of a kernel whose loads Triton stages in shared
  memory: its stages are capped to fit (`stages_that_fit`) rather than fail to compile.
  dk: the key width, for launches keyed on it (Plan.launch_for)."""
  num_warps, num_stages = plan.launch_for(name, dk)
  if shared_bytes is not None and plan.platform == "gpu":
    num_stages = stages_that_fit(num_stages, *shared_bytes)
  return lowering.call(kernel, platform=plan.platform, interpret=plan.interpret, grid=grid,
                       in_specs=in_specs, out_specs=out_specs, out_shape=out_shape, name=name,
                       num_warps=num_warps, num_stages=num_stages,
                       sequential_last=sequential_last, scratch_shapes=scratch_shapes)


def vmem(shape: tuple[int, ...]) -> Any:
  """fp32 VMEM scratch for a carried state (TPU)."""
  return pltpu.VMEM(shape, jax.numpy.float32)


def per_chunk(*tail: int) -> pl.BlockSpec:
  """Block of one chunk of a [BH, N, *tail] array on a (BH, N, ...) grid."""
  return pl.BlockSpec((pl.squeezed, pl.squeezed, *tail),
                      lambda b, n, *_: (b, n) + (0,) * len(tail))


@dataclasses.dataclass(frozen=True)
class Layout:
  """Where one chunk's rows of a token tensor (q, k, v, o and their gradients) live.

  GPU: [B, T, H, D] as the caller has them, so no transposes: a Triton block
  reads C rows with a stride of H * D. TPU: [B*H, N, C, D], because Mosaic wants
  a block's last two dims to be (C, D) and would otherwise get (1, D).
  Per-token scalars and per-chunk intermediates are [B*H, N, ...] on both.
  """
  batch: int
  heads: int
  chunks: int
  chunk: int
  native: bool

  @property
  def bh(self) -> int:
    return self.batch * self.heads

  def shape(self, d: int) -> tuple[int, ...]:
    if self.native:
      return (self.batch, self.chunks * self.chunk, self.heads, d)
    return (self.bh, self.chunks, self.chunk, d)

  def column_block(self, width: int) -> pl.BlockSpec:
    """GPU layout: a chunk's rows, columns [j * width, (j + 1) * width) on a
    (B*H, N, j) grid."""
    assert self.native
    h = self.heads
    return pl.BlockSpec((pl.squeezed, self.chunk, pl.squeezed, width),
                        lambda b, n, j: (b // h, n, b % h, j))

  def block(self, d: int) -> pl.BlockSpec:
    """A chunk's [C, d] rows on a (B*H, N, ...) grid."""
    if not self.native:
      return per_chunk(self.chunk, d)
    h = self.heads
    return pl.BlockSpec((pl.squeezed, self.chunk, pl.squeezed, d),
                        lambda b, n, *_: (b // h, n, b % h, 0))

  def sequence(self, d: int, block: int | None = None) -> pl.BlockSpec:
    """All rows [T, d] (or [T, block] of value block j) on a (B*H, Dv blocks) grid,
    for the GPU recurrences (native layout only)."""
    assert self.native
    h = self.heads
    if block is None:
      return pl.BlockSpec((pl.squeezed, self.chunks * self.chunk, pl.squeezed, d),
                          lambda b, j: (b // h, 0, b % h, 0))
    return pl.BlockSpec((pl.squeezed, self.chunks * self.chunk, pl.squeezed, block),
                        lambda b, j: (b // h, 0, b % h, j))
