"""Benchmark full training steps: lte_jax presets vs flash-linear-attention's GatedDeltaNet.

  python -m experiments.bench_train --archs=GDN,laLTE,transformer --size=0.4B \
      --batch=8 --seq_len=4096 --out=bench_train.json

Each model runs in its own subprocess so peak memory is its own and JAX and
PyTorch never share the GPU's allocator. The lte_jax step is exactly the one
``experiments.train`` jits (same config files, bf16 compute, fp32 master
parameters, AdamW with clipping, LTE regulariser and controller), fed random
tokens. The anchor is FLA 0.6.0's ``GatedDeltaNetForCausalLM`` at the same shape
(bf16 autocast, fp32 parameters, fused AdamW, FLA's fused cross-entropy).
Reports step time (median), tokens/s, peak device memory and MFU
(lte_jax.training.metrics.flops_per_token for both, so the MFU columns compare).
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable

from absl import app, flags

from lte_jax.configs import REMAT_POLICIES  # plain data: no JAX import in this process

FLAGS = flags.FLAGS
flags.DEFINE_list("archs", ["GDN", "laLTE", "transformer"], "lte_jax architectures to time.")
flags.DEFINE_string("size", "0.4B", "Preset: tiny | 0.4B | 1.4B.")
flags.DEFINE_integer("batch", 8, "Sequences per step (global).")
flags.DEFINE_integer("seq_len", 4096, "Tokens per sequence.")
flags.DEFINE_integer("steps", 10, "Timed steps (after warm-up).")
flags.DEFINE_integer("warmup", 3, "Untimed steps after compilation.")
flags.DEFINE_integer("rounds", 1, "Times every model in turn this many times (FLA, ours, FLA, "
                     "ours, ...), each in a fresh process; vs_fla compares within a round and a "
                     "summary gives the spread over rounds (FLA's own step moved by 10% between "
                     "calls on the H200).", lower_bound=1)
flags.DEFINE_bool("fla", True, "Also time flash-linear-attention's GatedDeltaNet (the anchor).")
flags.DEFINE_enum("remat", "dots_mixers", list(REMAT_POLICIES),
                  "What each lte_jax block keeps for the backward pass (ModelConfig.remat; "
                  "'dots_mixers' also keeps each mixer's core-op inputs, output and kernel "
                  "residuals, so the forward kernels are not rerun: lte_jax.remat).")
flags.DEFINE_bool("scan_layers", True,
                  "Compile the lte_jax blocks as a scan over the layer cycle "
                  "(ModelConfig.scan_layers).")
flags.DEFINE_string("implementation", None,
                    "Op implementation for the lte_jax mixers that have it (config.model."
                    "implementation); None: each op's default for the backend.")
flags.DEFINE_string("gdn_implementation", None,
                    "Gated delta rule implementation only ('xla' | 'pallas'); overrides "
                    "--implementation for the GDN layers.")
flags.DEFINE_enum("conv_implementation", None, ["xla", "pallas"],
                  "GDN q/k/v short conv implementation (GDNConfig.conv_implementation); None: "
                  "the op's default for the backend.")
flags.DEFINE_string("gdn_plan_options", None,
                    "GDN Pallas kernel options 'name=value;...' (GDNConfig.plan_options), e.g. "
                    "'keep_states=True;block_k=32'.")
flags.DEFINE_string("lte_plan_options", None,
                    "LTE attention Pallas kernel options 'name=value;...' "
                    "(LTEConfig.plan_options), e.g. 'far_gather=copy'.")
flags.DEFINE_enum("lte_scorer_dtype", None, ["float32", "bfloat16"],
                  "LTE scorer matmul operands (LTEConfig.scorer_dtype); None: the config's.")
flags.DEFINE_integer("worker_timeout", None,
                     "Seconds each model's subprocess may take (compile included); one that "
                     "runs over is recorded as an error and the next model starts. None: no limit.")
flags.DEFINE_string("mesh", None,
                    "lte_jax device mesh 'data,fsdp,tensor' (-1: the devices left over), e.g. "
                    "'1,-1,1' for FSDP over every visible GPU; None: the config's (data over "
                    "all). CUDA_VISIBLE_DEVICES picks the GPUs; --batch stays global.")
flags.DEFINE_string("out", "bench_train.json", "Where to write the JSON results.")
flags.DEFINE_integer("profile_steps", 0,
                     "After timing, trace this many lte_jax steps with the JAX profiler and "
                     "report the device time per kernel (experiments.profile_summary); the "
                     "trace stays in --profile_dir/<arch>. 0: off.")
flags.DEFINE_integer("hlo_copies", 0,
                     "After compiling, print this many groups of the step's HLO copies (by "
                     "JAX op and source line) and the activation stacks its loops carry "
                     "(experiments.hlo_copies). 0: off.")
flags.DEFINE_string("hlo_dir", None,
                    "Write each model's compiled step (optimised HLO text, gzip) to "
                    "<hlo_dir>/<arch>.hlo.txt.gz, to look up the fusions a profile names. "
                    "None: off.")
flags.DEFINE_integer("lte_kept", 0,
                     "Time the LTE models at this many kept tokens per sequence and KV head "
                     "(the lambda controller's target is 512 per 4096, where a run spends "
                     "nearly all its steps): each scorer's projection bias is shifted to "
                     "that sparsity on the benchmark batch before timing "
                     "(experiments.lte_calibrate). 0: the fresh init, which keeps almost "
                     "every token (a run's first steps).")
flags.DEFINE_string("profile_dir", "bench_train_profile", "Where --profile_steps traces go.")
flags.DEFINE_integer("profile_top", 30, "Kernels listed per profiled model (largest first).")
flags.DEFINE_string("study_preset", None,
                    "Time the models of this experiments.reproduce preset (e.g. 'small') instead "
                    "of --size: its shapes, dtype, batch and length (unless --batch / --seq_len "
                    "are given).")
flags.DEFINE_string("worker", None, "Internal: time one model in this process and print JSON.")


_USER_PREALLOCATE = os.environ.get("XLA_PYTHON_CLIENT_PREALLOCATE")


def _median(xs):
  xs = sorted(xs)
  return xs[len(xs) // 2]


def _phase(arch: str, what: str, since: float) -> None:
  """Progress on stderr: a worker that runs over --worker_timeout shows where it stood."""
  print(f"{arch}: {what} ({time.perf_counter() - since:.1f} s)", file=sys.stderr, flush=True)


def _run_lte_jax(arch: str) -> dict:
  t0 = time.perf_counter()
  import jax
  import jax.numpy as jnp

  from experiments import configs as config_files
  from lte_jax.training import experiment, mesh as mesh_lib, metrics, optimizer, recipes
  from lte_jax.training import step as step_lib
  from lte_jax.training import train_state

  config = config_files.load(config_files.resolve(arch))
  config.size = FLAGS.size
  config.data.seq_len, config.data.batch_size = _study_preset(config, arch)
  config.model.remat = FLAGS.remat
  config.model.scan_layers = FLAGS.scan_layers
  config.steps = 1000
  if FLAGS.implementation:
    config.model.implementation = FLAGS.implementation
  if FLAGS.gdn_plan_options:
    config.model.gdn_plan_options = FLAGS.gdn_plan_options
  if FLAGS.lte_scorer_dtype:
    config.model.lte_scorer_dtype = FLAGS.lte_scorer_dtype
  if FLAGS.lte_plan_options:
    config.model.lte_plan_options = FLAGS.lte_plan_options
  if FLAGS.conv_implementation:
    config.model.gdn_conv_implementation = FLAGS.conv_implementation
  if FLAGS.mesh:
    sizes = FLAGS.mesh.split(",")
    if len(sizes) != 3 or not all(x.strip().lstrip("-").isdigit() for x in sizes):
      raise ValueError(f"--mesh takes 'data,fsdp,tensor' (three integers), got {FLAGS.mesh!r}")
    config.mesh.data, config.mesh.fsdp, config.mesh.tensor = (int(x) for x in sizes)
  exp = experiment.resolve(config)
  if FLAGS.gdn_implementation:
    gdn = dataclasses.replace(exp.model.gdn, implementation=FLAGS.gdn_implementation)
    exp = dataclasses.replace(exp, model=dataclasses.replace(exp.model, gdn=gdn))
  _phase(arch, f"imports and config done, backend {jax.default_backend()}", t0)
  mesh = mesh_lib.make_mesh(**recipes.apply(config).mesh)
  model_def = train_state.make_model_def(exp.model)
  tx, schedule = optimizer.make_optimizer(exp.optim, exp.steps)
  init = lambda: train_state.init_train_state(model_def, tx, exp.seed)
  shardings = mesh_lib.state_shardings(model_def, tx, jax.eval_shape(init), mesh)
  _phase(arch, "model defined, state shapes traced", t0)
  batch_sharding = mesh_lib.batch_sharding(mesh)
  b, t = config.data.batch_size, config.data.seq_len
  tokens = jax.random.randint(jax.random.key(0), (b, t + 1), 3, exp.model.vocab_size, jnp.int32)
  batch = dict(inputs=tokens[:, :-1], targets=tokens[:, 1:],
               segment_ids=jnp.ones((b, t), jnp.int32),
               positions=jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t)),
               loss_mask=jnp.ones((b, t), jnp.float32))
  with jax.set_mesh(mesh):
    # On the host: XLA's GPU compile of this init ran past 47 s on the H200
    # (train_state.create_train_state).
    state = jax.block_until_ready(
        train_state.create_train_state(model_def, tx, exp.seed, shardings))
    batch = jax.device_put(batch, batch_sharding)
    kept = None
    if FLAGS.lte_kept and model_def.lte_layers:
      from experiments import lte_calibrate
      params, kept_per_head = lte_calibrate.calibrate_kept(model_def, state.params, batch,
                                                           FLAGS.lte_kept)
      state = state.replace(params=params)
      kept = float(jnp.mean(kept_per_head))
      _phase(arch, f"LTE scorer biases shifted: {kept:.0f} kept tokens per sequence and head "
             f"(mean over layers and heads)", t0)
    _phase(arch, "parameters and optimizer state initialised; lowering the step", t0)
    step_fn = jax.jit(step_lib.make_train_step(model_def, tx, schedule),
                      in_shardings=(shardings, batch_sharding), out_shardings=(shardings, None),
                      donate_argnums=0)
    start = time.perf_counter()
    lowered = step_fn.lower(state, batch)
    print(f"{arch}: lowered in {time.perf_counter() - start:.1f} s; compiling", file=sys.stderr,
          flush=True)
    step_fn = lowered.compile()
    compile_s = time.perf_counter() - start
    # XLA's own estimate, printed before running: a step that cannot fit shows here, not
    # as a long rematerialising compile followed by an out-of-memory error.
    mem = step_fn.memory_analysis()
    temp_gib = getattr(mem, "temp_size_in_bytes", 0) / 2**30
    print(f"{arch}: compiled in {compile_s:.1f} s, XLA temp buffers {temp_gib:.1f} GiB",
          file=sys.stderr, flush=True)
    if FLAGS.hlo_dir:
      import gzip
      os.makedirs(FLAGS.hlo_dir, exist_ok=True)
      with gzip.open(os.path.join(FLAGS.hlo_dir, f"{arch}.hlo.txt.gz"), "wt") as f:
        f.write(step_fn.as_text())
    if FLAGS.hlo_copies > 0:
      from experiments import bench_common, hlo_copies
      print(f"{arch}: copies in the compiled step (a loop body's count once per body):",
            file=sys.stderr, flush=True)
      bench_common.print_table(hlo_copies.summarise(step_fn.as_text(), FLAGS.hlo_copies),
                               ["where", "memcpy", "count", "mib"], file=sys.stderr)
      print(f"{arch}: activation stacks the step's loops carry (saved residuals of scanned "
            f"layers, moved by dynamic slices and updates):", file=sys.stderr, flush=True)
      stacks = hlo_copies.scan_stacks(lowered.as_text(), b, t)
      bench_common.print_table(stacks, ["loop", "shape", "dtype", "count", "gib"],
                               file=sys.stderr)
      for loop in sorted({r["loop"] for r in stacks}):
        gib = sum(r["gib"] for r in stacks if r["loop"] == loop)
        print(f"{arch}: loop {loop} carries {gib:.2f} GiB of activation stacks",
              file=sys.stderr, flush=True)
    carried = [state]          # the step donates its state: each call takes the last one

    def one_step():
      carried[0], metrics_ = step_fn(carried[0], batch)
      return metrics_["loss"]

    for _ in range(1 + FLAGS.warmup):
      loss = one_step()
    jax.block_until_ready(loss)
    times = []
    for _ in range(FLAGS.steps):
      start = time.perf_counter()
      loss = jax.block_until_ready(one_step())
      times.append(time.perf_counter() - start)
      print(f"{arch}: step {times[-1]:.3f} s", file=sys.stderr, flush=True)
    profile = _profile(arch, one_step)
  n = train_state.num_params(model_def)
  step_s = _median(times)
  peak = metrics.peak_flops(jax.devices()[0])
  flops = metrics.flops_per_token(exp.model, n, t) * b * t / step_s
  mem = [d.memory_stats() or {} for d in jax.local_devices()]
  impl = exp.model.gdn.implementation or "default"
  if exp.model.gdn.plan_options:
    impl += f" {exp.model.gdn.plan_options}"
  name = f"lte_jax {arch} (gdn {impl}, remat {FLAGS.remat}, scan {FLAGS.scan_layers})"
  if FLAGS.conv_implementation:
    name += f", conv {FLAGS.conv_implementation}"
  if FLAGS.lte_scorer_dtype:
    name += f", LTE scorer {FLAGS.lte_scorer_dtype}"
  if FLAGS.lte_plan_options:
    name += f", LTE {FLAGS.lte_plan_options}"
  if kept is not None:
    name += f", LTE kept {FLAGS.lte_kept}"
  if jax.device_count() > 1:
    name += f", mesh {dict(mesh.shape)}"
  return dict(model=name, params=n, devices=jax.device_count(),
              step_s=step_s, tokens_per_s=b * t / step_s, compile_s=compile_s,
              peak_mem_gib=max(x.get("peak_bytes_in_use", 0) for x in mem) / 2**30,
              mfu=flops / (peak * jax.device_count()) if peak else None,
              xla_temp_gib=temp_gib, final_loss=float(loss), profile=profile,
              lte_kept=kept)


def _study_preset(config, arch: str) -> tuple[int, int]:
  """With --study_preset, point ``config`` at that preset's model of ``arch`` (a JSON file
  in the temp folder); returns (seq_len, batch): the preset's unless the flags are given."""
  if not FLAGS.study_preset:
    return FLAGS.seq_len, FLAGS.batch
  from experiments.reproduction import preset as preset_lib
  p = preset_lib.get_preset(FLAGS.study_preset)
  fd, path = tempfile.mkstemp(prefix=f"bench_train_{arch}_", suffix=".json")
  with os.fdopen(fd, "w") as f:
    json.dump(dataclasses.asdict(preset_lib.model_config(p, arch)), f, default=list)
  config.model.from_file, config.model.dtype, config.model.init = path, p.dtype, "reference"
  return (FLAGS.seq_len if FLAGS["seq_len"].present else p.seq_len,
          FLAGS.batch if FLAGS["batch"].present else p.batch_size)


def _profile(arch: str, step: Callable[[], Any]) -> list[dict] | None:
  """--profile_steps traced calls of `step` -> the top kernels by device time per step
  (printed too), or None when profiling is off."""
  if FLAGS.profile_steps <= 0:
    return None
  from experiments import bench_common, profile_summary
  path = profile_summary.trace_calls(step, FLAGS.profile_steps,
                                     os.path.join(FLAGS.profile_dir, arch))
  rows = profile_summary.per_call(profile_summary.op_times(path), FLAGS.profile_steps,
                                   FLAGS.profile_top)
  print(f"{arch}: device time per step by kernel ({path}):", file=sys.stderr, flush=True)
  with contextlib.redirect_stdout(sys.stderr):
    bench_common.print_table(rows, ["name", "hlo_op", "ms_per_call", "count", "share"])
  return rows


def _run_fla() -> dict:
  import torch
  import fla.ops.common.chunk_o as chunk_o
  from fla.models import GatedDeltaNetConfig, GatedDeltaNetForCausalLM

  import jax
  from lte_jax import configs
  from lte_jax.training import metrics

  # FLA 0.6.0 refuses this backward on Hopper with triton < 3.7.1 (a correctness
  # guard, see BENCHMARKS.md); lifted here only to time it.
  chunk_o.TRITON_ABOVE_3_7_1 = True
  ours = configs.get_config("GDN", FLAGS.size)
  cfg = GatedDeltaNetConfig(
      hidden_size=ours.d_model, num_hidden_layers=ours.num_layers, num_heads=ours.gdn.num_heads,
      head_dim=ours.gdn.head_dim, expand_v=ours.gdn.expand_v, vocab_size=ours.vocab_size,
      intermediate_size=ours.intermediate_size, hidden_ratio=None,
      tie_word_embeddings=ours.tie_embeddings, fuse_cross_entropy=True)
  model = GatedDeltaNetForCausalLM(cfg).cuda()
  n = sum(p.numel() for p in model.parameters())
  opt = torch.optim.AdamW(model.parameters(), lr=3e-4, betas=(0.9, 0.95), weight_decay=0.1,
                          eps=1e-15, fused=True)
  b, t = FLAGS.batch, FLAGS.seq_len
  ids = torch.randint(3, cfg.vocab_size, (b, t), device="cuda")

  def step():
    with torch.autocast("cuda", dtype=torch.bfloat16):
      loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss

  start = time.perf_counter()
  step()
  torch.cuda.synchronize()
  compile_s = time.perf_counter() - start
  for _ in range(FLAGS.warmup):
    step()
  torch.cuda.synchronize()
  times = []
  for _ in range(FLAGS.steps):
    start = time.perf_counter()
    loss = step()
    torch.cuda.synchronize()
    times.append(time.perf_counter() - start)
  step_s = _median(times)
  peak = metrics.peak_flops(jax.devices("cpu")[0]) or 989e12  # H200 dense bf16
  flops = metrics.flops_per_token(ours, n, t) * b * t / step_s
  return dict(model="FLA 0.6.0 GatedDeltaNet", params=n, devices=1, step_s=step_s,
              tokens_per_s=b * t / step_s, compile_s=compile_s,
              peak_mem_gib=torch.cuda.max_memory_allocated() / 2**30,
              mfu=flops / peak if "H200" in torch.cuda.get_device_name() else None,
              final_loss=float(loss))


def _spawn(worker: str, argv: list[str]) -> dict | None:
  cmd = [sys.executable, "-m", "experiments.bench_train", f"--worker={worker}"] + argv
  env = dict(os.environ)
  env.pop("XLA_PYTHON_CLIENT_PREALLOCATE", None)
  if _USER_PREALLOCATE is not None:
    env["XLA_PYTHON_CLIENT_PREALLOCATE"] = _USER_PREALLOCATE
  if worker == "fla":
    env["JAX_PLATFORMS"] = "cpu"  # the anchor only uses lte_jax's FLOP formula
  # stderr streams through (progress of a long compile); stdout carries the result.
  try:
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, env=env,
                          timeout=FLAGS.worker_timeout)
  except subprocess.TimeoutExpired:
    print(f"{worker} ran over --worker_timeout={FLAGS.worker_timeout} s", flush=True)
    return dict(model=worker, error=f"timeout after {FLAGS.worker_timeout} s")
  for line in proc.stdout.splitlines():
    if line.startswith("RESULT "):
      return json.loads(line[len("RESULT "):])
  print(f"{worker} failed (exit {proc.returncode}); its stderr is above", flush=True)
  return dict(model=worker, error=f"exit {proc.returncode}")


def main(argv):
  del argv
  if FLAGS.worker:
    result = _run_fla() if FLAGS.worker == "fla" else _run_lte_jax(FLAGS.worker)
    print("RESULT " + json.dumps(result), flush=True)
    return
  # This process only reports the environment: it must not take the GPU's memory
  # from the workers.
  os.environ["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"
  if FLAGS.study_preset and FLAGS.fla:
    raise app.UsageError("--study_preset times lte_jax models only (FLA's anchor is a --size "
                         "model): add --nofla")
  from experiments import bench_common
  passthrough = [a for a in sys.argv[1:]
                 if not a.startswith(("--worker=", "--worker_timeout", "--out", "--archs"))]
  workers = (["fla"] if FLAGS.fla else []) + list(FLAGS.archs)
  env = bench_common.environment()
  run_flags = {name: FLAGS[name].value for name in (
      "size", "batch", "seq_len", "steps", "remat", "scan_layers", "implementation",
      "gdn_implementation", "conv_implementation", "gdn_plan_options", "mesh",
      "lte_scorer_dtype", "lte_plan_options", "study_preset")}
  rows = []
  for round_ in range(FLAGS.rounds):
    for worker in workers:
      rows.append(dict(_spawn(worker, passthrough), round=round_))
      print("RESULT " + json.dumps(rows[-1]), flush=True)
      bench_common.anchor_ratios(rows, round_)
      # Written after every model so a run cut short keeps what it measured.
      bench_common.write_json(FLAGS.out, dict(environment=env, flags=run_flags, results=rows,
                                              summary=bench_common.rounds_summary(rows)))
  shape = (f"study preset {FLAGS.study_preset}" if FLAGS.study_preset else
           f"size {FLAGS.size}, batch {FLAGS.batch} x {FLAGS.seq_len}")
  print(f"\n{shape}, median of {FLAGS.steps} steps")
  bench_common.print_table(rows, ["model", "round", "params", "devices", "step_s",
                                  "tokens_per_s", "vs_fla", "peak_mem_gib", "mfu", "compile_s",
                                  "final_loss"])
  if FLAGS.rounds > 1:
    print(f"\nover {FLAGS.rounds} rounds (each model's median step per round; vs_fla against "
          f"the same round's FLA)")
    bench_common.print_table(bench_common.rounds_summary(rows), [
        "model", "rounds", "step_s_median", "step_s_min", "step_s_max", "vs_fla_median",
        "vs_fla_min", "vs_fla_max"])


if __name__ == "__main__":
  app.run(main)
