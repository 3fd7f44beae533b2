"""Benchmark the chunked gated delta rule: our 'pallas' and 'xla' paths vs flash-linear-attention.

  python -m experiments.bench_kernels --out=/tmp/bench_kernels.json
  python -m experiments.bench_kernels --implementations=xla --shapes=1x64x2x32 \\
      --check_shape=1x32x2x16 --reps=2        # a smoke run on CPU
  python -m experiments.bench_kernels \\
      --implementations='pallas,pallas:block_v=32;inverse_precision=tf32x3,xla'   # variants
  python -m experiments.bench_kernels --tune=all --shapes=4x4096x16x128 --nofla \
      --check_shape= --implementations=             # per-kernel launch sweep

Times forward and forward+backward (median ms, bf16 inputs, g in fp32) at --shapes
(default (4, 4096, 16, 128), (1, 16384, 16, 128), (4, 4096, 8, 256)), with FLA 0.6.0's
Triton `chunk_gated_delta_rule` timed in the same process as the anchor when it is
importable (skipped with a message when not). First, at one small shape, every implementation's output and gradients
are checked on the device against the recurrent fp32 reference. JAX rows are timed
twice: one synchronised call at a time (fwd_ms, fwdbwd_ms: the host's dispatch and
sync round trip included) and queued (20 calls back to back, one sync, inputs rotated
over 4 copies past the L2 cache: the regime of FLA's CUDA-event `do_bench` times, so
the *_queued_vs_fla ratios compare like with like). With --device_calls, both sides'
kernel time is also summed from profiler traces (fwd_device_ms, fwdbwd_device_ms:
JAX's profiler for ours, torch's for FLA), which no host-side delay reaches; FLA's
do_bench readings have moved by up to 75% between runs on the same card while ours
stayed within 1% (BENCHMARKS.md). The table also gives the
forward's share of the roofline of the card it ran on (queued time): minimal bytes over
its HBM bandwidth and the chunked algorithm's flops over its dense bf16 peak
(bench_common.roofline: H200 4.8 TB/s, H100 3.35 TB/s, both 989 TFLOP/s; the H200's
where the card is not listed). The JSON's notes name the card.
"""
from __future__ import annotations

import functools
import os
import time

# JAX and PyTorch share the GPU here: without this JAX takes 75% of its memory
# at start and FLA runs out.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

from absl import app, flags  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from experiments import bench_common  # noqa: E402
from lte_jax.kernels.gated_delta_rule import chunk_gated_delta_rule_pallas  # noqa: E402
from lte_jax.ops import chunk_gated_delta_rule, recurrent_gated_delta_rule  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("out", "bench_kernels.json", "Where to write the JSON results.")
flags.DEFINE_list("implementations", ["pallas", "xla"],
                  "lte_jax implementations to time; 'pallas:k=v;k=v' sets fields of the "
                  "kernels' backend.Plan (block_v, num_warps, num_stages, launch as "
                  "'kernel=w/s+kernel=w/s', inverse_precision, inverse_form, wy_operands, "
                  "decay_on, keep_states).")
flags.DEFINE_list("shapes", ["4x4096x16x128", "1x16384x16x128", "4x4096x8x256"],
                  "BxTxHxD shapes to time (Dk = Dv = D).")
flags.DEFINE_string("check_shape", "1x1024x4x128",
                    "BxTxHxD of the correctness check against the reference ('' skips it).")
flags.DEFINE_bool("fla", True, "Time flash-linear-attention's kernel as the anchor.")
flags.DEFINE_integer("reps", 50, "Timed repetitions (median reported).")
flags.DEFINE_integer("device_calls", 10, "Calls traced per row to sum the kernels' device "
                     "time (fwd_device_ms, fwdbwd_device_ms; GPU only). 0: off.")
flags.DEFINE_string("profile_dir", "/tmp/bench_kernels_profile",
                    "Where the --device_calls traces go.")
flags.DEFINE_bool("stages", False, "Also time each Pallas stage on its own (inverse, states = "
                  "WY prepare + recurrence, output, backward, and the backward's dv_local, "
                  "state_grads, qk_grads, wy_grads) for every 'pallas' entry.")

flags.DEFINE_list("tune", [], "Kernels to sweep (names in backend.KERNELS, or 'all'): each "
                  "launch in --tune_launch is timed on the stage that runs the kernel, at the "
                  "first shape; prints the best launch per kernel as a Plan.launch string.")
flags.DEFINE_list("tune_launch", ["1/1", "2/1", "2/2", "4/1", "4/2", "4/3", "8/1", "8/2", "8/3"],
                  "num_warps/num_stages pairs of the --tune sweep.")
flags.DEFINE_integer("tune_seconds", 400, "Time budget of the --tune sweep (it stops early, "
                     "keeping what it measured).")

CHUNK = 64
# Relative-RMS bounds for bf16 inputs, as tests/test_gated_delta_rule.py:
# output and state, dq/dk/dv/dh0, dg/dbeta.
TOLERANCES = (5e-3, 8e-3, 2e-2)


def _parse(shape: str) -> tuple[int, int, int, int]:
  b, t, h, d = (int(x) for x in shape.split("x"))
  return b, t, h, d


def _inputs(b, t, h, d, seed=0):
  """bf16 q, k (unit rows), v, beta; fp32 log decay g, as the GDN layer makes them."""
  rng = np.random.default_rng(seed)
  unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)
  normal = lambda *s: rng.standard_normal(s, dtype=np.float32)
  bf16 = lambda x: jnp.asarray(x, jnp.bfloat16)
  g = -np.logaddexp(0.0, -(normal(b, t, h) + 3.0)).astype(np.float32)      # log_sigmoid
  beta = 1.0 / (1.0 + np.exp(-normal(b, t, h)))
  return (bf16(unit(normal(b, t, h, d))), bf16(unit(normal(b, t, h, d))),
          bf16(normal(b, t, h, d)), jnp.asarray(g), bf16(beta))


def forward_cost(b, t, h, d) -> tuple[float, float]:
  """(minimal bytes, flops) of one bf16 forward.

  Bytes: q, k, v read and o written once in bf16, g in fp32 and beta in bf16.
  Flops, per chunk of C tokens (the chunked algorithm, triangular products
  counted in full, the triangular inverse as C^3 / 3): K K^T and Q K^T 2 C^2 D
  each; W, U and the intra-chunk P V 2 C^2 D each; W h, Q h and the state
  update K^T V_new 2 C D^2 each.
  """
  tokens = b * t * h
  bytes_moved = tokens * (4 * d * 2 + 4 + 2)
  chunks = tokens / CHUNK
  flops = chunks * (5 * 2 * CHUNK**2 * d + 3 * 2 * CHUNK * d * d + CHUNK**3 / 3)
  return bytes_moved, flops


def _plan_options(impl: str) -> dict:
  """'pallas:block_v=32;num_warps=8' -> {'block_v': 32, 'num_warps': 8}."""
  return bench_common.parse_implementation(impl)[1] or {}


@functools.cache  # one pair of jitted functions per implementation: the check's are reused
def _lte_jax_fns(impl):
  def fwd(q, k, v, g, beta):
    if impl.startswith("pallas:"):
      return chunk_gated_delta_rule_pallas(q, k, v, g, beta, scale=q.shape[-1] ** -0.5,
                                           **_plan_options(impl))[0]
    return chunk_gated_delta_rule(q, k, v, g, beta, implementation=impl)[0]

  def loss(q, k, v, g, beta, d_o):
    return jnp.sum(fwd(q, k, v, g, beta).astype(jnp.float32) * d_o)

  return jax.jit(fwd), jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3, 4)))


def check(shape: str) -> list[dict]:
  """Each implementation vs the recurrent reference on this device: o and all gradients."""
  args = _inputs(*_parse(shape), seed=1)
  d_o = jnp.asarray(np.random.default_rng(2).standard_normal(args[2].shape), jnp.float32)

  def ref_loss(q, k, v, g, beta):
    o, _ = recurrent_gated_delta_rule(q, k, v, g, beta)
    return jnp.sum(o.astype(jnp.float32) * d_o), o

  (_, o_ref), grads_ref = jax.jit(jax.value_and_grad(ref_loss, argnums=(0, 1, 2, 3, 4),
                                                     has_aux=True))(*args)
  rows = []
  for impl in FLAGS.implementations:
    fwd, fwdbwd = _lte_jax_fns(impl)
    try:
      start = time.perf_counter()
      _, grads = jax.block_until_ready(fwdbwd(*args, d_o))
      print(f"check {impl}: fwd+bwd compiled and ran in {time.perf_counter() - start:.1f} s",
            flush=True)
    except Exception as e:  # noqa: BLE001  (reported, and the other implementations go on)
      print(f"lte_jax/{impl} failed at {shape}: {type(e).__name__}: {str(e)[:2000]}", flush=True)
      rows.append(dict(shape=shape, impl=f"lte_jax/{impl}", ok=False, worst="error",
                       error=f"{type(e).__name__}: {str(e)[:500]}"))
      continue
    errors = {"o": bench_common.rel_error(fwd(*args), o_ref)}
    errors.update({f"d{n}": bench_common.rel_error(a, b)
                   for n, a, b in zip("qkvg", grads, grads_ref)})
    errors["dbeta"] = bench_common.rel_error(grads[4], grads_ref[4])
    bound = lambda n: {"o": TOLERANCES[0], "dg": TOLERANCES[2], "dbeta": TOLERANCES[2]}.get(
        n, TOLERANCES[1])
    ok = all(np.isfinite(e) and e <= bound(n) for n, e in errors.items())
    rows.append(dict(shape=shape, impl=f"lte_jax/{impl}", ok=ok,
                     worst=max(errors, key=lambda n: errors[n] / bound(n)), **errors))
  return rows


def _device_ms(measure, label):
  """measure() -> ms, or None with a message if the profiler fails: JAX's and torch's
  profilers share CUPTI in this process, and a lost device-time column must not cost the
  row's other timings."""
  try:
    return measure()
  except Exception as e:  # noqa: BLE001
    print(f"{label}: device time not measured ({type(e).__name__}: {str(e)[:300]})", flush=True)
    return None


def _time_lte_jax(impl, args):
  """-> (fwd, fwd+bwd) ms per call synchronised, then (fwd, fwd+bwd) queued
  (bench_common.time_jax_queued over 4 copies of the inputs, 2 x 67 MB and more at these
  shapes, past the 50 MB L2: the regime of FLA's do_bench times), then (fwd, fwd+bwd)
  summed device time per call (None off a GPU or with --device_calls=0)."""
  fwd, fwdbwd = _lte_jax_fns(impl)
  d_o = jnp.ones(args[2].shape, jnp.float32)
  label = f"{'x'.join(map(str, args[0].shape))} lte_jax/{impl}"
  sets = [tuple(args) + (d_o,)] + [tuple(x + 0 for x in (*args, d_o)) for _ in range(3)]
  timed = (bench_common.time_jax(lambda: fwd(*args), reps=FLAGS.reps, label=f"{label} fwd"),
           bench_common.time_jax(lambda: fwdbwd(*args, d_o), reps=FLAGS.reps,
                                 label=f"{label} fwd+bwd"),
           bench_common.time_jax_queued(fwd, reps=FLAGS.reps, args_sets=[a[:-1] for a in sets]),
           bench_common.time_jax_queued(fwdbwd, reps=FLAGS.reps, args_sets=sets))
  # Traced after the timings: compiled and warm, so no compile-time autotuning is summed.
  # top=14 lists every kernel of a GDN fwd+bwd, where the time goes beside FLA's list.
  device = tuple(_device_ms(lambda fn=fn, part=part: bench_common.device_time(
      fn, f"{label} {part}", calls=FLAGS.device_calls, profile_dir=FLAGS.profile_dir,
      key="ms", top=14).get("ms"), f"{label} {part}")
                 for part, fn in (("fwd", lambda: fwd(*args)),
                                  ("fwdbwd", lambda: fwdbwd(*args, d_o))))
  return timed + device


# The stage (kernel_api.stage_functions) that runs each kernel, for the --tune sweep.
STAGE_OF_KERNEL = {"gdn_wy_inverse": "inverse", "gdn_wy_transform": "states",
                   "gdn_chunk_states": "states", "gdn_chunk_outputs": "output",
                   "gdn_local_value_grads": "dv_local", "gdn_chunk_state_grads": "state_grads",
                   "gdn_chunk_qk_grads": "qk_grads", "gdn_wy_grads": "wy_grads"}


def _time_stages(options: dict, args, only=None) -> dict:
  """ms per Pallas stage (`only`: a subset), each jitted alone on the chunk-layout inputs
  (where the time goes): the forward's three, the whole backward, and the backward's
  four kernels (it also recomputes 'states' unless keep_states). `options`: Plan fields.
  Only the stages a timed one needs inputs from run (the --tune sweep times one stage)."""
  from lte_jax.kernels.gated_delta_rule import api as kernel_api
  q = args[0]
  cfg, core = kernel_api.core_inputs(*args, scale=q.shape[-1] ** -0.5, **options)
  fns = {name: jax.jit(fn) for name, fn in kernel_api.stage_functions(cfg).items()}
  d_o = jnp.ones_like(core[2])            # o has v's (padded) layout and dtype
  dh_last = jnp.zeros_like(core[9])       # like h0 [BH, Dk, Dv] fp32
  memo = {}

  def get(name):  # a stage's outputs, computed once and only when a timed stage needs them
    if name not in memo:
      memo[name] = fns[name](*core, *extra_args(name))
    return memo[name]

  def extra_args(name):  # what stage `name` takes after the core arguments
    if name == "inverse":
      return ()
    if name == "dv_local":
      return (d_o,)
    t = get("inverse")
    if name == "states":
      return (t,)
    w, h, v_new, _ = get("states")
    if name == "output":
      return (h, v_new)
    if name == "backward":    # with keep_states, the forward's W, h, V_new as residuals
      return (t, d_o, dh_last, *((w, h, v_new) if cfg.plan.keep_states else ()))
    if name == "state_grads":
      return (w, d_o, get("dv_local"), dh_last, t)
    dh, dv_new, _ = get("state_grads")
    if name == "qk_grads":
      return (h, dh, v_new, dv_new, d_o)
    _, dk_part, dw, *_ = get("qk_grads")
    return (t, dv_new, dw, dk_part)                     # wy_grads

  times = {}
  for name, fn in fns.items():
    if only is None or name in only:
      extra = extra_args(name)
      times[name] = bench_common.time_jax(lambda fn=fn, extra=extra: fn(*core, *extra),
                                          reps=FLAGS.reps, label=f"stage {name}")
  return times


def tune(args, table: dict, kernels, launches, budget_s: float, on_row) -> list[dict]:
  """Sweep each kernel's (num_warps, num_stages) over `launches` ('w/s' strings), timing
  the stage that runs it while every other kernel keeps its entry in `table` (a launch
  table, name -> (warps, stages)). Stops when `budget_s` is spent; `on_row(rows)` after
  every measurement."""
  start, rows = time.perf_counter(), []
  for kernel in kernels:
    stage = STAGE_OF_KERNEL[kernel]
    for launch in launches:
      if time.perf_counter() - start > budget_s:
        print(f"tune: budget of {budget_s:.0f} s spent; stopping", flush=True)
        return rows
      warps, stages = (int(x) for x in launch.split("/"))
      options = {"launch": {**table, kernel: (warps, stages)}}
      try:
        ms = _time_stages(options, args, only=(stage,))[stage]
      except Exception as e:  # noqa: BLE001  (a launch Triton cannot build is a result)
        print(f"tune {kernel} {launch}: {type(e).__name__}: {str(e)[:300]}", flush=True)
        continue
      rows.append(dict(kernel=kernel, launch=launch, stage=stage, stage_ms=ms))
      print(f"tune {kernel} {launch}: {stage} {ms:.3f} ms", flush=True)
      on_row(rows)
  return rows


def best_launch(rows: list[dict], table: dict | None = None) -> str:
  """The whole launch table with each swept kernel at its fastest launch, as a Plan.launch
  string (`table`: the entries in force for the kernels not swept)."""
  best, entries = {}, {k: f"{w}/{s}" for k, (w, s) in (table or {}).items()}
  for r in rows:
    if r["kernel"] not in best or r["stage_ms"] < best[r["kernel"]]["stage_ms"]:
      best[r["kernel"]] = r
  entries.update({k: r["launch"] for k, r in best.items()})
  return "+".join(f"{k}={v}" for k, v in sorted(entries.items()))


def _load_fla():
  try:
    import torch
    import triton
    import fla.ops.common.chunk_o as chunk_o
    from fla.ops.gated_delta_rule import chunk_gated_delta_rule as fla_chunk
  except ImportError as e:
    print(f"flash-linear-attention not importable ({e}); anchor skipped")
    return None
  if not torch.cuda.is_available():
    print("flash-linear-attention needs a CUDA GPU; anchor skipped")
    return None
  # FLA 0.6.0 refuses its backward on Hopper with triton < 3.7.1 (a correctness
  # guard); lifted here only to time it, as stated beside the table.
  chunk_o.TRITON_ABOVE_3_7_1 = True
  return torch, triton, fla_chunk


def _time_fla(fla, args):
  """-> ((fwd, fwd+bwd) do_bench ms, device()): device() sums the kernels' device time with
  torch's profiler, to be called after every JAX trace of the run (see main)."""
  torch, triton, fla_chunk = fla
  to_torch = lambda x: torch.from_numpy(np.asarray(x, np.float32)).cuda()
  q, k, v, g, beta = (to_torch(x) for x in args)
  q, k, v, beta = (x.to(torch.bfloat16) for x in (q, k, v, beta))
  for x in (q, k, v, g, beta):
    x.requires_grad_(True)
  d_o = torch.ones_like(v)

  def fwdbwd():
    bench_common.torch_backward(fla_chunk(q, k, v, g, beta)[0], d_o, (q, k, v, g, beta))

  bench = lambda fn: triton.testing.do_bench(fn, warmup=100, rep=500, return_mode="median")
  fwd = lambda: fla_chunk(q, k, v, g, beta)
  label = "x".join(map(str, args[0].shape))
  timed = (bench(fwd), bench(fwdbwd))

  def device():
    return tuple(_device_ms(lambda fn=fn, part=part: bench_common.torch_device_ms(
        fn, FLAGS.device_calls, os.path.join(FLAGS.profile_dir, f"fla_{label}_{part}.json")),
        f"fla {label} {part}") for part, fn in (("fwd", fwd), ("fwdbwd", fwdbwd)))
  return timed, device


def _rows(shape: str, timed: list[tuple]) -> list[dict]:
  """One shape's table rows from its (impl, fwd, fwd+bwd, queued fwd, queued fwd+bwd,
  device fwd, device fwd+bwd) tuples; ratios against the 'fla/triton' tuple when there."""
  bytes_moved, flops = forward_cost(*_parse(shape))
  _, bytes_per_s, flops_per_s = bench_common.roofline()
  anchor = {t[0]: t[1:] for t in timed}.get("fla/triton")
  ratio = lambda i, ms: anchor[i] / ms if anchor and anchor[i] and ms else None
  return [dict(shape=shape, impl=name, fwd_ms=f, fwdbwd_ms=fb, fwd_queued_ms=fq,
               fwdbwd_queued_ms=fbq, fwd_device_ms=fd, fwdbwd_device_ms=fbd,
               fwd_vs_fla=ratio(0, f), fwdbwd_vs_fla=ratio(1, fb),
               fwd_queued_vs_fla=ratio(0, fq), fwdbwd_queued_vs_fla=ratio(1, fbq),
               fwd_device_vs_fla=ratio(4, fd), fwdbwd_device_vs_fla=ratio(5, fbd),
               fwd_bw_frac=bytes_moved / (fq * 1e-3) / bytes_per_s,
               fwd_flop_frac=flops / (fq * 1e-3) / flops_per_s)
          for name, f, fb, fq, fbq, fd, fbd in timed]


def main(argv):
  del argv
  env = bench_common.environment()
  checks = check(FLAGS.check_shape) if FLAGS.check_shape else []
  if checks:
    errors = ["o", "dq", "dk", "dv", "dg", "dbeta"]
    shown = [{**r, **{n: f"{r[n]:.1e}" for n in errors if n in r}} for r in checks]
    bench_common.print_table(shown, ["shape", "impl", "ok", "worst"] + errors)
  fla = _load_fla() if FLAGS.fla else None
  rows, stages, tuned = [], [], []
  if FLAGS.tune:
    kernels = list(STAGE_OF_KERNEL) if FLAGS.tune == ["all"] else FLAGS.tune
    unknown = sorted(set(kernels) - set(STAGE_OF_KERNEL))
    if unknown:
      raise app.UsageError(f"--tune: unknown kernels {unknown}; allowed: all, "
                           f"{', '.join(STAGE_OF_KERNEL)}")
    # Swept on top of the launch table now in force, so one kernel moves at a time.
    tuned = tune(_inputs(*_parse(FLAGS.shapes[0])), _gpu_launch(), kernels, FLAGS.tune_launch,
                 FLAGS.tune_seconds, lambda r: _write(env, checks, rows, fla, stages, r))
    if tuned:
      bench_common.print_table(tuned, ["kernel", "launch", "stage", "stage_ms"])
      print(f"best launch at {FLAGS.shapes[0]}: {best_launch(tuned, _gpu_launch())}",
            flush=True)
  timed_shapes = FLAGS.shapes if FLAGS.implementations or fla is not None else []
  timed_by_shape, fla_device = {}, {}
  for shape in timed_shapes:
    args = _inputs(*_parse(shape))
    timed = timed_by_shape.setdefault(shape, [])
    for impl in FLAGS.implementations:
      try:
        timed.append((f"lte_jax/{impl}",) + _time_lte_jax(impl, args))
        print(f"{shape} lte_jax/{impl}: fwd {timed[-1][1]:.3f} ms, fwd+bwd {timed[-1][2]:.3f} ms"
              f" (queued {timed[-1][3]:.3f} / {timed[-1][4]:.3f})", flush=True)
        if FLAGS.stages and impl.startswith("pallas"):
          stage_ms = _time_stages(_plan_options(impl), args)
          stages.append(dict(shape=shape, impl=impl, **stage_ms))
          print(f"{shape} lte_jax/{impl} stages (ms): "
                + ", ".join(f"{n} {v:.3f}" for n, v in stage_ms.items()), flush=True)
      except Exception as e:  # noqa: BLE001
        print(f"lte_jax/{impl} failed at {shape}: {type(e).__name__}: {str(e)[:2000]}", flush=True)
    if fla is not None:
      # do_bench times with CUDA events: its numbers are both columns' counterparts.
      (f, fb), fla_device[shape] = _time_fla(fla, args)
      timed.append(("fla/triton", f, fb, f, fb, None, None))
      print(f"{shape} fla/triton: fwd {f:.3f} ms, fwd+bwd {fb:.3f} ms", flush=True)
    rows = [r for s, t in timed_by_shape.items() for r in _rows(s, t)]
    for r in _rows(shape, timed):
      print(" ".join(f"{k}={v}" for k, v in r.items()), flush=True)
    _write(env, checks, rows, fla, stages, tuned)
  # torch's profiler, once used, leaves JAX's unable to subscribe to CUPTI in this process
  # (every later JAX trace came back empty on the H200): FLA's device times come last.
  for shape, device in fla_device.items():
    fd, fbd = device()
    timed = timed_by_shape[shape]
    timed[-1] = timed[-1][:5] + (fd, fbd)
    print(f"{shape} fla/triton: device {fd} / {fbd} ms", flush=True)
  rows = [r for s, t in timed_by_shape.items() for r in _rows(s, t)]
  if rows:
    bench_common.print_table(rows, ["shape", "impl", "fwd_ms", "fwdbwd_ms", "fwd_queued_ms",
                                    "fwdbwd_queued_ms", "fwd_queued_vs_fla",
                                    "fwdbwd_queued_vs_fla", "fwd_device_ms", "fwdbwd_device_ms",
                                    "fwd_device_vs_fla", "fwdbwd_device_vs_fla", "fwd_bw_frac",
                                    "fwd_flop_frac"])
  if fla is not None:
    print("fla: fla.ops.common.chunk_o.TRITON_ABOVE_3_7_1 forced True to time its backward")
  if any(not r["ok"] for r in checks):
    print("WARNING: an implementation failed the correctness check (see the first table)")
  _write(env, checks, rows, fla, stages, tuned)


def _gpu_launch() -> dict:
  from lte_jax.kernels.gated_delta_rule import backend as gdn_backend
  return gdn_backend.GPU_LAUNCH


def _write(env, checks, rows, fla, stages, tuned=()):
  """Written after every shape too, so a run cut short keeps what it measured."""
  bench_common.write_json(FLAGS.out, dict(
      env=env, checks=checks, rows=rows, stages=stages, tune=list(tuned),
      best_launch=best_launch(tuned, _gpu_launch()) if tuned else None,
      notes=dict(fla_triton_guard_lifted=fla is not None, roofline=dict(
          zip(("card", "bytes_per_s", "flops_per_s"), bench_common.roofline())))))


if __name__ == "__main__":
  app.run(main)
