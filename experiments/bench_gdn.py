"""Benchmark the chunked gated delta rule: lte_jax implementations vs flash-linear-attention.

  python -m experiments.bench_gdn --out=/tmp/bench_gdn.json

Times forward and forward+backward (median ms) at the paper's GDN shapes in bf16, with FLA's
Triton `chunk_gated_delta_rule` measured in the same process as the anchor when importable.
"""
from __future__ import annotations

from absl import app, flags

import jax
import jax.numpy as jnp

from experiments import bench_common
from lte_jax.ops import chunk_gated_delta_rule

FLAGS = flags.FLAGS
flags.DEFINE_string("out", "bench_gdn.json", "Where to write the JSON results.")
flags.DEFINE_list("implementations", ["xla"], "lte_jax implementations to time.")
flags.DEFINE_list("shapes", ["8x4096x8x128", "4x4096x16x64", "2x8192x8x256"],
                  "BxTxHxD shapes to time.")
flags.DEFINE_integer("reps", 20, "Timed repetitions (median reported).")


def _inputs(b, t, h, d, seed=0):
  ks = jax.random.split(jax.random.key(seed), 5)
  q = jax.random.normal(ks[0], (b, t, h, d), jnp.float32)
  k = jax.random.normal(ks[1], (b, t, h, d), jnp.float32)
  q = q / jnp.linalg.norm(q, axis=-1, keepdims=True)
  k = k / jnp.linalg.norm(k, axis=-1, keepdims=True)
  v = jax.random.normal(ks[2], (b, t, h, d), jnp.float32)
  g = jax.nn.log_sigmoid(jax.random.normal(ks[3], (b, t, h)) + 3.0)
  beta = jax.nn.sigmoid(jax.random.normal(ks[4], (b, t, h)))
  cast = lambda x: x.astype(jnp.bfloat16)
  return cast(q), cast(k), cast(v), g.astype(jnp.float32), cast(beta)


def _time_ours(impl, args, reps):
  fwd = jax.jit(lambda *a: chunk_gated_delta_rule(*a, implementation=impl)[0])

  def loss(*a):
    return chunk_gated_delta_rule(*a, implementation=impl)[0].astype(jnp.float32).sum()

  fwdbwd = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3, 4)))
  return (bench_common.time_jax(lambda: fwd(*args), reps=reps),
          bench_common.time_jax(lambda: fwdbwd(*args), reps=reps))


def _time_fla(args, reps):
  try:
    import numpy as np
    import torch
    import triton
    from fla.ops.gated_delta_rule import chunk_gated_delta_rule as fla_chunk
  except ImportError as e:
    print(f"flash-linear-attention not importable ({e}); anchor skipped")
    return None, None
  tensors = [torch.from_numpy(np.asarray(x.astype(jnp.float32))).cuda() for x in args]
  q, k, v, g, beta = [x.to(torch.bfloat16) if i != 3 else x for i, x in enumerate(tensors)]
  for x in (q, k, v, g, beta):
    x.requires_grad_(True)
  fwd = lambda: fla_chunk(q, k, v, g, beta)[0]
  do = torch.randn_like(v)

  def fwdbwd():
    o = fla_chunk(q, k, v, g, beta)[0]
    o.backward(do)

  return (triton.testing.do_bench(fwd, warmup=100, rep=500, return_mode="median"),
          triton.testing.do_bench(fwdbwd, warmup=100, rep=500, return_mode="median"))


def main(argv):
  del argv
  rows = []
  for shape in FLAGS.shapes:
    b, t, h, d = (int(x) for x in shape.split("x"))
    args = _inputs(b, t, h, d)
    for impl in FLAGS.implementations:
      f, fb = _time_ours(impl, args, FLAGS.reps)
      rows.append(dict(shape=shape, impl=f"lte_jax/{impl}", fwd_ms=f, fwdbwd_ms=fb))
    f, fb = _time_fla(args, FLAGS.reps)
    if f is not None:
      rows.append(dict(shape=shape, impl="fla/triton", fwd_ms=f, fwdbwd_ms=fb))
  bench_common.print_table(rows, ["shape", "impl", "fwd_ms", "fwdbwd_ms"])
  bench_common.write_json(FLAGS.out, dict(env=bench_common.environment(), rows=rows))


if __name__ == "__main__":
  app.run(main)
