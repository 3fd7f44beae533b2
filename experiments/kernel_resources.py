"""Registers, spills and shared memory of the Pallas GPU kernels on sm_90, without a GPU.

  python3 -m pip install -e '.[ptx]'           # the Triton wheel: its compiler and ptxas
  python3 -m experiments.kernel_resources --shapes=4x4096x8x256 \\
      --implementations='pallas,pallas:decay_on=values;recurrence_block_v=32'
  python3 -m experiments.kernel_resources --op=lte --shapes=8x4096x16x64 \\
      --implementations='pallas,pallas:far_gather=kernel'
  python3 -m experiments.kernel_resources --op=nsa --shapes=8x4096x32x64 --kv_heads=2
  python3 -m experiments.kernel_resources --nocompile    # launch parameters only (no Triton)

Why: a kernel that spills registers to local memory (stack > 0 below) or stages more
than the 227 KB of an H100/H200 SM's shared memory is slow or does not compile, and a
machine without a GPU can tell so before anything is timed. The spread
of regs/stack across launch parameters says which variants are worth timing.

How: forward and backward of `chunk_gated_delta_rule_pallas` (--op=gdn), of LTE
attention with far keys (--op=lte: `attention_with_far_keys`) or of NSA's selected-block
attention (--op=nsa: `selected_attention`) are lowered for 'cuda' on
the host (as tests/test_lowering.py does); a hook on JAX's Pallas Triton lowering keeps
each kernel's Triton IR (TTIR) with the num_warps / num_stages it was given; the Triton
wheel compiles the TTIR for sm_90 and cuobjdump (shipped in the wheel) reads REG, STACK
and the shared bytes. The hook uses JAX internals (jax._src.pallas; checked with jax
0.10.2): when they move, this script says so and stops. A CUDA jaxlib carries
its own Triton build, so the numbers approximate what it compiles; the timing still
decides (experiments/bench_kernels.py).
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import tempfile

from absl import app, flags

import jax
import jax.numpy as jnp

from experiments import bench_common
from lte_jax.kernels.gated_delta_rule import chunk_gated_delta_rule_pallas
from lte_jax.kernels.lte_attention.api import attention_with_far_keys
from lte_jax.kernels.nsa_attention import selected_attention

FLAGS = flags.FLAGS
flags.DEFINE_enum("op", "gdn", ["gdn", "lte", "nsa"], "Whose kernels: the chunked gated "
                  "delta rule, LTE attention (band + far keys) or NSA's selected blocks.")
flags.DEFINE_list("shapes", ["4x4096x8x256"], "BxTxHxD shapes (Dk = Dv = D; for lte, H query "
                  "and KV heads).")
flags.DEFINE_integer("window", 768, "lte: the sliding window.")
flags.DEFINE_integer("kv_heads", 2, "nsa: KV heads (H of --shapes counts query heads).")
flags.DEFINE_integer("block_size", 64, "nsa: tokens per selected block.")
flags.DEFINE_integer("block_count", 16, "nsa: blocks selected per query.")
flags.DEFINE_list("implementations", ["pallas"],
                  "'pallas' or 'pallas:k=v;k=v' (fields of the op's backend.Plan, as "
                  "experiments/bench_kernels.py and bench_lte.py take them).")
flags.DEFINE_string("kernels", "", "Regular expression: only kernels whose name matches.")
flags.DEFINE_bool("compile", True, "Compile with the Triton wheel and report resources "
                  "(--nocompile: names and launch parameters only).")
flags.DEFINE_integer("capability", 90, "CUDA compute capability to compile for.")
flags.DEFINE_string("out", "", "JSON file for the rows ('' : none).")


@contextlib.contextmanager
def captured_kernels():
  """Within: every pallas_call lowered through the Triton lowering appends
  {'name', 'num_warps', 'num_stages', 'ttir'} to the yielded list."""
  try:
    from jax._src.pallas import core as pallas_core
    from jax._src.pallas.triton import core as triton_core
    from jax._src.pallas.triton import pallas_call_registration as registration
    rules = pallas_core._backend_lowering_rules          # noqa: SLF001 (see the docstring)
    rule, platform = rules[triton_core.CompilerParams]
    lower_module = registration.lowering.lower_jaxpr_to_triton_module
  except (ImportError, AttributeError, KeyError) as e:
    raise RuntimeError(f"jax {jax.__version__}: the Pallas Triton lowering's internals this "
                       f"script hooks have moved ({e!r}); update captured_kernels") from e
  kernels, modules = [], []

  def keep_module(*args, **kwargs):
    result = lower_module(*args, **kwargs)
    modules.append(result.module)
    return result

  def lowering_rule(ctx, *in_nodes, **params):
    before = len(modules)
    out = rule(ctx, *in_nodes, **params)
    compiler = params["compiler_params"]
    # The lowering's own defaults when a kernel passes none (4 warps, 3 stages on CUDA).
    kernels.append(dict(
        name=params["jaxpr"].debug_info.func_name,
        num_warps=getattr(compiler, "num_warps", None) or 4,
        num_stages=getattr(compiler, "num_stages", None) or 3,
        ttir=modules[before].operation.get_asm(enable_debug_info=False)))
    return out

  rules[triton_core.CompilerParams] = (lowering_rule, platform)
  registration.lowering.lower_jaxpr_to_triton_module = keep_module
  try:
    yield kernels
  finally:
    rules[triton_core.CompilerParams] = (rule, platform)
    registration.lowering.lower_jaxpr_to_triton_module = lower_module


def op_kernels(op: str, shape: tuple[int, int, int, int], options: dict,
               window: int = 768, nsa: tuple[int, int, int] = (2, 64, 16)) -> list[dict]:
  """The distinct kernels of one forward+backward of `op` at `shape` (bf16, as the layers
  call them), by name."""
  b, t, h, d = shape
  token = jax.ShapeDtypeStruct((b, t, h, d), jnp.bfloat16)
  if op == "gdn":
    def loss(q, k, v, g, beta):
      o, _ = chunk_gated_delta_rule_pallas(q, k, v, g, beta, scale=d ** -0.5,
                                           platform="gpu", interpret=False, **options)
      return o.astype(jnp.float32).sum()

    scalar = jax.ShapeDtypeStruct((b, t, h), jnp.float32)
    args = (token, token, token, scalar, scalar)
  elif op == "nsa":
    kv_heads, block_size, block_count = nsa

    def loss(q, k, v, selected):
      o = selected_attention(q, k, v, selected, block_size=block_size,
                             block_count=block_count, segment_ids=None, scale=d ** -0.5,
                             platform="gpu", interpret=False, plan_options=options)
      return o.astype(jnp.float32).sum()

    kv = jax.ShapeDtypeStruct((b, t, kv_heads, d), jnp.bfloat16)
    blocks = -(-t // block_size)
    args = (token, kv, kv, jax.ShapeDtypeStruct((b, t, kv_heads, blocks), jnp.bool_))
  else:
    def loss(q, k, v, keep):
      o = attention_with_far_keys(q, k, v, keep=keep, last=None, window_size=window,
                                  segment_ids=None, scale=d ** -0.5, platform="gpu",
                                  interpret=False, plan_options=options)
      return o.astype(jnp.float32).sum()

    args = (token, token, token, jax.ShapeDtypeStruct((b, t, h), jnp.bool_))
  with captured_kernels() as kernels:
    jax.jit(jax.grad(loss, argnums=(0, 1, 2))).trace(*args).lower(
        lowering_platforms=("cuda",))
  # A backward may recompute forward kernels: the same kernel, lowered twice.
  unique = {(k["name"], k["ttir"]): k for k in kernels}
  return sorted(unique.values(), key=lambda k: k["name"])


def _triton():
  """The Triton wheel's module, or a usage error saying how to get it."""
  try:
    import triton
  except ImportError as e:
    raise app.UsageError("compiling needs the Triton wheel: python3 -m pip install -e "
                         "'.[ptx]' (or pass --nocompile)") from e
  return triton


def resources(kernel: dict, capability: int) -> dict:
  """Compile one captured kernel with the Triton wheel -> {'regs', 'stack', 'shared'}
  (registers per thread, local stack bytes per thread: spills, shared memory bytes)."""
  triton = _triton()
  from triton.backends.compiler import GPUTarget
  with tempfile.TemporaryDirectory() as tmp:
    ttir = os.path.join(tmp, f"{kernel['name']}.ttir")
    with open(ttir, "w") as f:
      f.write(kernel["ttir"])
    compiled = triton.compile(ttir, target=GPUTarget("cuda", capability, 32),
                              options=dict(num_warps=kernel["num_warps"],
                                           num_stages=kernel["num_stages"]))
    cubin = os.path.join(tmp, "kernel.cubin")
    with open(cubin, "wb") as f:
      f.write(compiled.asm["cubin"])
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin",
                        "cuobjdump")
    usage = subprocess.run([tool, "--dump-resource-usage", cubin], capture_output=True,
                           text=True, check=True).stdout
  field = lambda key: int(re.search(rf"{key}:(\d+)", usage).group(1))
  return dict(regs=field("REG"), stack=field("STACK"), shared=compiled.metadata.shared)


def main(argv):
  del argv
  pattern = re.compile(FLAGS.kernels)
  rows = []
  columns = ["shape", "impl", "kernel", "warps", "stages"]
  if FLAGS.compile:
    _triton()        # before any lowering: a missing wheel stops the run, not each row
    columns += ["regs", "stack", "shared_kb"]
  for shape_text in FLAGS.shapes:
    shape = tuple(int(x) for x in shape_text.split("x"))
    for impl in FLAGS.implementations:
      _, options = bench_common.parse_implementation(impl)
      for kernel in op_kernels(FLAGS.op, shape, options or {}, FLAGS.window,
                               (FLAGS.kv_heads, FLAGS.block_size, FLAGS.block_count)):
        if not pattern.search(kernel["name"]):
          continue
        row = dict(shape=shape_text, impl=impl, kernel=kernel["name"],
                   warps=kernel["num_warps"], stages=kernel["num_stages"])
        if FLAGS.compile:
          try:
            found = resources(kernel, FLAGS.capability)
            row.update(found, shared_kb=round(found["shared"] / 1024, 1))
          except subprocess.CalledProcessError as e:
            row["error"] = (e.stderr or str(e))[-300:]
          except Exception as e:   # a kernel Triton refuses (shared memory...): say which
            row["error"] = f"{type(e).__name__}: {str(e).strip().splitlines()[-1][:300]}"
        rows.append(row)
  bench_common.print_table(rows, columns + (["error"] if any("error" in r for r in rows)
                                            else []))
  if FLAGS.out:
    with open(FLAGS.out, "w") as f:
      json.dump(dict(env=bench_common.environment(), rows=rows), f, indent=1)


if __name__ == "__main__":
  app.run(main)
