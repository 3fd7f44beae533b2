"""Benchmark LTE attention (training) and LTE cache attention (decode) against dense anchors.

  python -m experiments.bench_lte --out=/tmp/bench_lte.json           # on the H200
  python -m experiments.bench_lte --smoke --out=/tmp/bench_lte.json   # tiny shapes, CPU
  python -m experiments.bench_lte \\
      --implementations='pallas,pallas:block_q=64;block_k=64;num_warps=4,xla'   # tuning

All in one process, bf16 inputs, median ms:

1. Training attention, forward and forward+backward, per --shapes (BxTxHxD) with
   window w, s sinks and about --retained keys per head outside the sinks retained
   (random scores, the positive ones scattered uniformly; the same pattern for
   everything timed):
   - lte_jax/<impl>: lte_jax.ops.lte_attention(..., budget=None) per --implementations;
   - lte_jax/swa-<impl>: lte_jax.ops.attention(window_size=w) per --attention_implementations;
   - jax/cudnn-causal: dense causal lte_jax.ops.attention(implementation='cudnn');
   - torch/sdpa-<backend>: dense causal scaled_dot_product_attention, each of the flash
     and cuDNN backends (and the one torch picks by itself, named);
   - torch/flex: FlexAttention (torch.compile) with a BlockMask of the same LTE mask,
     causal & (j < s | i - j <= w | retained[b, h, j]).
2. Decode, one query per sequence, per --decode_heads (Hq:Hkv) at --decode_batch:
   - lte_jax/decode-<impl>: lte_jax.ops.lte_decode_attention over a full LTE cache
     (ring w + 1 + budget retained slots, LTEConfig defaults: 769 + 512);
   - full attention over --decode_contexts tokens: jax einsum-softmax, jax cuDNN
     (jax.nn.dot_product_attention) and torch SDPA, KV [B, ctx, Hkv, D].
   The decode table gives the KV bytes read per step over the time (GB/s).

JAX training rows are timed twice: one synchronised call at a time (fwd_ms, fwdbwd_ms: the
host's dispatch-and-sync round trip included) and queued (fwd_queued_ms, fwdbwd_queued_ms:
20 calls back to back, one sync, inputs rotated over 4 copies past the L2 cache). The
torch rows are CUDA-event times (do_bench, which flushes the L2), so compare them with the
queued columns. Decode steps are always timed queued.

On a GPU each JAX training row also gets, from a profiler trace of --profile_calls
fwd+bwd calls, the summed kernel time per call (fwdbwd_device_ms: no dispatch or launch
gaps) and its longest kernels (kernels: name -> ms per call).

First, at --check_shape, every lte_jax implementation's output and gradients are
checked on the device against the fp32 reference (and FlexAttention's output,
which proves the anchor computes the same mask). Torch parts are skipped with a
message when torch (with CUDA) is not importable. The JSON is rewritten after
every timed row, so a run cut short keeps what it measured.
"""
from __future__ import annotations

import dataclasses
import os

# JAX and PyTorch share the GPU: without this JAX takes 75% of its memory at start.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

from typing import Any, Callable  # noqa: E402

from absl import app, flags  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from experiments import bench_common  # noqa: E402
from lte_jax.configs import LTEConfig  # noqa: E402
from lte_jax.ops.attention import attention  # noqa: E402
from lte_jax.ops.lte_attention import lte_attention  # noqa: E402
from lte_jax.ops.lte_decode import lte_decode_attention  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("out", "bench_lte.json", "Where to write the JSON results.")
flags.DEFINE_list("sections", ["check", "train", "decode"],
                  "Which parts to run: check, train, stages (the Pallas LTE op's parts, each "
                  "jitted alone, per 'pallas' entry of --implementations), decode.")
flags.DEFINE_list("implementations", ["pallas", "xla"],
                  "lte_attention implementations; 'pallas:k=v;k=v' passes plan_options.")
flags.DEFINE_list("attention_implementations", ["pallas", "xla", "cudnn"],
                  "Sliding-window lte_jax.ops.attention implementations ('impl:k=v;...' too).")
flags.DEFINE_list("decode_implementations", ["pallas", "xla"],
                  "lte_decode_attention implementations ('pallas:block_k=64;split=256' too).")
flags.DEFINE_list("shapes", ["4x4096x16x64", "1x16384x16x64"], "Training BxTxHxD shapes.")
flags.DEFINE_integer("window", 768, "LTE / SWA window w (max distance; w + 1 tokens).")
flags.DEFINE_integer("sinks", 4, "LTE sink tokens s.")
flags.DEFINE_integer("retained", 512, "Retained keys per (batch, head) outside the sinks.")
flags.DEFINE_string("check_shape", "1x512x4x64", "BxTxHxD of the correctness check ('' skips).")
flags.DEFINE_integer("check_window", 64, "Window of the check (smaller than its T).")
flags.DEFINE_integer("check_retained", 32, "Retained keys per head in the check.")
flags.DEFINE_integer("decode_batch", 32, "Decode batch.")
flags.DEFINE_list("decode_heads", ["16:16"], "Decode Hq:Hkv layouts (e.g. 16:16,32:8).")
flags.DEFINE_integer("decode_dim", 64, "Decode head dim.")
flags.DEFINE_list("decode_contexts", ["4096", "32768", "131072"],
                  "Full-attention decode contexts (tokens in the KV cache).")
flags.DEFINE_integer("budget", LTEConfig().budget, "LTE decode cache: retained slots.")
flags.DEFINE_bool("torch", True, "Time the torch anchors (SDPA, FlexAttention).")
flags.DEFINE_bool("torch_flex", True, "Time torch FlexAttention with the LTE mask (its "
                  "compilation takes about a minute).")
flags.DEFINE_integer("reps", 30, "Timed repetitions (median reported).")
flags.DEFINE_integer("profile_calls", 10,
                     "fwd+bwd calls traced per lte_jax training row for the per-kernel device "
                     "time, GPU only; 0: off.")
flags.DEFINE_string("profile_dir", "/tmp/bench_lte_profile", "Where the traces go.")
flags.DEFINE_bool("smoke", False, "Tiny shapes and 2 reps (CPU check of the script); "
                  "flags given explicitly keep their values.")

# Relative-RMS bounds for bf16 inputs: output, dq/dk/dv, dscores (as bench_kernels).
TOLERANCES = {"o": 5e-3, "dq": 8e-3, "dk": 8e-3, "dv": 8e-3, "dscores": 2e-2}
SMOKE = dict(shapes=["1x64x2x16"], window=16, sinks=2, retained=8, check_shape="1x48x2x16",
             check_window=8, check_retained=6, decode_batch=2, decode_heads=["4:2"],
             decode_dim=16, decode_contexts=["64", "256"], budget=8, reps=2)


@dataclasses.dataclass
class Setup:
  """The flags, with --smoke's tiny values applied."""
  shapes: list
  window: int
  sinks: int
  retained: int
  check_shape: str
  check_window: int
  check_retained: int
  decode_batch: int
  decode_heads: list
  decode_dim: int
  decode_contexts: list
  budget: int
  reps: int

  @classmethod
  def from_flags(cls):
    values = {f.name: getattr(FLAGS, f.name) for f in dataclasses.fields(cls)}
    if FLAGS.smoke:  # flags given on the command line still win
      values.update({k: v for k, v in SMOKE.items() if not FLAGS[k].present})
    return cls(**values)


# ---- helpers ------------------------------------------------------------------------------

def _with_options(fn, name, options, **kw):
  return fn(implementation=name, **kw) if options is None else fn(
      implementation=name, plan_options=options, **kw)


def _shape(s: str) -> tuple[int, int, int, int]:
  b, t, h, d = (int(x) for x in s.split("x"))
  return b, t, h, d


def train_inputs(b, t, h, d, *, sinks, retained, seed=0):
  """bf16 q, k, v [B, T, H, D], fp32 scores [B, T, H] with `retained` positive scores per
  (b, h) at uniformly drawn positions >= sinks, numpy d_o (fp32)."""
  rng = np.random.default_rng(seed)
  normal = lambda *s: rng.standard_normal(s, dtype=np.float32)
  scores = -rng.uniform(0.01, 0.5, (b, t, h)).astype(np.float32)
  n = min(retained, t - sinks)
  for bi in range(b):
    for hi in range(h):
      idx = rng.choice(np.arange(sinks, t), size=n, replace=False)
      scores[bi, idx, hi] = rng.uniform(0.01, 0.5, n)
  return normal(b, t, h, d), normal(b, t, h, d), normal(b, t, h, d), scores, normal(b, t, h, d)


def _jax_train(args):
  q, k, v, scores, d_o = args
  bf16 = lambda x: jnp.asarray(x, jnp.bfloat16)
  return bf16(q), bf16(k), bf16(v), jnp.asarray(scores), jnp.asarray(d_o)


def _fns(op: Callable[..., jax.Array], argnums=(0, 1, 2)):
  """Jitted forward and value_and_grad of <o, d_o> w.r.t. argnums."""
  def loss(*args):
    *inputs, d_o = args
    return jnp.sum(op(*inputs).astype(jnp.float32) * d_o)
  return jax.jit(op), jax.jit(jax.value_and_grad(loss, argnums=argnums))


def _error(what: str, e: Exception) -> str:
  msg = f"{type(e).__name__}: {str(e)[:1500]}"
  print(f"{what}: skipped ({msg})", flush=True)
  return msg


def _failed(e: Exception) -> str:
  """A check's status when it raised: 'skipped' for a ValueError (an implementation this
  build or backend lacks: unknown name, cuDNN off a GPU), else 'error'."""
  return "skipped" if isinstance(e, ValueError) else "error"


# ---- torch anchors ------------------------------------------------------------------------

def load_torch():
  if not FLAGS.torch:
    return None
  try:
    import torch
  except ImportError as e:
    print(f"torch not importable ({e}); torch anchors skipped", flush=True)
    return None
  if not torch.cuda.is_available():
    print("torch has no CUDA device; torch anchors skipped", flush=True)
    return None
  return torch


def time_torch(torch, fn) -> float:
  """Median ms with CUDA events (triton.testing.do_bench when importable)."""
  try:
    import triton
    return triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median")
  except ImportError:
    for _ in range(5):
      fn()
    torch.cuda.synchronize()
    return bench_common.torch_event_ms(fn, FLAGS.reps)


def _torch_bhtd(torch, x, *, grad=False):
  """numpy [B, T, H, D] -> bf16 CUDA [B, H, T, D]."""
  t = torch.from_numpy(np.ascontiguousarray(np.swapaxes(x, 1, 2))).cuda().to(torch.bfloat16)
  return t.requires_grad_(grad)


def lte_mask_mod(torch, retained, sinks: int, window: int):
  """FlexAttention mask_mod of the LTE pattern; retained [B, H, T] bool (CUDA)."""
  del torch

  def mask_mod(b, h, q_idx, kv_idx):
    keep = (kv_idx < sinks) | (q_idx - kv_idx <= window) | retained[b, h, kv_idx]
    return (q_idx >= kv_idx) & keep
  return mask_mod


def torch_flex(torch, args, *, sinks, window):
  """(forward, forward+backward) closures of compiled FlexAttention with the LTE mask."""
  from torch.nn.attention.flex_attention import create_block_mask, flex_attention
  q, k, v, scores, d_o = args
  b, t, h, _ = q.shape
  retained = torch.from_numpy(np.ascontiguousarray(np.swapaxes(scores > 0, 1, 2))).cuda()
  mask_mod = lte_mask_mod(torch, retained, sinks, window)
  try:
    block_mask = create_block_mask(mask_mod, b, h, t, t, device="cuda", _compile=True)
  except TypeError:
    block_mask = create_block_mask(mask_mod, b, h, t, t, device="cuda")
  flex = torch.compile(flex_attention)
  tq, tk, tv = (_torch_bhtd(torch, x, grad=True) for x in (q, k, v))
  tdo = _torch_bhtd(torch, d_o)
  def fwd():  # no autograd graph: as the jitted JAX forward, nothing is saved
    with torch.no_grad():
      return flex(tq, tk, tv, block_mask=block_mask)

  def fwdbwd():
    bench_common.torch_backward(flex(tq, tk, tv, block_mask=block_mask), tdo, (tq, tk, tv))
  return fwd, fwdbwd


def torch_sdpa_backends(torch):
  """[(name, backend or None)]: the flash and cuDNN backends, and torch's own pick."""
  from torch.nn.attention import SDPBackend
  backends = [("sdpa-default", None)]
  for name in ("FLASH_ATTENTION", "CUDNN_ATTENTION"):
    if hasattr(SDPBackend, name):
      backends.append((f"sdpa-{name.split('_')[0].lower()}", getattr(SDPBackend, name)))
  return backends


def torch_sdpa_choice(torch, q, k, v, **kw) -> str:
  """The backend torch picks for these inputs (a private API; '?' when missing)."""
  try:
    from torch.nn.attention import SDPBackend
    choice = int(torch._fused_sdp_choice(q, k, v, **kw))
    return next((name for name, member in SDPBackend.__members__.items()
                 if int(member) == choice), str(choice))
  except Exception:  # noqa: BLE001  (only a label)
    return "?"


def _sdpa(torch, backend, fn):
  if backend is None:
    return fn
  from torch.nn.attention import sdpa_kernel

  def run():
    with sdpa_kernel(backend):
      return fn()
  return run


# ---- 0. correctness -----------------------------------------------------------------------

def check(setup: Setup, torch) -> list[dict]:
  b, t, h, d = _shape(setup.check_shape)
  w, s = setup.check_window, setup.sinks
  np_args = train_inputs(b, t, h, d, sinks=s, retained=setup.check_retained, seed=1)
  q, k, v, scores, d_o = _jax_train(np_args)
  rows = []

  def compare(label, op, argnums, names):
    fwd_ref, grad_ref = _fns(op("reference", None), argnums)
    o_ref = fwd_ref(q, k, v, scores)
    _, g_ref = grad_ref(q, k, v, scores, d_o)
    for entry in names:
      name, options = bench_common.parse_implementation(entry)
      try:
        fwd, grad = _fns(op(name, options), argnums)
        errors = {"o": bench_common.rel_error(fwd(q, k, v, scores), o_ref)}
        _, g = grad(q, k, v, scores, d_o)
        errors.update({n: bench_common.rel_error(a, r)
                       for n, a, r in zip(("dq", "dk", "dv", "dscores"), g, g_ref)})
      except Exception as e:  # noqa: BLE001  (reported; the others go on)
        rows.append(dict(shape=setup.check_shape, impl=f"{label}{entry}", ok=_failed(e),
                         error=_error(f"check {label}{entry}", e)))
        continue
      ok = all(np.isfinite(e) and e <= TOLERANCES[n] for n, e in errors.items())
      rows.append(dict(shape=setup.check_shape, impl=f"{label}{entry}", ok=ok, **errors))

  lte_op = lambda name, options: lambda q, k, v, r: _with_options(
      lte_attention, name, options, q=q, k=k, v=v, scores=r, sink_size=s, window_size=w)
  compare("lte_jax/", lte_op, (0, 1, 2, 3), FLAGS.implementations)
  swa_op = lambda name, options: lambda q, k, v, r: _with_options(
      attention, name, options, q=q, k=k, v=v, window_size=w)
  compare("lte_jax/swa-", swa_op, (0, 1, 2), FLAGS.attention_implementations)
  rows += check_decode(setup)

  if torch is not None:
    try:
      from torch.nn.attention.flex_attention import create_block_mask, flex_attention
      retained = torch.from_numpy(np.ascontiguousarray(np.swapaxes(np_args[3] > 0, 1, 2))).cuda()
      block_mask = create_block_mask(lte_mask_mod(torch, retained, s, w), b, h, t, t,
                                     device="cuda")
      tq, tk, tv = (_torch_bhtd(torch, x) for x in np_args[:3])
      o = flex_attention(tq, tk, tv, block_mask=block_mask).transpose(1, 2).float().cpu()
      o_ref = lte_attention(q, k, v, scores, sink_size=s, window_size=w,
                            implementation="reference")
      err = bench_common.rel_error(o.numpy(), o_ref)
      rows.append(dict(shape=setup.check_shape, impl="torch/flex", ok=err <= TOLERANCES["o"],
                       o=err))
    except Exception as e:  # noqa: BLE001
      rows.append(dict(shape=setup.check_shape, impl="torch/flex", ok="error",
                       error=_error("check torch/flex", e)))
  return rows


def decode_inputs(batch, hq, hkv, d, ring, budget, *, seed=0):
  """bf16 q [B, 1, Hq, D] and a full LTE cache k, v [B, ring + budget, Hkv, D] (random
  on the device), fill = budget, and a position past the ring's wrap."""
  kq, kk, kv = jax.random.split(jax.random.key(seed), 3)
  slots = ring + budget
  q = jax.random.normal(kq, (batch, 1, hq, d), jnp.bfloat16)
  k = jax.random.normal(kk, (batch, slots, hkv, d), jnp.bfloat16)
  v = jax.random.normal(kv, (batch, slots, hkv, d), jnp.bfloat16)
  fill = jnp.full((batch, hkv), budget, jnp.int32)
  return q, k, v, fill, jnp.asarray(10 * ring + 3, jnp.int32)


def check_decode(setup: Setup) -> list[dict]:
  """LTE decode implementations vs the reference at a few fills and positions."""
  hq, hkv = (int(x) for x in setup.decode_heads[-1].split(":"))
  ring = setup.window + 1
  q, k, v, _, _ = decode_inputs(2, hq, hkv, setup.decode_dim, ring, setup.budget, seed=3)
  fill = jnp.asarray(np.random.default_rng(3).integers(0, setup.budget + 1, (2, hkv)),
                     jnp.int32)
  run = lambda impl, opts: jax.jit(lambda n: _with_options(
      lte_decode_attention, impl, opts, q=q, k=k, v=v, fill=fill, num_tokens=n,
      ring_size=ring))
  reference = run("reference", None)
  positions = [jnp.asarray(n, jnp.int32) for n in (1, ring // 2, ring, 3 * ring + 5)]
  rows = []
  for entry in FLAGS.decode_implementations:
    name, options = bench_common.parse_implementation(entry)
    worst = 0.0
    try:
      fn = run(name, options)
      for n in positions:
        worst = max(worst, bench_common.rel_error(fn(n), reference(n)))
    except Exception as e:  # noqa: BLE001
      rows.append(dict(shape="decode", impl=f"lte_jax/decode-{entry}", ok=_failed(e),
                       error=_error(f"check decode-{entry}", e)))
      continue
    rows.append(dict(shape=f"decode 2x{hq}:{hkv}x{setup.decode_dim}",
                     impl=f"lte_jax/decode-{entry}", ok=worst <= TOLERANCES["o"], o=worst))
  return rows


# ---- 1. training attention ----------------------------------------------------------------

def bench_train(setup: Setup, torch, record: Callable[[dict], None]) -> None:
  w, s = setup.window, setup.sinks
  for shape in setup.shapes:
    np_args = train_inputs(*_shape(shape), sinks=s, retained=setup.retained)
    q, k, v, scores, d_o = _jax_train(np_args)
    # Copies for the queued timings: 4 sets of q, k, v, scores, dO (33 MB a set at
    # 4x4096x16x64) overflow the H200's 50 MB L2, as torch's do_bench flushes it.
    rotated = [(q, k, v, scores, d_o)] + [tuple(x + 0 for x in (q, k, v, scores, d_o))
                                          for _ in range(3)]
    kept = float(np.mean(np.sum(np_args[3] > 0, axis=1)))
    base = dict(shape=shape, window=w, sinks=s, retained_per_head=kept)

    def run_jax(label, op, argnums):
      try:
        fwd, grad = _fns(op, argnums)
        f = bench_common.time_jax(lambda: fwd(q, k, v, scores), reps=setup.reps,
                                  label=f"{shape} {label} fwd")
        fb = bench_common.time_jax(lambda: grad(q, k, v, scores, d_o), reps=setup.reps,
                                   label=f"{shape} {label} fwd+bwd")
      except Exception as e:  # noqa: BLE001
        record(dict(base, impl=label, error=_error(f"{shape} {label}", e)))
        return
      row = dict(base, impl=label, fwd_ms=f, fwdbwd_ms=fb)
      try:  # queued: comparable with the torch rows' CUDA-event times
        row["fwd_queued_ms"] = bench_common.time_jax_queued(fwd, reps=setup.reps, args_sets=[
            a[:4] for a in rotated])
        row["fwdbwd_queued_ms"] = bench_common.time_jax_queued(grad, reps=setup.reps,
                                                               args_sets=rotated)
      except Exception as e:  # noqa: BLE001
        row["queued_error"] = _error(f"{shape} {label} queued", e)
      try:  # a profiler failure costs the breakdown, never the timing
        row.update(bench_common.device_time(
            lambda: grad(q, k, v, scores, d_o), f"{shape} {label}",
            calls=FLAGS.profile_calls, profile_dir=FLAGS.profile_dir))
      except Exception as e:  # noqa: BLE001
        row["profile_error"] = _error(f"{shape} {label} profile", e)
      record(row)

    for entry in FLAGS.implementations:
      name, options = bench_common.parse_implementation(entry)
      run_jax(f"lte_jax/{entry}", lambda q, k, v, r, name=name, options=options: _with_options(
          lte_attention, name, options, q=q, k=k, v=v, scores=r, sink_size=s, window_size=w,
          budget=None), (0, 1, 2, 3))
    for entry in FLAGS.attention_implementations:
      name, options = bench_common.parse_implementation(entry)
      run_jax(f"lte_jax/swa-{entry}", lambda q, k, v, r, name=name, options=options:
              _with_options(attention, name, options, q=q, k=k, v=v, window_size=w), (0, 1, 2))
    if jax.default_backend() == "gpu":
      run_jax("jax/cudnn-causal", lambda q, k, v, r: attention(
          q, k, v, implementation="cudnn"), (0, 1, 2))
    if torch is not None:
      bench_train_torch(torch, np_args, base, record, sinks=s, window=w)
      torch.cuda.empty_cache()


def lte_stage_times(options: dict | None, q, k, v, scores, *, sinks: int, window: int,
                    reps: int) -> dict:
  """ms of each part of the Pallas LTE op alone (kernels.lte_attention.api.stage_functions):
  'prepare' (padding, documents, far-key sets and loop bounds: plain JAX), 'forward' (far-key
  compaction + kernel), 'delta', 'dq', 'dkv_band', 'dkv_far' (+ compaction) and the whole
  'backward' (+ the scatter of the far keys' gradients)."""
  from lte_jax.kernels.lte_attention import api as kernel_api, make_plan
  from lte_jax.ops.lte_attention.pallas import far_keys
  plan = make_plan(None, None, options)

  def prepare(q, k, v, scores):
    keep, last = far_keys(scores, None, sink_size=sinks, window_size=window, budget=None)
    return kernel_api.core_inputs(plan, q, k, v, keep, last, None, window,
                                  q.shape[-1] ** -0.5)

  cfg, core, sets_ = prepare(q, k, v, scores)           # eager once: the static config
  fns = {name: jax.jit(fn) for name, fn in kernel_api.stage_functions(cfg).items()}
  o, lse = fns["forward"](*core, sets_)
  d_o = jnp.ones_like(o)
  delta = fns["delta"](*core, sets_, d_o, o)
  extra = {"forward": (), "delta": (d_o, o), "dq": (d_o, lse, delta),
           "dkv_band": (d_o, lse, delta), "dkv_far": (d_o, lse, delta),
           "backward": (o, lse, d_o)}
  prepare_jit = jax.jit(lambda *a: prepare(*a)[1:])
  times = {"prepare": bench_common.time_jax(lambda: prepare_jit(q, k, v, scores), reps=reps,
                                            label="stage prepare")}
  for name, fn in fns.items():
    times[name] = bench_common.time_jax(lambda fn=fn, e=extra[name]: fn(*core, sets_, *e),
                                        reps=reps, label=f"stage {name}")
  return times


def bench_stages(setup: Setup, record: Callable[[dict], None]) -> None:
  """Where the Pallas LTE op's time goes, per 'pallas' entry of --implementations."""
  for shape in setup.shapes:
    np_args = train_inputs(*_shape(shape), sinks=setup.sinks, retained=setup.retained)
    q, k, v, scores, _ = _jax_train(np_args)
    for entry in FLAGS.implementations:
      name, options = bench_common.parse_implementation(entry)
      if name != "pallas":
        continue
      try:
        ms = lte_stage_times(options, q, k, v, scores, sinks=setup.sinks,
                             window=setup.window, reps=setup.reps)
        record(dict(shape=shape, impl=f"lte_jax/{entry}", **ms))
      except Exception as e:  # noqa: BLE001  (reported; the other entries go on)
        record(dict(shape=shape, impl=f"lte_jax/{entry}", error=_error(f"{shape} {entry}", e)))


def bench_train_torch(torch, np_args, base, record, *, sinks, window):
  f = torch.nn.functional
  tq, tk, tv = (_torch_bhtd(torch, x, grad=True) for x in np_args[:3])
  tdo = _torch_bhtd(torch, np_args[4])
  with torch.no_grad():
    picked = torch_sdpa_choice(torch, tq, tk, tv, is_causal=True)
  for label, backend in torch_sdpa_backends(torch):
    def plain():
      with torch.no_grad():
        return f.scaled_dot_product_attention(tq, tk, tv, is_causal=True)
    fwd = _sdpa(torch, backend, plain)
    fwdbwd = _sdpa(torch, backend, lambda: bench_common.torch_backward(
        f.scaled_dot_product_attention(tq, tk, tv, is_causal=True), tdo, (tq, tk, tv)))
    name = f"torch/{label}" + (f" ({picked})" if backend is None else "")
    try:
      record(dict(base, impl=name, fwd_ms=time_torch(torch, fwd),
                  fwdbwd_ms=time_torch(torch, fwdbwd)))
    except Exception as e:  # noqa: BLE001
      record(dict(base, impl=name, error=_error(f"{base['shape']} {name}", e)))
  if not FLAGS.torch_flex:
    return
  try:
    fwd, fwdbwd = torch_flex(torch, np_args, sinks=sinks, window=window)
    record(dict(base, impl="torch/flex", fwd_ms=time_torch(torch, fwd),
                fwdbwd_ms=time_torch(torch, fwdbwd)))
  except Exception as e:  # noqa: BLE001
    record(dict(base, impl="torch/flex", error=_error(f"{base['shape']} torch/flex", e)))


# ---- 2. decode ----------------------------------------------------------------------------

def dense_decode(q, k, v):
  """Full attention of q [B, 1, Hq, D] over k, v [B, ctx, Hkv, D]: fp32 logits and softmax."""
  b, _, hq, d = q.shape
  hkv = k.shape[2]
  qg = q.reshape(b, hkv, hq // hkv, d)
  logits = jnp.einsum("bhgd,bkhd->bhgk", qg, k, preferred_element_type=jnp.float32) * d ** -0.5
  p = jax.nn.softmax(logits, axis=-1)
  o = jnp.einsum("bhgk,bkhd->bhgd", p.astype(v.dtype), v, preferred_element_type=jnp.float32)
  return o.reshape(b, 1, hq, v.shape[-1]).astype(v.dtype)


def bench_decode(setup: Setup, torch, record: Callable[[dict], None]) -> None:
  batch, d, ring = setup.decode_batch, setup.decode_dim, setup.window + 1
  for heads in setup.decode_heads:
    hq, hkv = (int(x) for x in heads.split(":"))
    kv_bytes = lambda slots: 2 * batch * slots * hkv * d * 2
    row = lambda **kw: dict(batch=batch, heads=heads, head_dim=d, **kw)

    def timed(label, cache, slots, fn):
      try:
        ms = bench_common.time_jax_queued(fn, reps=setup.reps)
        record(row(impl=label, cache=cache, ms=ms, gb_per_s=kv_bytes(slots) / (ms * 1e-3) / 1e9))
      except Exception as e:  # noqa: BLE001
        record(row(impl=label, cache=cache, error=_error(f"decode {heads} {label}", e)))

    slots = ring + setup.budget
    q, k, v, fill, n = decode_inputs(batch, hq, hkv, d, ring, setup.budget)
    cache = f"LTE {ring}+{setup.budget}"
    for entry in FLAGS.decode_implementations:
      name, options = bench_common.parse_implementation(entry)
      fn = jax.jit(lambda q, k, v, fill, n, name=name, options=options: _with_options(
          lte_decode_attention, name, options, q=q, k=k, v=v, fill=fill, num_tokens=n,
          ring_size=ring))
      timed(f"lte_jax/decode-{entry}", cache, slots, lambda fn=fn: fn(q, k, v, fill, n))
    del k, v

    for ctx in (int(c) for c in setup.decode_contexts):
      kk, kv = jax.random.split(jax.random.key(ctx))
      k = jax.random.normal(kk, (batch, ctx, hkv, d), jnp.bfloat16)
      v = jax.random.normal(kv, (batch, ctx, hkv, d), jnp.bfloat16)
      einsum = jax.jit(dense_decode)
      timed("jax/einsum", f"full {ctx}", ctx, lambda: einsum(q, k, v))
      if jax.default_backend() == "gpu":
        cudnn = jax.jit(lambda q, k, v: jax.nn.dot_product_attention(q, k, v,
                                                                     implementation="cudnn"))
        timed("jax/cudnn", f"full {ctx}", ctx, lambda: cudnn(q, k, v))
      del k, v
      if torch is not None:
        bench_decode_torch(torch, batch, hq, hkv, d, ctx, row, kv_bytes, record)


def bench_decode_torch(torch, batch, hq, hkv, d, ctx, row, kv_bytes, record):
  f = torch.nn.functional
  gen = torch.Generator(device="cuda").manual_seed(ctx)
  randn = lambda *s: torch.randn(*s, device="cuda", dtype=torch.bfloat16, generator=gen)
  tq, tk, tv = randn(batch, hq, 1, d), randn(batch, hkv, ctx, d), randn(batch, hkv, ctx, d)
  kw = dict(enable_gqa=True) if hq != hkv else {}
  picked = torch_sdpa_choice(torch, tq, tk, tv, **kw)
  for label, backend in torch_sdpa_backends(torch):
    name = f"torch/{label}" + (f" ({picked})" if backend is None else "")
    try:
      fn = _sdpa(torch, backend, lambda: f.scaled_dot_product_attention(tq, tk, tv, **kw))
      ms = time_torch(torch, fn)
      record(row(impl=name, cache=f"full {ctx}", ms=ms,
                 gb_per_s=kv_bytes(ctx) / (ms * 1e-3) / 1e9))
    except Exception as e:  # noqa: BLE001
      record(row(impl=name, cache=f"full {ctx}", error=_error(f"decode {name} {ctx}", e)))
  del tq, tk, tv
  torch.cuda.empty_cache()


# ---- main ---------------------------------------------------------------------------------

def main(argv):
  del argv
  setup = Setup.from_flags()
  torch = load_torch()
  results = dict(env=bench_common.environment(), setup=dataclasses.asdict(setup),
                 flags=dict(implementations=FLAGS.implementations,
                            attention_implementations=FLAGS.attention_implementations,
                            decode_implementations=FLAGS.decode_implementations),
                 checks=[], train=[], stages=[], decode=[])
  if torch is not None:
    results["env"]["torch_cuda"] = torch.version.cuda
    results["env"]["cudnn"] = torch.backends.cudnn.version()
  write = lambda: bench_common.write_json(FLAGS.out, results)

  def recorder(section):
    def record(row):
      results[section].append(row)
      print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                     for k, v in row.items()), flush=True)
      write()
    return record

  if "check" in FLAGS.sections and setup.check_shape:
    results["checks"] = check(setup, torch)
    shown = [{**r, **{n: f"{r[n]:.1e}" for n in ("o", *TOLERANCES) if n in r}}
             for r in results["checks"]]
    bench_common.print_table(shown, ["shape", "impl", "ok", "o", "dq", "dk", "dv", "dscores"])
    write()
  if "train" in FLAGS.sections:
    bench_train(setup, torch, recorder("train"))
  if "stages" in FLAGS.sections:
    bench_stages(setup, recorder("stages"))
  if "decode" in FLAGS.sections:
    bench_decode(setup, torch, recorder("decode"))

  if results["train"]:
    print("\ntraining attention (median ms; fwdbwd_device_ms: summed kernel time per call)")
    bench_common.print_table(results["train"], ["shape", "impl", "fwd_ms", "fwdbwd_ms",
                                                "fwd_queued_ms", "fwdbwd_queued_ms",
                                                "fwdbwd_device_ms"])
  if results["stages"]:
    print("\nPallas LTE stages, each jitted alone (median ms)")
    bench_common.print_table(results["stages"], ["shape", "impl", "prepare", "forward", "delta",
                                                 "dq", "dkv_band", "dkv_far", "backward"])
  if results["decode"]:
    print("\ndecode, one query per sequence (median ms per step)")
    bench_common.print_table(results["decode"], ["heads", "cache", "impl", "ms", "gb_per_s"])
  if any(r["ok"] in (False, "error") for r in results["checks"]):
    print("WARNING: an implementation failed the correctness check (see the first table)")
  write()


if __name__ == "__main__":
  app.run(main)
