"""Mesh construction and sharded training: DP, FSDP and TP steps equal the single-device step.

Meshes (data x fsdp x tensor) over 8 devices: FSDP 2x4x1 (FSDP within data-parallel
groups), TP 4x1x2 (tensor parallel within data-parallel groups), and FSDP with scanned
layers; two steps each, the tiny preset in fp32.

The multi-device check runs in a subprocess: the 8 simulated CPU devices
(XLA_FLAGS=--xla_force_host_platform_device_count=8) must be set before jax
is imported, and this test process has imported it already.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

from lte_jax.training import mesh as mesh_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_mesh_shape_fills_minus_one_and_checks_the_product():
  assert mesh_lib.mesh_shape(-1, 1, 1, 8) == (8, 1, 1)
  assert mesh_lib.mesh_shape(2, -1, 2, 8) == (2, 2, 2)
  with pytest.raises(ValueError, match="at most one mesh axis may be -1"):
    mesh_lib.mesh_shape(-1, -1, 1, 8)
  with pytest.raises(ValueError, match="needs 4 devices, 8 are available"):
    mesh_lib.mesh_shape(2, 2, 1, 8)
  with pytest.raises(ValueError, match="do not split"):
    mesh_lib.mesh_shape(-1, 3, 1, 8)
  with pytest.raises(ValueError, match="mesh.tensor must be a positive integer or -1"):
    mesh_lib.mesh_shape(1, 1, 0, 8)


def test_spec_for_maps_logical_names_and_replicates_what_does_not_divide():
  mesh = jax.sharding.AbstractMesh((2, 4, 2), ("data", "fsdp", "tensor"))
  P = jax.sharding.PartitionSpec
  assert mesh_lib.spec_for(("embed", "mlp"), (128, 512), mesh) == P("fsdp", "tensor")
  assert mesh_lib.spec_for(("vocab", "embed"), (512, 128), mesh) == P("tensor", "fsdp")
  # 6 rows do not split over fsdp=4: replicated rather than an error.
  assert mesh_lib.spec_for(("embed", "heads"), (6, 128), mesh) == P(None, "tensor")
  # Unnamed trailing dims and names mapped to no mesh axis stay replicated.
  assert mesh_lib.spec_for(("conv",), (4, 128), mesh) == P(None, None)
  # A mesh axis is used once per array.
  assert mesh_lib.spec_for(("heads", "kv_heads"), (8, 8), mesh) == P("tensor", None)
  with pytest.raises(ValueError, match="not in the rules table"):
    mesh_lib.spec_for(("nonsense",), (8,), mesh)


def test_distributed_mode_is_validated():
  with pytest.raises(ValueError, match="distributed must be one of"):
    mesh_lib.maybe_initialize_distributed("maybe")
  assert mesh_lib.maybe_initialize_distributed("off") is False


_SCRIPT = textwrap.dedent("""
    import dataclasses, json
    import jax, numpy as np
    from lte_jax import configs
    from lte_jax.data import DataConfig, make_train_iterator
    from lte_jax.training import mesh as mesh_lib, optimizer, step as step_lib, train_state

    assert jax.device_count() == 8
    cfg = configs.get_config("laLTE", "tiny", num_layers=2, dtype="float32")
    model_def = train_state.make_model_def(cfg)
    tx, schedule = optimizer.make_optimizer(
        optimizer.OptimizerConfig(learning_rate=1e-3, warmup_steps=0), total_steps=10)
    init = lambda: train_state.init_train_state(model_def, tx, seed=0)
    abstract = jax.eval_shape(init)
    data = make_train_iterator(DataConfig(seq_len=32, batch_size=8, model_vocab_size=512))
    batches = [next(data) for _ in range(2)]

    # scan_layers stacks the per-layer parameters inside the step: its FSDP run must still
    # equal the single-device (unrolled) step.
    scan_def = train_state.make_model_def(dataclasses.replace(cfg, scan_layers=True))

    def run(devices, model_def=model_def, **axes):
      mesh = mesh_lib.make_mesh(**axes, devices=devices)
      shardings = mesh_lib.state_shardings(model_def, tx, abstract, mesh)
      batch_sharding = mesh_lib.batch_sharding(mesh)
      with jax.set_mesh(mesh):
        # Sharded runs build the state on the host and place its shards (the GPU/TPU
        # path); the single-device run jits it in place: both must give the same steps.
        state = train_state.create_train_state(model_def, tx, 0, shardings,
                                               on_host=devices is None)
        fn = jax.jit(step_lib.make_train_step(model_def, tx, schedule, lte_target=4.0),
                     in_shardings=(shardings, batch_sharding), out_shardings=(shardings, None))
        losses = []
        for batch in batches:
          state, metrics = fn(state, mesh_lib.global_batch(batch, batch_sharding))
          losses.append(float(metrics["loss"]))
      emb = state.params["embed"]["embedding"]
      return dict(losses=losses, grad_norm=float(metrics["grad_norm"]),
                  kept=np.asarray(metrics["kept"]).tolist(),
                  embed_spec=str(emb.sharding.spec), embed_shards=len(emb.addressable_shards),
                  params=[np.asarray(x).ravel()[:64].tolist()
                          for x in jax.tree.leaves(state.params)])

    out = {"single": run(jax.devices()[:1], data=1)}
    # Data parallelism is in both: data=2 beside fsdp=4, data=4 beside tensor=2.
    for name, axes in {"fsdp": dict(data=2, fsdp=4),
                       "tp": dict(data=4, tensor=2)}.items():
      out[name] = run(None, **axes)
    out["fsdp_scan"] = run(None, model_def=scan_def, data=2, fsdp=4)
    print("RESULT" + json.dumps(out))
""")


@pytest.fixture(scope="module")
def sharded_runs():
  # Low XLA optimisation halves compile time; every mesh compiles under the same flags.
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS="--xla_force_host_platform_device_count=8 "
                       "--xla_backend_optimization_level=0 "
                       "--xla_llvm_disable_expensive_passes=true")
  proc = subprocess.run([sys.executable, "-c", _SCRIPT], cwd=REPO, env=env, capture_output=True,
                        text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-4000:]
  line = next(l for l in proc.stdout.splitlines() if l.startswith("RESULT"))
  return json.loads(line[len("RESULT"):])


# One worker takes all four, so the ~60 s fixture runs once under xdist (setup.cfg).
@pytest.mark.xdist_group("sharded_runs")
@pytest.mark.parametrize("mesh", ["fsdp", "tp", "fsdp_scan"])
def test_sharded_step_equals_single_device_step(sharded_runs, mesh):
  import numpy as np
  single, sharded = sharded_runs["single"], sharded_runs[mesh]
  np.testing.assert_allclose(sharded["losses"], single["losses"], rtol=2e-5)
  np.testing.assert_allclose(sharded["grad_norm"], single["grad_norm"], rtol=1e-4)
  np.testing.assert_allclose(sharded["kept"], single["kept"], rtol=1e-5)
  for a, b in zip(single["params"], sharded["params"]):
    np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-6)
  # The parameters really are split: embedding [vocab, embed] -> (tensor, fsdp).
  want = {"fsdp": "P(None, 'fsdp')", "tp": "P('tensor', None)",
          "fsdp_scan": "P(None, 'fsdp')"}
  assert sharded["embed_spec"] == want[mesh]
  assert sharded["embed_shards"] == 8


_TWO_PROCESSES = textwrap.dedent("""
    import sys, jax
    pid, port = int(sys.argv[1]), sys.argv[2]
    jax.distributed.initialize(f"localhost:{port}", num_processes=2, process_id=pid)
    import numpy as np
    from lte_jax import configs
    from lte_jax.training import mesh as mesh_lib, optimizer, train_state
    cfg = configs.get_config("GDN", "tiny", num_layers=1)
    model_def = train_state.make_model_def(cfg)
    tx, _ = optimizer.make_optimizer(
        optimizer.OptimizerConfig(learning_rate=1e-3, warmup_steps=0), total_steps=10)
    abstract = jax.eval_shape(lambda: train_state.init_train_state(model_def, tx, seed=0))
    mesh = mesh_lib.make_mesh(data=1, fsdp=2, devices=jax.devices())
    shardings = mesh_lib.state_shardings(model_def, tx, abstract, mesh)
    with jax.set_mesh(mesh):
      state = train_state.create_train_state(model_def, tx, 0, shardings, on_host=True)
    emb = state.params["embed"]["embedding"]
    local = jax.sharding.SingleDeviceSharding(jax.local_devices(backend="cpu")[0])
    full = np.asarray(jax.jit(lambda: train_state.init_params(cfg, 0), out_shardings=local)()
                      ["embed"]["embedding"])
    for shard in emb.addressable_shards:
      np.testing.assert_array_equal(np.asarray(shard.data), full[shard.index])
    print("RESULT", pid, float(np.asarray(emb.addressable_shards[0].data, np.float64).sum()),
          flush=True)
""")


def test_host_init_places_shards_on_two_processes(tmp_path):
  """create_train_state under jax.distributed: each process draws on its own CPU and keeps
  its shards (jax.devices('cpu') would name the other process's CPU for one of them)."""
  import socket
  with socket.socket() as sock:
    sock.bind(("localhost", 0))
    port = str(sock.getsockname()[1])
  script = tmp_path / "two.py"
  script.write_text(_TWO_PROCESSES)
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
  env.pop("XLA_FLAGS", None)
  procs = [subprocess.Popen([sys.executable, str(script), str(i), port], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
           for i in range(2)]
  outs = [p.communicate(timeout=300) for p in procs]
  results = {}
  for p, (out, err) in zip(procs, outs):
    assert p.returncode == 0, err[-3000:]
    line = next(l for l in out.splitlines() if l.startswith("RESULT"))
    _, pid, *rest = line.split(" ", 2)
    results[int(pid)] = rest[0]
  # Each process holds its own half of the same embedding (FSDP over the two processes).
  assert results[0] != results[1], results


_TWO_DEVICES = textwrap.dedent("""
    import json
    import jax
    from lte_jax import configs
    from lte_jax.data import DataConfig, make_train_iterator
    from lte_jax.training import mesh as mesh_lib, optimizer, step as step_lib, train_state

    cfg = configs.get_config("GDN", "tiny", num_layers=1, dtype="float32")
    model_def = train_state.make_model_def(cfg)
    tx, schedule = optimizer.make_optimizer(
        optimizer.OptimizerConfig(learning_rate=1e-3, warmup_steps=0), total_steps=10)
    abstract = jax.eval_shape(lambda: train_state.init_train_state(model_def, tx, seed=0))
    batches = list(zip(range(2), make_train_iterator(
        DataConfig(seq_len=32, batch_size=8, model_vocab_size=512))))

    def run(data, devices):
      mesh = mesh_lib.make_mesh(data=data, devices=devices)
      shardings = mesh_lib.state_shardings(model_def, tx, abstract, mesh)
      batch_sharding = mesh_lib.batch_sharding(mesh)
      with jax.set_mesh(mesh):
        state = train_state.create_train_state(model_def, tx, 0, shardings, on_host=True)
        fn = jax.jit(step_lib.make_train_step(model_def, tx, schedule, lte_target=4.0),
                     in_shardings=(shardings, batch_sharding), out_shardings=(shardings, None))
        losses = []
        for _, batch in batches:
          state, metrics = fn(state, mesh_lib.global_batch(batch, batch_sharding))
          losses.append(float(metrics["loss"]))
      return losses

    assert jax.device_count() == 2
    print("RESULT" + json.dumps({"1": run(1, jax.devices()[:1]), "2": run(2, None)}))
""")


def test_gdn_step_on_two_cpu_devices_returns():
  """Regression: with exactly 2 simulated CPU devices the GDN data-parallel step used to hang
  in its first call (XLA CPU's expanded triangular solve inside the 'xla' op; now matmuls
  only, lte_jax.ops.gated_delta_rule.xla._unit_lower_inverse). Its losses equal those of
  one of the two devices alone, in the same process."""
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=2")
  proc = subprocess.run([sys.executable, "-c", _TWO_DEVICES], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=240)
  assert proc.returncode == 0, proc.stderr[-4000:]
  line = next(l for l in proc.stdout.splitlines() if l.startswith("RESULT"))
  losses = json.loads(line[len("RESULT"):])
  np.testing.assert_allclose(losses["2"], losses["1"], rtol=2e-5)
