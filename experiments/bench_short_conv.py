"""Benchmark the q/k/v short conv + SiLU: our 'pallas' and 'xla' paths vs FLA's Triton one.

  python -m experiments.bench_short_conv --out=/tmp/bench_short_conv.json
  python -m experiments.bench_short_conv --shapes=1x64x32 --check_shape=1x40x16 --reps=2 \\
      --nofla                                   # a smoke run on CPU

First checks, at one small shape with documents, the output and both gradients of
every implementation on the device against the plain-JAX reference (fp32 and bf16 x).
Then times forward and forward+backward (median ms, bf16 x, fp32 weights) with and
without segment ids, and flash-linear-attention 0.6.0's `ShortConvolution` (Triton
backend, no documents) in the same process as the anchor. The table gives each time's
floor: the bytes one pass must move (x read and y written; the backward reads x and
dy and writes dx) over the card's HBM bandwidth (bench_common.roofline), and on a GPU the
summed device time of the fwd+bwd kernels per call from a profiler trace
(`--profile_calls`).
"""
from __future__ import annotations

import os

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

from absl import app, flags  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from experiments import bench_common  # noqa: E402
from lte_jax.ops.short_conv import short_conv, short_conv_reference  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("out", "bench_short_conv.json", "Where to write the JSON results.")
flags.DEFINE_list("implementations", ["pallas", "xla"],
                  "lte_jax implementations; 'pallas:k=v;k=v' sets kernels.short_conv.Plan "
                  "fields (block_t, block_c, num_warps, num_stages).")
flags.DEFINE_list("shapes", ["8x4096x1024"], "BxTxC shapes to time (0.4B GDN: 8x4096x1024).")
flags.DEFINE_string("check_shape", "2x1000x256", "BxTxC of the correctness check ('' skips).")
flags.DEFINE_integer("kernel_size", 4, "Taps K.")
flags.DEFINE_bool("fla", True, "Time FLA's ShortConvolution (Triton) as the anchor.")
flags.DEFINE_integer("reps", 50, "Timed repetitions (median reported).")
flags.DEFINE_integer("profile_calls", 10,
                     "On a GPU, also trace this many fwd+bwd calls and report the summed kernel "
                     "time per call (device_ms: no dispatch or launch gaps, which dominate the "
                     "wall time of a ~0.1 ms op) and its kernels; 0: off.")
flags.DEFINE_string("profile_dir", "/tmp/bench_short_conv_profile", "Where the traces go.")


def _inputs(b, t, c, dtype, seed):
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.standard_normal((b, t, c)), dtype)
  w = jnp.asarray(0.5 * rng.standard_normal((FLAGS.kernel_size, c)), jnp.float32)
  seg = jnp.asarray(np.cumsum(rng.random((b, t)) < 2e-3, axis=1), jnp.int32)
  dy = jnp.asarray(rng.standard_normal((b, t, c)), dtype)
  return x, w, seg, dy


def _fns(impl):
  name, options = bench_common.parse_implementation(impl)
  op = lambda x, w, s: short_conv(x, w, s, implementation=name, plan_options=options)
  loss = lambda x, w, s, dy: jnp.sum(op(x, w, s).astype(jnp.float32) * dy.astype(jnp.float32))
  return jax.jit(op), jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))


def check(shape: str) -> list[dict]:
  b, t, c = (int(v) for v in shape.split("x"))
  rows = []
  for dtype in (jnp.float32, jnp.bfloat16):
    x, w, seg, dy = _inputs(b, t, c, dtype, seed=len(rows) + 1)
    ref = jax.jit(jax.value_and_grad(
        lambda x, w: jnp.sum(short_conv_reference(x.astype(jnp.float32), w, seg) * dy),
        argnums=(0, 1)))
    y_ref = short_conv_reference(x.astype(jnp.float32), w, seg)
    _, (dx_ref, dw_ref) = ref(x, w)
    for impl in FLAGS.implementations:
      fwd, grad = _fns(impl)
      _, (dx, dw) = grad(x, w, seg, dy)
      errs = {k: bench_common.rel_error(a, r)
              for k, a, r in (("y", fwd(x, w, seg), y_ref), ("dx", dx, dx_ref), ("dw", dw, dw_ref))}
      bound = 1e-5 if dtype == jnp.float32 else 8e-3
      rows.append(dict(shape=shape, impl=impl, dtype=jnp.dtype(dtype).name,
                       ok=all(np.isfinite(e) and e < bound for e in errs.values()), **errs))
  return rows


def _time_fla(b, t, c):
  try:
    import torch
    import triton
    from fla.modules import ShortConvolution
  except ImportError as e:
    print(f"flash-linear-attention not importable ({e}); anchor skipped")
    return None
  conv = ShortConvolution(c, FLAGS.kernel_size, activation="silu", backend="triton",
                          device="cuda", dtype=torch.bfloat16)
  x = torch.randn(b, t, c, device="cuda", dtype=torch.bfloat16, requires_grad=True)
  dy = torch.randn_like(x)
  bench = lambda fn: triton.testing.do_bench(fn, warmup=100, rep=500, return_mode="median")
  return bench(lambda: conv(x)[0]), bench(lambda: bench_common.torch_backward(
      conv(x)[0], dy, (x, *conv.parameters())))


def main(argv):
  del argv
  env = bench_common.environment()
  checks = check(FLAGS.check_shape) if FLAGS.check_shape else []
  if checks:
    bench_common.print_table(checks, ["shape", "impl", "dtype", "ok", "y", "dx", "dw"])
  rows = []
  for shape in FLAGS.shapes:
    b, t, c = (int(v) for v in shape.split("x"))
    x, w, seg, dy = _inputs(b, t, c, jnp.bfloat16, seed=0)
    floor_ms = b * t * c * 2 / bench_common.roofline()[1] * 1e3    # one bf16 pass
    for impl in FLAGS.implementations:
      fwd, grad = _fns(impl)
      for segments in (False, True):
        s = seg if segments else None
        label = f"{shape} {impl}{' segments' if segments else ''}"
        f_ms = bench_common.time_jax(lambda: fwd(x, w, s), reps=FLAGS.reps, label=label)
        fb_ms = bench_common.time_jax(lambda: grad(x, w, s, dy), reps=FLAGS.reps)
        rows.append(dict(shape=shape, impl=f"lte_jax/{impl}", segments=segments, fwd_ms=f_ms,
                         fwdbwd_ms=fb_ms, fwd_floor_ms=2 * floor_ms, fwdbwd_floor_ms=5 * floor_ms,
                         **bench_common.device_time(
                             lambda: grad(x, w, s, dy), label, calls=FLAGS.profile_calls,
                             profile_dir=FLAGS.profile_dir)))
        bench_common.write_json(FLAGS.out, dict(environment=env, checks=checks, results=rows))
    fla = _time_fla(b, t, c) if FLAGS.fla else None
    if fla:
      rows.append(dict(shape=shape, impl="fla/triton ShortConvolution", segments=False,
                       fwd_ms=fla[0], fwdbwd_ms=fla[1], fwd_floor_ms=2 * floor_ms,
                       fwdbwd_floor_ms=5 * floor_ms))
  bench_common.write_json(FLAGS.out, dict(environment=env, checks=checks, results=rows))
  bench_common.print_table(rows, ["shape", "impl", "segments", "fwd_ms", "fwdbwd_ms",
                                  "fwdbwd_device_ms", "fwd_floor_ms", "fwdbwd_floor_ms"])
  if checks and not all(r["ok"] for r in checks):
    raise SystemExit("correctness check failed")


if __name__ == "__main__":
  app.run(main)
