"""Benchmark Native Sparse Attention: lte_jax's nsa_attention against FLA's parallel_nsa.

  python -m experiments.bench_nsa --out=/tmp/bench_nsa.json            # on a GPU
  python -m experiments.bench_nsa --shapes=1x128x4x2x16 --check_shape=1x128x4x2x16 \\
      --block_size=16 --block_count=3 --window=31 --reps=2 --notorch    # a smoke run on CPU

Shapes are B x T x Hq x Hkv x D; the defaults are laNSA's: block_size 64, block_count 16 and
a 512-token window (--window is lte_jax's largest distance, 511; FLA's window_size is the
token count, 512). All inputs bf16: q, k, v random normal, gates sigmoid of a normal.

1. Check, at --check_shape: every lte_jax implementation's output and gradients (q, k, v,
   gates) against 'reference', and 'pallas' against 'xla' where both are given. With torch
   and a GPU, flash-linear-attention 0.6.0's parallel_nsa too:
   - given the blocks lte_jax selects (xla.select_blocks, as FLA's block_indices), FLA's
     output and gradients against lte_jax 'xla': the same function, so they must agree to
     bf16 rounding;
   - with FLA's own selection (its top-k kernel over its bf16 compression scores), the
     share of (batch, query, KV head) rows whose selected set equals lte_jax's, and the
     output error it leads to: information only, a block chosen on a near tie differs.
2. Time, per --shapes: lte_jax forward and forward+backward (grads of q, k, v, gates) per
   --implementations, and FLA's parallel_nsa (computing its own selection) as the anchor.
   JAX rows: one synchronised call at a time (ms) and --queued_calls calls back to back with
   one sync, inputs rotated over 4 copies past the L2 cache (queued_ms); FLA: CUDA events
   around each call (ms). Both take the median of --reps after --warmup calls. On a GPU,
   device_ms sums each call's kernel time from a profiler trace (--profile_calls), JAX's
   and torch's alike. vs_fla = FLA's time / ours (queued where measured): above 1, we are
   faster; vs_fla_device the same on device_ms. tflops counts the algorithm's FLOPs
   (lte_jax.training.metrics' NSA count; fwd+bwd = 3 x fwd). mem_mib: XLA's temporary and
   output buffers of the compiled call; for FLA the peak allocated above the inputs.

An implementation lte_jax does not register (nsa_attention.IMPLEMENTATIONS) is reported as
'unavailable'. FLA's sliding-window branch calls flash-attn; without it (--fla_swa=auto)
a torch FlexAttention stand-in with the same window replaces fla.ops.nsa.parallel's
flash_attn_func, and the rows say which ran (fla_swa in the JSON environment). FLA needs
Hq / Hkv a power of two >= 16. The JSON is rewritten after every row.
"""
from __future__ import annotations

import os

# JAX and PyTorch share the GPU: without this JAX takes 75% of its memory at start.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import dataclasses  # noqa: E402
import functools  # noqa: E402
import importlib  # noqa: E402
import inspect  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from typing import Any, Callable  # noqa: E402

from absl import app, flags  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from experiments import bench_common  # noqa: E402
from lte_jax.ops.lte_attention.reference import token_positions  # noqa: E402
from lte_jax.ops.nsa_attention import api as nsa_api  # noqa: E402
from lte_jax.ops.nsa_attention import xla as nsa_xla  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("out", "bench_nsa.json", "Where to write the JSON results.")
flags.DEFINE_list("implementations", ["pallas", "xla"],
                  "nsa_attention implementations; 'pallas:k=v;k=v' passes plan_options.")
flags.DEFINE_list("shapes", ["4x4096x32x2x64", "1x16384x32x2x64"],
                  "BxTxHqxHkvxD shapes to time.")
flags.DEFINE_string("check_shape", "1x2048x32x2x64",
                    "BxTxHqxHkvxD of the correctness check ('' skips it).")
flags.DEFINE_integer("block_size", 64, "Tokens per compression / selection block.")
flags.DEFINE_integer("block_count", 16, "Blocks selected per query (>= 3).")
flags.DEFINE_integer("window", 511, "Sliding window: the largest distance i - j (511: 512 "
                     "tokens, FLA's window_size=512); -1: no sliding-window branch.")
flags.DEFINE_bool("torch", True, "Run FLA's parallel_nsa (torch, Triton) as the anchor.")
flags.DEFINE_enum("fla_swa", "auto", ["auto", "flash_attn", "flex"],
                  "FLA's sliding-window branch: flash-attn's kernel, torch FlexAttention in its "
                  "place, or auto (flash-attn where importable, else FlexAttention).")
flags.DEFINE_integer("reps", 20, "Timed repetitions (median reported).")
flags.DEFINE_integer("warmup", 3, "Calls before timing (compilation, FLA's autotuning).")
flags.DEFINE_integer("queued_calls", 20, "JAX calls back to back per queued timing; 0: off.")
flags.DEFINE_integer("profile_calls", 10, "On a GPU, calls traced per row for device_ms; 0: off.")
flags.DEFINE_string("profile_dir", "/tmp/bench_nsa_profile", "Where the traces go.")
flags.DEFINE_integer("seed", 0, "Seed of the inputs.")

# Relative errors allowed for bf16 inputs against the float32 reference: three branches,
# bf16 probabilities in the PV products and, where bf16 scores near a tie pick another
# block, a different selection. 'xla' at the default check shape (CPU): o 5.8e-3, dq / dk /
# dv 6.5e-3 to 7.8e-3, dgates 8.1e-3.
TOLERANCES = {"o": 1e-2, "dq": 1.5e-2, "dk": 1.5e-2, "dv": 1.5e-2, "dgates": 2e-2}
# Between two bf16 computations of the same function (pallas vs xla, FLA vs xla given the
# same blocks): both sides' rounding counts.
BF16_PAIR_TOLERANCES = {"o": 1.5e-2, "dq": 3e-2, "dk": 3e-2, "dv": 3e-2, "dgates": 4e-2}
GRADS = ("dq", "dk", "dv", "dgates")
RESULT_COLUMNS = ["shape", "pass", "impl", "status", "ms", "queued_ms", "device_ms", "fla_ms",
                  "vs_fla", "vs_fla_device", "tflops", "mem_mib"]
CHECK_COLUMNS = ["shape", "impl", "baseline", "ok", "o", *GRADS, "selection_agreement"]


@dataclasses.dataclass(frozen=True)
class Shape:
  """One B x T x Hq x Hkv x D entry of --shapes / --check_shape."""
  batch: int
  time: int
  q_heads: int
  kv_heads: int
  head_dim: int

  def __str__(self) -> str:
    return "x".join(str(v) for v in dataclasses.astuple(self))


def parse_shape(flag: str, value: str) -> Shape:
  """'4x4096x32x2x64' -> Shape; ValueError naming `flag` for anything else."""
  parts = value.split("x")
  if len(parts) != 5 or not all(p.isdigit() and int(p) > 0 for p in parts):
    raise ValueError(f"--{flag} takes BxTxHqxHkvxD (five positive integers, e.g. "
                     f"4x4096x32x2x64), got {value!r}")
  shape = Shape(*(int(p) for p in parts))
  if shape.q_heads % shape.kv_heads:
    raise ValueError(f"--{flag}: Hq ({shape.q_heads}) must be a multiple of Hkv "
                     f"({shape.kv_heads}), got {value!r}")
  return shape


def window() -> int | None:
  return None if FLAGS.window < 0 else FLAGS.window


# ---- inputs and lte_jax -------------------------------------------------------------------

def make_inputs(shape: Shape, seed: int) -> tuple[jax.Array, ...]:
  """bf16 q [B, T, Hq, D], k, v [B, T, Hkv, D], gates [B, T, Hq, 3] (sigmoid of a normal),
  d_o [B, T, Hq, D] (the output's cotangent)."""
  b, t, hq, hkv, d = dataclasses.astuple(shape)
  rng = np.random.default_rng(seed)
  normal = lambda *s: rng.standard_normal(s, dtype=np.float32)
  arrays = (normal(b, t, hq, d), normal(b, t, hkv, d), normal(b, t, hkv, d),
            1 / (1 + np.exp(-normal(b, t, hq, 3))), normal(b, t, hq, d))
  return tuple(jnp.asarray(x, jnp.bfloat16) for x in arrays)


def available(entry: str) -> bool:
  return bench_common.parse_implementation(entry)[0] in nsa_api.IMPLEMENTATIONS


@functools.cache
def lte_fns(entry: str) -> tuple[Callable, Callable]:
  """Jitted forward (q, k, v, gates) -> o and forward+backward (q, k, v, gates, d_o) ->
  (o, (dq, dk, dv, dgates)) for one --implementations entry. One pair per entry: the check
  and the timing at one shape share the compiled programs; the check reads both o and the
  gradients from the second."""
  name, options = bench_common.parse_implementation(entry)
  kw = dict(block_size=FLAGS.block_size, block_count=FLAGS.block_count, window_size=window(),
            implementation=name)
  if options:
    if "plan_options" not in inspect.signature(nsa_api.nsa_attention).parameters:
      raise ValueError(f"{entry!r}: nsa_attention takes no plan_options")
    kw["plan_options"] = options
  op = lambda q, k, v, g: nsa_api.nsa_attention(q, k, v, g, **kw)

  def fwdbwd(q, k, v, g, d_o):
    o, vjp = jax.vjp(op, q, k, v, g)
    return o, vjp(d_o.astype(o.dtype))
  return jax.jit(op), jax.jit(fwdbwd)


def lte_run(entry: str, inputs) -> tuple[np.ndarray, list[np.ndarray]]:
  """(o, [dq, dk, dv, dgates]) of one implementation, as float32 numpy."""
  o, grads = lte_fns(entry)[1](*inputs)
  return np.asarray(o, np.float32), [np.asarray(g, np.float32) for g in grads]


@jax.jit
def lte_selection(q: jax.Array, k: jax.Array) -> jax.Array:
  """The blocks lte_jax's xla path selects: [B, T, Hkv, ceil(T / block_size)] bool."""
  b, t = q.shape[:2]
  bs = FLAGS.block_size
  positions = token_positions(None, b, t)
  doc = nsa_xla.document_index(None, b, t)
  layout = nsa_xla.block_layout(positions, doc, bs)
  k_cmp = nsa_xla.mean_pool(k, layout, bs)
  return nsa_xla.select_blocks(q, k_cmp, layout, positions, doc, block_size=bs,
                               block_count=FLAGS.block_count, scale=q.shape[-1] ** -0.5)


def bitmap_to_indices(bitmap: np.ndarray, slots: int) -> np.ndarray:
  """[..., C] bool -> [..., slots] int32: the selected blocks in ascending order, then -1
  (FLA's block_indices layout; its backward needs a power-of-two slot count)."""
  if bitmap.shape[-1] < slots:
    pad = np.zeros(bitmap.shape[:-1] + (slots - bitmap.shape[-1],), bool)
    bitmap = np.concatenate([bitmap, pad], axis=-1)
  order = np.argsort(~bitmap, axis=-1, kind="stable")[..., :slots]
  return np.where(np.take_along_axis(bitmap, order, axis=-1), order, -1).astype(np.int32)


def indices_to_bitmap(indices: np.ndarray, num_blocks: int) -> np.ndarray:
  """[B, T, H, S] block indices (-1 or past the query's block: unused, as FLA reads them)
  -> [B, T, H, num_blocks] bool."""
  current = (np.arange(indices.shape[1]) // FLAGS.block_size)[None, :, None, None]
  valid = (indices >= 0) & (indices <= current)
  bitmap = np.zeros(indices.shape[:3] + (num_blocks + 1,), bool)
  np.put_along_axis(bitmap, np.where(valid, indices, num_blocks), True, axis=-1)
  return bitmap[..., :num_blocks]


def errors(got, want) -> dict[str, float]:
  """Relative errors of (o, [dq, dk, dv, dgates]) against another such pair."""
  out = {"o": bench_common.rel_error(got[0], want[0])}
  out.update({n: bench_common.rel_error(a, b) for n, a, b in zip(GRADS, got[1], want[1])})
  return out


def within(errs: dict[str, float], bounds: dict[str, float]) -> bool:
  return all(np.isfinite(e) and e <= bounds[n] for n, e in errs.items())


def print_row(row: dict) -> None:
  print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                 for k, v in row.items() if k != "kernels"), flush=True)


def _error(what: str, e: Exception) -> str:
  msg = f"{type(e).__name__}: {str(e)[:1500]}"
  print(f"{what}: {msg}", flush=True)
  return msg


# ---- FLA ----------------------------------------------------------------------------------

@dataclasses.dataclass
class Fla:
  torch: Any
  parallel: Any     # the module fla.ops.nsa.parallel
  swa: str          # what runs FLA's sliding-window branch


def flex_window_attention(torch):
  """flash_attn_func(q, k, v, causal=True, window_size=(left, 0)) on compiled FlexAttention:
  q [B, T, Hq, D], k / v [B, T, Hkv, D] -> [B, T, Hq, D]; key j visible to query i iff
  0 <= i - j <= left (any distance for left < 0). One block mask per (T, left)."""
  from torch.nn.attention.flex_attention import create_block_mask, flex_attention
  compiled = torch.compile(flex_attention)
  masks = {}

  def flash_attn_func(q, k, v, causal=True, window_size=(-1, -1), **unused):
    if unused or not causal or window_size[1] not in (0, -1):
      raise ValueError(f"the FlexAttention stand-in does causal (left, 0) windows only, got "
                       f"causal={causal}, window_size={window_size}, {sorted(unused)}")
    t, left = q.shape[1], window_size[0]
    if (t, left) not in masks:
      def mask_mod(b, h, q_idx, kv_idx):
        causal = q_idx >= kv_idx
        return causal if left < 0 else causal & (q_idx - kv_idx <= left)
      masks[t, left] = create_block_mask(mask_mod, None, None, t, t, device=q.device)
    o = compiled(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                 block_mask=masks[t, left], enable_gqa=q.shape[2] != k.shape[2])
    return o.transpose(1, 2)
  return flash_attn_func


def load_fla() -> Fla | None:
  """FLA's parallel_nsa module with its sliding-window branch resolved per --fla_swa; None
  (with the reason printed) without --torch, torch, FLA or a CUDA device."""
  if not FLAGS.torch:
    return None
  try:
    import torch
    parallel = importlib.import_module("fla.ops.nsa.parallel")
  except ImportError as e:
    print(f"torch / flash-linear-attention not importable ({e}); FLA skipped", flush=True)
    return None
  if not torch.cuda.is_available():
    print("torch has no CUDA device; FLA skipped", flush=True)
    return None
  has_flash_attn = parallel.flash_attn_func is not None
  if window() is None:
    swa = "none"
  elif FLAGS.fla_swa == "flash_attn" or (FLAGS.fla_swa == "auto" and has_flash_attn):
    if not has_flash_attn:
      print("--fla_swa=flash_attn but flash-attn is not importable; FLA skipped", flush=True)
      return None
    import flash_attn
    swa = f"flash-attn {flash_attn.__version__}"
  else:
    parallel.flash_attn_func = flex_window_attention(torch)
    swa = "torch FlexAttention (flash-attn stand-in)"
  print(f"FLA's sliding-window branch: {swa}", flush=True)
  return Fla(torch, parallel, swa)


def fla_inputs(fla: Fla, inputs, *, grad: bool):
  """lte_jax's bf16 inputs as CUDA tensors: q, k, v, g_cmp, g_slc, g_swa ([B, T, Hq] each,
  leaves of their own, so each gets its gradient), d_o."""
  torch = fla.torch
  cuda = lambda x: torch.from_numpy(np.ascontiguousarray(x)).cuda().to(torch.bfloat16)
  q, k, v, gates, d_o = (np.asarray(x, np.float32) for x in inputs)
  leaves = [cuda(x).requires_grad_(grad) for x in (q, k, v, *np.moveaxis(gates, -1, 0))]
  return leaves, cuda(d_o)


def fla_call(fla: Fla, leaves, block_indices=None):
  w = window()
  return fla.parallel.parallel_nsa(
      *leaves, block_indices=block_indices, block_counts=FLAGS.block_count,
      block_size=FLAGS.block_size, window_size=0 if w is None else w + 1)


def fla_run(fla: Fla, inputs, block_indices=None) -> tuple[np.ndarray, list[np.ndarray]]:
  """(o, [dq, dk, dv, dgates]) of FLA's parallel_nsa, as float32 numpy."""
  torch = fla.torch
  leaves, d_o = fla_inputs(fla, inputs, grad=True)
  o = fla_call(fla, leaves, block_indices)
  o.backward(d_o)
  host = lambda t: t.detach().float().cpu().numpy()
  grads = [host(x.grad) if x.grad is not None else np.zeros(x.shape, np.float32)
           for x in leaves]
  return host(o), grads[:3] + [np.stack(grads[3:], axis=-1)]


def fla_selection(fla: Fla, inputs) -> np.ndarray:
  """FLA's own block_indices [B, T, Hkv, S] (its compression and top-k kernels, as
  parallel_nsa runs them)."""
  torch = fla.torch
  compression = importlib.import_module("fla.ops.nsa.compression")
  pooling = importlib.import_module("fla.ops.utils.pooling")
  (q, k, v, *_), _ = fla_inputs(fla, inputs, grad=False)
  bs, scale, t = FLAGS.block_size, q.shape[-1] ** -0.5, q.shape[1]
  with torch.no_grad():
    k_cmp, v_cmp = pooling.mean_pooling(k, bs), pooling.mean_pooling(v, bs)
    _, lse = compression.parallel_nsa_compression(q=q, k=k_cmp, v=v_cmp, TK=t, block_size=bs,
                                                  scale=scale)
    indices = fla.parallel.parallel_nsa_topk(q=q, k=k_cmp, lse=lse, TK=t,
                                             block_counts=FLAGS.block_count, block_size=bs,
                                             scale=scale)
  return indices.cpu().numpy()


def time_torch(torch, fn: Callable[[], Any], label: str) -> float:
  """Median ms of fn() between CUDA events, --reps calls after --warmup."""
  start = time.perf_counter()
  fn()
  torch.cuda.synchronize()
  print(f"{label}: first call {time.perf_counter() - start:.1f} s", flush=True)
  for _ in range(FLAGS.warmup - 1):
    fn()
  torch.cuda.synchronize()
  return bench_common.torch_event_ms(fn, FLAGS.reps)


def torch_extra_mib(torch, fn: Callable[[], Any]) -> float:
  """Peak MiB allocated by one call of fn() above what was allocated before it."""
  torch.cuda.synchronize()
  torch.cuda.reset_peak_memory_stats()
  base = torch.cuda.memory_allocated()
  fn()
  torch.cuda.synchronize()
  return (torch.cuda.max_memory_allocated() - base) / 2**20


# ---- 1. correctness -----------------------------------------------------------------------

def check(shape: Shape, fla: Fla | None) -> list[dict]:
  inputs = make_inputs(shape, FLAGS.seed + 1)
  base = dict(shape=str(shape))
  rows, results = [], {}

  def record(row):
    rows.append(row)
    print_row(row)

  for entry in ["reference", *FLAGS.implementations]:
    if not available(entry):
      record(dict(base, impl=f"lte_jax/{entry}", ok="unavailable"))
      continue
    try:
      results[entry] = lte_run(entry, inputs)
    except Exception as e:  # noqa: BLE001  (reported; the others go on)
      record(dict(base, impl=f"lte_jax/{entry}", ok="error", error=_error(f"check {entry}", e)))
  reference = results.pop("reference", None)
  for entry, got in results.items():
    if reference is not None:
      errs = errors(got, reference)
      record(dict(base, impl=f"lte_jax/{entry}", baseline="lte_jax/reference",
                  ok=within(errs, TOLERANCES), **errs))
  pallas = [e for e in results if e.split(":")[0] == "pallas"]
  if "xla" in results:
    for entry in pallas:
      errs = errors(results[entry], results["xla"])
      record(dict(base, impl=f"lte_jax/{entry}", baseline="lte_jax/xla",
                  ok=within(errs, BF16_PAIR_TOLERANCES), **errs))
  if fla is not None:
    rows += check_fla(shape, fla, inputs)
  return rows


def check_fla(shape: Shape, fla: Fla, inputs) -> list[dict]:
  """FLA's parallel_nsa against lte_jax 'xla': given lte_jax's selection, then its own."""
  base = dict(shape=str(shape), impl="fla/parallel_nsa", baseline="lte_jax/xla", swa=fla.swa)
  rows = []
  try:
    xla = lte_run("xla", inputs)
    bitmap = np.asarray(lte_selection(inputs[0], inputs[1]))
    slots = 1 << max(FLAGS.block_count - 1, 0).bit_length()      # next power of two
    indices = bitmap_to_indices(bitmap, slots)
    given = fla.torch.from_numpy(indices).cuda()
    errs = errors(fla_run(fla, inputs, given), xla)
    rows.append(dict(base, selection="lte_jax", ok=within(errs, BF16_PAIR_TOLERANCES), **errs))
  except Exception as e:  # noqa: BLE001
    rows.append(dict(base, selection="lte_jax", ok="error",
                     error=_error("check fla (lte_jax selection)", e)))
    return rows
  print_row(rows[-1])
  try:  # information only: near ties of the bf16 scores pick other blocks
    own = indices_to_bitmap(fla_selection(fla, inputs), bitmap.shape[-1])
    agreement = float(np.mean(np.all(own == bitmap, axis=-1)))
    errs = errors(fla_run(fla, inputs), xla)
    rows.append(dict(base, selection="fla", ok="info", selection_agreement=agreement, **errs))
  except Exception as e:  # noqa: BLE001
    rows.append(dict(base, selection="fla", ok="error",
                     error=_error("check fla (own selection)", e)))
  print_row(rows[-1])
  return rows


# ---- 2. timing ----------------------------------------------------------------------------

def nsa_flops(shape: Shape) -> float:
  """Forward FLOPs of the algorithm (lte_jax.training.metrics' NSA count): per query and
  head, QK^T and PV over ~T / (2 block_size) compressed blocks, the selected blocks' tokens
  and the window, each capped by the causal context."""
  b, t, hq, _, d = dataclasses.astuple(shape)
  causal = (t + 1) / 2
  context = t / (2 * FLAGS.block_size) + min(FLAGS.block_count * FLAGS.block_size, causal)
  if window() is not None:
    context += min(causal, window() + 1)
  return 4.0 * context * b * t * hq * d


def xla_extra_mib(fn, *args) -> float | None:
  """MiB of XLA's temporary and output buffers of the compiled call (None if unknown)."""
  try:
    stats = fn.lower(*args).compile().memory_analysis()
    return (stats.temp_size_in_bytes + stats.output_size_in_bytes) / 2**20
  except Exception:  # noqa: BLE001  (an optional column)
    return None


def time_lte(shape: Shape, entry: str, inputs, record) -> None:
  label = f"lte_jax/{entry}"
  base = dict(shape=str(shape), impl=label)
  if not available(entry):
    for pass_ in ("fwd", "fwdbwd"):
      record(dict(base, **{"pass": pass_}, status="unavailable"))
    return
  rotated = [inputs] + [tuple(x + 0 for x in inputs) for _ in range(3)]
  fwd, grad = lte_fns(entry)
  for pass_, fn, n in (("fwd", fwd, 4), ("fwdbwd", grad, 5)):
    row = dict(base, **{"pass": pass_})
    try:
      row["ms"] = bench_common.time_jax(lambda: fn(*inputs[:n]), warmup=FLAGS.warmup,
                                        reps=FLAGS.reps, label=f"{shape} {label} {pass_}")
      if FLAGS.queued_calls > 0:
        row["queued_ms"] = bench_common.time_jax_queued(
            fn, reps=FLAGS.reps, calls=FLAGS.queued_calls, args_sets=[a[:n] for a in rotated])
      row["mem_mib"] = xla_extra_mib(fn, *inputs[:n])
      row["status"] = "ok"
    except Exception as e:  # noqa: BLE001  (reported; the other rows go on)
      row.update(status="error", error=_error(f"{shape} {label} {pass_}", e))
      record(row)
      continue
    try:  # traced after the timings (compiled, warm); a profiler failure costs this column only
      row.update(bench_common.device_time(lambda: fn(*inputs[:n]), f"{shape} {label} {pass_}",
                                          calls=FLAGS.profile_calls,
                                          profile_dir=FLAGS.profile_dir, key="device_ms"))
    except Exception as e:  # noqa: BLE001
      row["profile_error"] = _error(f"{shape} {label} {pass_} profile", e)
    record(row)


def time_fla(shape: Shape, fla: Fla, inputs, record) -> list[Callable[[], None]]:
  """Times FLA's forward and forward+backward into two rows; returns, per row, a closure
  that adds its device_ms. Run those after every JAX trace: once torch's profiler has run,
  JAX's cannot subscribe to CUPTI in this process (bench_kernels met it on the H200)."""
  torch = fla.torch
  base = dict(shape=str(shape), impl="fla/parallel_nsa", swa=fla.swa)
  leaves, d_o = fla_inputs(fla, inputs, grad=True)

  def fwd():  # no autograd graph: as the jitted JAX forward, nothing is saved
    with torch.no_grad():
      return fla_call(fla, leaves)

  def fwdbwd():
    bench_common.torch_backward(fla_call(fla, leaves), d_o, leaves)

  later = []
  for pass_, fn in (("fwd", fwd), ("fwdbwd", fwdbwd)):
    row = dict(base, **{"pass": pass_})
    try:
      row["ms"] = time_torch(torch, fn, f"{shape} fla/parallel_nsa {pass_}")
      row["mem_mib"] = torch_extra_mib(torch, fn)
      row["status"] = "ok"
    except Exception as e:  # noqa: BLE001
      row.update(status="error", error=_error(f"{shape} fla/parallel_nsa {pass_}", e))
    record(row)
    if row["status"] != "ok":
      continue

    def device(row=row, fn=fn, pass_=pass_):
      try:
        row["device_ms"] = bench_common.torch_device_ms(
            fn, FLAGS.profile_calls,
            os.path.join(FLAGS.profile_dir, f"fla_{shape}_{pass_}.json"))
      except Exception as e:  # noqa: BLE001
        row["profile_error"] = _error(f"{shape} fla/parallel_nsa {pass_} profile", e)
    later.append(device)
  torch.cuda.empty_cache()   # the XLA rows that follow get the blocks torch freed
  return later


def add_ratios(rows: list[dict]) -> None:
  """tflops of every timed row; fla_ms, vs_fla and vs_fla_device of the lte_jax rows from
  the FLA row of the same shape and pass."""
  anchors = {(r["shape"], r["pass"]): r for r in rows
             if r["impl"] == "fla/parallel_nsa" and r.get("ms")}
  for r in rows:
    if not r.get("ms"):
      continue
    ours = r.get("queued_ms") or r["ms"]
    flops = nsa_flops(parse_shape("shapes", r["shape"])) * (3 if r["pass"] == "fwdbwd" else 1)
    r["tflops"] = flops / (ours * 1e-3) / 1e12
    anchor = anchors.get((r["shape"], r["pass"]))
    if anchor is None or r is anchor:
      continue
    r["fla_ms"] = anchor["ms"]
    r["vs_fla"] = anchor["ms"] / ours
    if anchor.get("device_ms") and r.get("device_ms"):
      r["vs_fla_device"] = anchor["device_ms"] / r["device_ms"]


# ---- main ---------------------------------------------------------------------------------

def environment(fla: Fla | None) -> dict:
  env = bench_common.environment()
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  git = lambda *a: subprocess.run(["git", *a], cwd=repo, capture_output=True, text=True,
                                  check=False).stdout.strip()
  env["commit"] = git("rev-parse", "HEAD") or None
  env["tracked_changes"] = bool(git("status", "--porcelain", "--untracked-files=no"))
  if fla is not None:
    env.update(torch_device=fla.torch.cuda.get_device_name(), torch_cuda=fla.torch.version.cuda,
               fla_swa=fla.swa)
  return env


def main(argv):
  del argv
  try:
    shapes = [parse_shape("shapes", s) for s in FLAGS.shapes]
    check_shape = parse_shape("check_shape", FLAGS.check_shape) if FLAGS.check_shape else None
    nsa_api.check_block_args(FLAGS.block_size, FLAGS.block_count)
  except ValueError as err:
    sys.exit(f"bench_nsa: {err}")
  fla = load_fla()
  results = dict(environment=environment(fla),
                 setup=dict(block_size=FLAGS.block_size, block_count=FLAGS.block_count,
                            window=window(), implementations=FLAGS.implementations,
                            registered=sorted(nsa_api.IMPLEMENTATIONS), reps=FLAGS.reps,
                            warmup=FLAGS.warmup, queued_calls=FLAGS.queued_calls),
                 checks=[], results=[])
  write = lambda: bench_common.write_json(FLAGS.out, results)

  if check_shape is not None:
    results["checks"] = check(check_shape, fla)
    write()

  def record(row):
    results["results"].append(row)
    add_ratios(results["results"])
    print_row(row)
    write()

  fla_device = []
  for shape in shapes:
    inputs = make_inputs(shape, FLAGS.seed)
    if fla is not None:   # first: the lte_jax rows' ratios land with them
      fla_device += time_fla(shape, fla, inputs, record)
    for entry in FLAGS.implementations:
      time_lte(shape, entry, inputs, record)
    del inputs
  for measure in fla_device:   # torch's profiler last (time_fla says why)
    measure()
  add_ratios(results["results"])

  if results["checks"]:
    print("\ncorrectness (relative errors)")
    shown = [{**r, **{n: f"{r[n]:.1e}" for n in ("o", *GRADS) if n in r},
              "impl": r["impl"] + (f" ({r['selection']} selection)" if "selection" in r else "")}
             for r in results["checks"]]
    bench_common.print_table(shown, CHECK_COLUMNS)
  print("\nNSA attention (median ms; vs_fla = FLA's time / ours)")
  bench_common.print_table(results["results"], RESULT_COLUMNS)
  if fla is not None:
    print(f"fla/parallel_nsa's sliding-window branch: {fla.swa}")
  write()
  if any(r["ok"] in (False, "error") for r in results["checks"]):
    print("WARNING: a correctness check failed (see the first table)")


if __name__ == "__main__":
  app.run(main)
