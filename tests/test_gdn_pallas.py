"""Pallas gated delta rule: interpreted kernels vs the recurrent reference, and lowering.

The kernels run interpreted on CPU, in both of their forms: the GPU form
(token tensors as [B, T, H, D], recurrences as loops inside one program per
batch*head and value block; generic interpreter) and the TPU form ([B*H, N, C, D],
recurrences over an ordered grid axis with VMEM scratch; the TPU interpreter,
which poisons uninitialised memory with NaN). Every case
compares the output, the final state and all six gradients with the reference,
at the tolerances of tests/test_gated_delta_rule.py. Lowering for 'cuda'
(Triton) and 'tpu' (Mosaic) runs at the 0.4B and 1.4B GDN shapes with T = 4096
on abstract inputs, so nothing is allocated.
"""
from __future__ import annotations

import functools
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lte_jax import configs
from lte_jax.kernels.gated_delta_rule import Plan, chunk_gated_delta_rule_pallas, inverse
from lte_jax.kernels.gated_delta_rule.backend import Layout
from lte_jax.ops.gated_delta_rule import chunk_gated_delta_rule, recurrent_gated_delta_rule
from lte_jax.ops.gated_delta_rule.api import default_implementation
from tests import helpers
from tests.quick_compile import quick_compile  # noqa: F401  (autouse fixture)
from tests.test_gated_delta_rule import ARG_NAMES, TOLERANCES, _assert_close, _inputs



@functools.lru_cache(maxsize=None)
def _grad_fn(impl, platform, chunk_size, block_v=64, options=()):
  """Jitted (o, final state) and gradients of <o, d_o> + <h, d_h> w.r.t. the six inputs."""

  def loss(q, k, v, g, beta, h0, d_o, d_h, segment_ids):
    kw = dict(initial_state=h0, output_final_state=True, segment_ids=segment_ids)
    if impl == "reference":
      o, h = recurrent_gated_delta_rule(q, k, v, g, beta, **kw)
    else:
      o, h = chunk_gated_delta_rule_pallas(q, k, v, g, beta, scale=q.shape[-1] ** -0.5,
                                           chunk_size=chunk_size, platform=platform,
                                           block_v=block_v, interpret=True, **kw,
                                           **dict(options))
    return jnp.sum(o.astype(jnp.float32) * d_o) + jnp.sum(h * d_h), (o, h)

  return jax.jit(jax.value_and_grad(loss, argnums=tuple(range(6)), has_aux=True))


def _compare(args, dtype, *, platform, chunk_size=64, block_v=64, segment_ids=None,
             options=()):
  rng = np.random.default_rng(1)
  d_o = jnp.asarray(rng.standard_normal(args[2].shape), jnp.float32)
  d_h = jnp.asarray(rng.standard_normal(args[5].shape), jnp.float32)
  (_, (o, h)), grads = _grad_fn("pallas", platform, chunk_size, block_v, options)(
      *args, d_o, d_h, segment_ids)
  (_, (o_ref, h_ref)), grads_ref = _grad_fn("reference", None, None)(*args, d_o, d_h,
                                                                      segment_ids)
  tol_o, tol_qkv, tol_gb = TOLERANCES[dtype]
  _assert_close("o", o, o_ref, tol_o)
  _assert_close("final_state", h, h_ref, tol_o)
  for name, got, want in zip(ARG_NAMES, grads, grads_ref):
    _assert_close(f"d{name}", got, want, tol_gb if name in ("g", "beta") else tol_qkv)


# (batch, time, heads, dk, dv, dtype, g_dtype, platform, chunk, block_v, packed): each T
# of 1, 75, 130 (one short chunk; not chunk multiples), D 64, 128, 256, Dk != Dv both ways
# (48 also checks the padding of a dim that is no power of two), both dtypes, both
# kernel forms, packed documents in both forms, GPU programs over 1, 2 and 4 value
# blocks.
CASES = [
    (2, 1, 2, 64, 64, jnp.float32, None, "gpu", 64, 64, False),
    (1, 75, 2, 64, 32, jnp.bfloat16, jnp.float32, "tpu", 64, 64, False),
    (1, 75, 1, 32, 64, jnp.float32, None, "gpu", 32, 16, True),
    (2, 130, 1, 48, 64, jnp.bfloat16, None, "gpu", 64, 32, True),
    (1, 130, 2, 64, 48, jnp.float32, None, "tpu", 16, 64, True),
    # The presets' head dims: 128 and 256, Dk != Dv.
    (1, 70, 1, 128, 256, jnp.bfloat16, jnp.float32, "gpu", 64, 64, True),
    (1, 70, 1, 256, 128, jnp.float32, None, "tpu", 64, 64, False),
]


@pytest.mark.parametrize(
    "batch,time,heads,dk,dv,dtype,g_dtype,platform,chunk,block_v,packed", CASES)
def test_matches_reference_forward_and_gradients(batch, time, heads, dk, dv, dtype, g_dtype,
                                                 platform, chunk, block_v, packed):
  args = _inputs(batch, time, heads, dk, dv, dtype, g_dtype=g_dtype, seed=time)
  segment_ids = None
  if packed:
    segment_ids = jnp.asarray(helpers.packed_segment_ids(np.random.default_rng(time), batch,
                                                         time))
  _compare(args, dtype, platform=platform, chunk_size=chunk, block_v=block_v,
           segment_ids=segment_ids)


# Plan options that touch different kernels share a run (one compile of the interpreted
# kernels is most of a case's time); options that leave the fused WY path (keep_states,
# decays on the keys, fuse_wy=False) each take another of its three unfused routes.
PLAN_VARIANTS = [
    # Fused path: the TPU's inverse in the GPU form, fp32 WY products (the default rounds
    # them to bf16 as FLA), the recurrences' value columns in four programs.
    (("inverse_form", "doubling"), ("wy_operands", "fp32"), ("recurrence_block_v", 16)),
    # The forward's W, h, V_new kept for the backward; key loops in four steps (prepare,
    # WY grads, and the dq / dk / dW kernel's four key blocks as a grid axis).
    (("keep_states", True), ("block_k", 16)),
    # Decays on the key side (the default at this Dk puts them on the value side), with
    # the dq / dk / dW kernel's four key blocks walked in a loop.
    (("decay_on", "keys"), ("qk_key_grid", False), ("block_k", 16)),
    # The recurrences on W and U from the WY transform (the default, fuse_wy, takes T),
    # with the outputs and dV_local over a grid of value blocks, key loops in two steps.
    (("fuse_wy", False), ("output_value_grid", True), ("block_k", 32)),
    # The TPU form with the decays on the value side.
    (("decay_on", "values"), ("platform", "tpu")),
]


@pytest.mark.parametrize("options", PLAN_VARIANTS)
def test_plan_variants_match_reference(options):
  """Each non-default plan option against the reference, forward and all six gradients;
  value loops in two steps throughout."""
  args = _inputs(1, 130, 1, 64, 64, jnp.bfloat16, g_dtype=jnp.float32, seed=3)
  segment_ids = jnp.asarray(helpers.packed_segment_ids(np.random.default_rng(3), 1, 130))
  options = dict(options)
  platform = options.pop("platform", "gpu")
  _compare(args, jnp.bfloat16, platform=platform, block_v=32, segment_ids=segment_ids,
           options=tuple(options.items()))


def test_plan_variants_cover_every_option_and_route():
  """Between them the variants set each tuning option they are meant to, and take the WY
  routes their comments name (the fused one and each unfused one)."""
  seen = {name for variant in PLAN_VARIANTS for name, _ in variant}
  assert seen == {"inverse_form", "wy_operands", "recurrence_block_v", "keep_states",
                  "block_k", "decay_on", "qk_key_grid", "fuse_wy", "output_value_grid",
                  "platform"}
  plans = [Plan(dict(v).get("platform", "gpu"), interpret=True,
                **{k: x for k, x in v if k != "platform"}) for v in PLAN_VARIANTS]
  assert [p.fuses_wy for p in plans] == [True, False, False, False, False]
  assert plans[1].keep_states and plans[2].decay_on == "keys" and not plans[3].fuse_wy


def test_plan_options_reach_the_kernels_from_op_and_layer():
  """lte_jax.ops.chunk_gated_delta_rule(plan_options=...) and GDNConfig.plan_options reach
  the kernels' Plan (a bad value fails there); keep_states changes no gradient; options
  need 'pallas' at the op, while the layer drops them where another implementation runs."""
  from flax import nnx

  from lte_jax.layers.gated_deltanet import GatedDeltaNet
  from lte_jax.ops import chunk_gated_delta_rule
  args = _inputs(1, 40, 2, 16, 16, jnp.float32, seed=2)[:5]

  def grads(keep_states):
    # Jitted: the interpreted kernels run op by op otherwise, which is far slower.
    loss = lambda *a: jnp.sum(jnp.sin(chunk_gated_delta_rule(
        *a, implementation="pallas", chunk_size=16,
        plan_options={"keep_states": keep_states})[0]))
    return jax.jit(jax.grad(loss, argnums=tuple(range(5))))(*args)

  for a, b in zip(grads(False), grads(True)):
    # Same math in another order: fp32 rounding only (a true zero reads ~1e-7 either way).
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-6)
  with pytest.raises(ValueError, match="wy_operands must be"):
    chunk_gated_delta_rule(*args, implementation="pallas", plan_options={"wy_operands": "x"})
  with pytest.raises(ValueError, match=r"unknown keys \['blokc_v'\]"):
    chunk_gated_delta_rule(*args, implementation="pallas", plan_options={"blokc_v": 16})
  with pytest.raises(ValueError, match=r"unknown keys \['scale'\]"):
    chunk_gated_delta_rule(*args, implementation="pallas", plan_options={"scale": 1.0})
  with pytest.raises(ValueError, match="only accepted with implementation='pallas'"):
    chunk_gated_delta_rule(*args, implementation="xla", plan_options={"block_v": 16})
  with pytest.raises(ValueError, match=r"GDNConfig.plan_options='chunk=16'.*unknown plan option"):
    GatedDeltaNet(configs.GDNConfig(plan_options="chunk=16"), 32, num_layers=1, init_std=0.02,
                  rngs=nnx.Rngs(0))
  x = jnp.ones((1, 24, 32), jnp.float32)
  layer = lambda impl: GatedDeltaNet(
      configs.GDNConfig(num_heads=2, head_dim=16, implementation=impl,
                        plan_options="wy_operands=x"), 32, num_layers=1, init_std=0.02,
      rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="wy_operands must be"):
    layer("pallas")(x)
  layer(None)(x)     # CPU: 'xla' runs; the GPU kernels' options do not apply


@pytest.mark.parametrize("platform,form,dk", [("gpu", None, 32), ("tpu", None, 32),
                                              ("gpu", "doubling", 32), ("gpu", None, 256)])
def test_wy_inverse_kernel_inverts(platform, form, dk):
  """Both inverse algorithms (16-row blocks on GPU, masked doubling on TPU) give
  (I + A)^-1 for a chunk with a document start inside it; Dk = 256 sums the blocked
  form's Gram blocks over four slices of key columns."""
  c = 64
  rng = np.random.default_rng(11)
  k = rng.standard_normal((1, 1, c, dk)).astype(np.float32)
  k /= np.linalg.norm(k, axis=-1, keepdims=True)
  beta = rng.uniform(0.2, 1.0, (1, 1, c)).astype(np.float32)
  g_cum = np.cumsum(-rng.uniform(0.0, 0.3, (1, 1, c)), axis=-1).astype(np.float32)
  seg = (np.arange(c) >= 37).astype(np.float32)[None, None]
  i, j = np.arange(c)[:, None], np.arange(c)[None, :]
  mask = (i > j) & (seg[0, 0][:, None] == seg[0, 0][None, :])
  decay = np.where(mask, np.exp(np.where(mask, g_cum[0, 0][:, None] - g_cum[0, 0][None, :],
                                         0.0)), 0.0)
  a = beta[0, 0][:, None] * (k[0, 0] @ k[0, 0].T) * decay
  want = np.linalg.inv(np.eye(c) + a.astype(np.float64))
  col, row = (lambda x: jnp.asarray(x)[..., None]), (lambda x: jnp.asarray(x)[..., None, :])
  # One chunk of one head: k as [B*H, N, C, D] is also k as [B, T, H, D] here.
  layout = Layout(batch=1, heads=1, chunks=1, chunk=c, native=platform == "gpu")
  k_tokens = jnp.asarray(k if platform == "tpu" else np.swapaxes(k, 1, 2))
  plan = Plan(platform, interpret=True, inverse_form=form)
  g2 = g_cum * np.log2(np.e)          # the kernels take G in base 2 (exp2 decays)
  wy_inverse = jax.jit(functools.partial(inverse.wy_inverse, plan, layout))  # not op by op
  got = wy_inverse(k_tokens, col(beta), col(g2), row(g2), col(seg), row(seg))
  assert helpers.rel_rms(got[0, 0], want) < 1e-6


def test_strongly_negative_decay_keeps_gradients_finite_and_exact():
  q, k, v, _, beta, h0 = _inputs(1, 75, 1, 64, 32, jnp.float32, seed=5)
  g = jnp.full(beta.shape, -30.0, jnp.float32)    # e^g ~ 1e-13 at every step
  _compare((q, k, v, g, beta, h0), jnp.float32, platform="gpu")


def test_public_entry_point_runs_the_kernels():
  q, k, v, g, beta, h0 = _inputs(1, 40, 2, 16, 24, jnp.float32, seed=4)

  def run(q, k, v, g, beta, h0):     # one compile for both calls of the public op
    full = chunk_gated_delta_rule(q, k, v, g, beta, initial_state=h0, output_final_state=True,
                                  implementation="pallas")
    return full, chunk_gated_delta_rule(q, k, v, g, beta, implementation="pallas")

  (o, h), (o_only, none) = jax.jit(run)(q, k, v, g, beta, h0)
  o_ref, h_ref = recurrent_gated_delta_rule(q, k, v, g, beta, initial_state=h0,
                                            output_final_state=True)
  _assert_close("o", o, o_ref, 2e-5)
  _assert_close("final_state", h, h_ref, 2e-5)
  assert none is None and o_only.shape == v.shape and o_only.dtype == v.dtype


def test_default_implementation_per_backend():
  assert default_implementation("cpu") == "xla"
  # GPU: 'pallas' since timed on an H200; TPU keeps 'xla' until the kernels ran there.
  assert default_implementation("gpu") == "pallas"
  assert default_implementation("tpu") == "xla"


def test_plan_inverse_precision_default_per_target():
  from lte_jax.kernels.gated_delta_rule.backend import Plan
  # Tensor cores: TF32 when T is rounded to bf16 anyway, three TF32 passes for fp32 inputs.
  assert Plan("gpu").inverse_precision_for(jnp.bfloat16) == "tf32"
  assert Plan("gpu").inverse_precision_for(jnp.float32) == "tf32x3"
  assert Plan("gpu", wy_operands="fp32").inverse_precision_for(jnp.bfloat16) == "tf32x3"
  assert Plan("gpu", inverse_precision="highest").inverse_precision_for(jnp.bfloat16) == "highest"
  assert Plan("gpu", interpret=True).inverse_precision_for(jnp.bfloat16) == "highest"
  # The backward recomputes W, h, V_new unless asked to keep them, as FLA's does.
  assert not Plan("gpu").keep_states and not Plan("tpu").keep_states
  assert Plan("tpu").inverse_precision_for(jnp.bfloat16) == "highest"


def test_plan_launch_table():
  """Per-kernel launch parameters: the measured GPU table by default; launch entries (flag
  string or mapping) override the kernels they name and the rest keep the table, or the
  uniform num_warps/stages when those are given."""
  from lte_jax.kernels import lowering
  from lte_jax.kernels.gated_delta_rule.backend import GPU_LAUNCH, KERNELS, Plan
  assert set(GPU_LAUNCH) <= set(KERNELS)
  gpu = Plan("gpu")
  assert dict((n, (w, s)) for n, w, s in gpu.launch) == GPU_LAUNCH
  assert Plan("gpu", interpret=True).launch == () and Plan("tpu").launch == ()
  one = Plan("gpu", launch="gdn_chunk_states=1/1")
  assert dict((n, (w, s)) for n, w, s in one.launch) == {**GPU_LAUNCH, "gdn_chunk_states": (1, 1)}
  assert one == Plan("gpu", launch=one.launch)      # a resolved plan's launch round-trips
  assert Plan("gpu", interpret=True, launch="gdn_chunk_states=1/1").launch == (
      ("gdn_chunk_states", 1, 1),)
  plan = Plan("gpu", num_warps=8, num_stages=1, launch="gdn_wy_inverse=2/3+gdn_chunk_states=1/1")
  assert plan == Plan("gpu", num_warps=8, num_stages=1,
                      launch={"gdn_chunk_states": (1, 1), "gdn_wy_inverse": (2, 3)})
  assert lowering.launch_params(plan, "gdn_wy_inverse") == (2, 3)
  assert lowering.launch_params(plan, "gdn_chunk_outputs") == (8, 1)
  hash(plan)


@pytest.mark.parametrize("launch,needle", [
    ("gdn_inverse=1/1", "unknown kernel 'gdn_inverse'"),
    ("gdn_wy_inverse=1", "kernel=warps/stages"),
    ("gdn_wy_inverse=a/1", "integers"),
    ("gdn_wy_inverse=0/1", "num_warps of 'gdn_wy_inverse' must be an integer >= 1"),
])
def test_plan_launch_errors_name_the_entry(launch, needle):
  from lte_jax.kernels.gated_delta_rule.backend import Plan
  with pytest.raises(ValueError, match=needle):
    Plan("gpu", launch=launch)


@pytest.mark.parametrize("dk,decay_on,fuse_wy,states_stages,grads_stages", [
    (256, "values", False, 2, 1),  # 3 stages of W, K, U tiles + the state: 254 KB > 227 KB
    (256, "values", True, 3, 2),   # T [C, C] in W's place: the table's stages fit
    (128, "values", False, 3, 2),  # the measured table fits: unchanged
    (256, "keys", False, 3, 2),    # K and Q pass through registers: not capped
])
def test_recurrence_stages_fit_shared_memory(monkeypatch, dk, decay_on, fuse_wy,
                                             states_stages, grads_stages):
  """The GPU recurrences' value-side form stages every step's loads in shared memory, so
  its stages are capped to what fits (Triton refused 3 stages at Dk = 256 on the H200);
  other kernels and forms keep their launch table. Traced only: the launch parameters
  are recorded where the pallas_call would be built."""
  from lte_jax.kernels import lowering
  seen = {}

  def record(kernel, *, name, num_stages, out_shape, **_):
    seen[name] = num_stages
    return lambda *args: [jnp.zeros(o.shape, o.dtype) for o in out_shape]

  monkeypatch.setattr(lowering, "call", record)

  def loss(q, k, v, g, beta):
    o, _ = chunk_gated_delta_rule_pallas(q, k, v, g, beta, scale=dk ** -0.5, platform="gpu",
                                         interpret=False, decay_on=decay_on, fuse_wy=fuse_wy,
                                         recurrence_block_v=64,   # as at 4x4096x8x256
                                         launch="gdn_chunk_states=4/3")  # at every Dk
    return o.astype(jnp.float32).sum()

  sds = helpers.sds
  jax.eval_shape(jax.grad(loss, argnums=(0, 1, 2)), sds(1, 256, 2, dk), sds(1, 256, 2, dk),
                 sds(1, 256, 2, dk), sds(1, 256, 2, dtype=jnp.float32), sds(1, 256, 2))
  assert seen["gdn_chunk_states"] == states_stages
  assert seen["gdn_chunk_state_grads"] == grads_stages
  assert seen["gdn_chunk_outputs"] == 3      # GPU_LAUNCH, untouched


@pytest.mark.parametrize("sequences,dv,want", [(16, 128, 16), (64, 128, 64), (32, 256, 64),
                                                (1, 64, 16), (128, 32, 32), (24, 128, 16)])
def test_recurrence_value_block_fills_the_gpu(sequences, dv, want):
  """The recurrences' value blocks halve until B * H * Dv / block reaches the program
  target, never below 16 columns; a given recurrence_block_v wins; TPU takes all of Dv."""
  assert Plan("gpu").recurrence_value_block(dv, sequences) == want
  assert Plan("gpu", recurrence_block_v=32).recurrence_value_block(dv, sequences) == min(32, dv)
  assert Plan("tpu").recurrence_value_block(dv, sequences) == dv


@pytest.mark.parametrize("dk,kernel,want", [
    (256, "gdn_chunk_states", 64),         # 8 warps above Dk = 128 (WIDE_KEY_LAUNCH): kept
    (256, "gdn_chunk_state_grads", 64),    # 8 warps: 64 a thread, kept
    (128, "gdn_chunk_states", 64),         # the Dk = 128 shapes keep their measured blocks
    (64, "gdn_chunk_states", 64),
])
def test_recurrence_value_block_keeps_the_state_in_registers(dk, kernel, want):
  """At (4, 4096, 8, 256) (32 sequences, Dv 256) the program target alone gives 64
  columns; the register cap halves them where the kernel's warps cannot hold the fp32
  [Dk, block] state in STATE_REGISTERS a thread. An explicit recurrence_block_v wins."""
  assert Plan("gpu").recurrence_value_block(256, 32, dk, kernel) == want
  assert Plan("gpu", recurrence_block_v=64).recurrence_value_block(256, 32, dk, kernel) == 64
  assert Plan("gpu", launch="gdn_chunk_states=8/3").recurrence_value_block(
      256, 32, 256, "gdn_chunk_states") == 64
  # 4 warps: [256, 64] fp32 would be 128 registers a thread (it spilled 880 bytes).
  assert Plan("gpu", launch="gdn_chunk_states=4/3").recurrence_value_block(
      256, 32, 256, "gdn_chunk_states") == 32


def test_plan_launch_for_wide_keys():
  """Above Dk = 128 the forward recurrence takes WIDE_KEY_LAUNCH's launch, unless the
  caller named the kernel in `launch` or gave uniform warps / stages; interpreted and
  TPU plans have no measured launches at any width."""
  from lte_jax.kernels.gated_delta_rule.backend import GPU_LAUNCH, WIDE_KEY_LAUNCH
  gpu = Plan("gpu")
  for name, wide in WIDE_KEY_LAUNCH.items():
    assert gpu.launch_for(name, 256) == wide
    assert gpu.launch_for(name, 128) == gpu.launch_for(name) == GPU_LAUNCH[name]
  assert Plan("gpu", launch="gdn_chunk_states=4/3").launch_for("gdn_chunk_states", 256) == (4, 3)
  assert Plan("gpu", launch="gdn_wy_inverse=2/1").launch_for("gdn_chunk_states", 256) == (8, 2)
  assert Plan("gpu", num_warps=4).launch_for("gdn_chunk_states", 256) == (4, 2)
  assert Plan("gpu", interpret=True).launch_for("gdn_chunk_states", 256) == (4, 2)
  # A field like any other: equal plans launch alike, and it can be set.
  assert gpu == Plan("gpu", launch=gpu.launch, wide_key_launch=gpu.wide_key_launch)
  assert gpu != Plan("gpu", launch=gpu.launch)      # names every kernel: no wide entries
  assert Plan("gpu", wide_key_launch="gdn_chunk_outputs=8/1").launch_for(
      "gdn_chunk_outputs", 256) == (8, 1)
  with pytest.raises(ValueError, match="unknown kernel 'states'"):
    Plan("gpu", wide_key_launch="states=8/2")


def test_decays_on_values_auto_per_recurrence():
  """'auto': the forward recurrence takes the decays on the value side on GPU at every
  Dk; the reverse one up to Dk = 128 (at 256 the key side was faster on the H100); TPU
  keeps the key side; an explicit choice applies to both."""
  gpu, tpu = Plan("gpu"), Plan("tpu")
  assert gpu.decays_on_values(256) and gpu.decays_on_values(128, backward=True)
  assert not gpu.decays_on_values(256, backward=True)
  assert not tpu.decays_on_values(64) and not tpu.decays_on_values(64, backward=True)
  assert not Plan("gpu", decay_on="keys").decays_on_values(64)
  assert Plan("gpu", decay_on="values").decays_on_values(256, backward=True)


@pytest.mark.parametrize("options,needle", [
    (dict(platform="cuda"), "platform"),
    (dict(platform="tpu", inverse_precision="tf32x3"), "inverse_precision"),
    (dict(platform="gpu", interpret=True, inverse_precision="tf32x3"), "inverse_precision"),
    (dict(platform="gpu", block_v=24), "block_v"),
    (dict(platform="gpu", inverse_form="lu"), "inverse_form"),
    (dict(platform="tpu", inverse_form="blocked"), "inverse_form must be one of"),
    (dict(platform="gpu", wy_operands="bf16"), "wy_operands"),
    (dict(platform="gpu", decay_on="queries"), "decay_on"),
    (dict(platform="gpu", qk_key_grid=1), "qk_key_grid must be True or False"),
    (dict(platform="gpu", output_value_grid="yes"), "output_value_grid must be True or False"),
    (dict(platform="gpu", recurrence_block_v=24), "recurrence_block_v must be a power of two"),
])
def test_kernel_plan_rejects_bad_options(options, needle):
  args = _inputs(1, 8, 1, 16, 16, jnp.float32)[:5]
  with pytest.raises(ValueError, match=needle):
    chunk_gated_delta_rule_pallas(*args, scale=0.25, **options)


_SHARDED = textwrap.dedent("""
    import jax, jax.numpy as jnp, numpy as np
    jax.config.update("jax_disable_most_optimizations", True)   # as tests/quick_compile.py
    from lte_jax.ops import chunk_gated_delta_rule
    from tests.test_gated_delta_rule import _inputs
    from tests import helpers
    q, k, v, g, beta, h0 = _inputs(4, 20, 2, 16, 16, jnp.float32, seed=9)
    seg = jnp.asarray(helpers.packed_segment_ids(np.random.default_rng(0), 4, 20))
    def loss(impl, q, k, v, g, beta, h0):
      o, h = chunk_gated_delta_rule(q, k, v, g, beta, initial_state=h0, segment_ids=seg,
                                    output_final_state=True, chunk_size=16,
                                    implementation=impl)
      return jnp.sum(o * jnp.cos(o)) + jnp.sum(h * h)
    want = jax.grad(lambda *a: loss("xla", *a), argnums=(0, 3, 5))(q, k, v, g, beta, h0)
    from lte_jax.training import make_mesh
    mesh = make_mesh(data=2, fsdp=1, tensor=2)
    with jax.set_mesh(mesh):
      f = jax.jit(jax.grad(lambda *a: loss("pallas", *a), argnums=(0, 3, 5)))
      text = f.lower(q, k, v, g, beta, h0).as_text()
      got = f(q, k, v, g, beta, h0)
    assert "shard_map" in text or "manual" in text, "kernels not under shard_map"
    for a, b in zip(got, want):
      err = helpers.rel_rms(a, b)
      assert err < 1e-4, err
    print("OK")
""")


def test_runs_per_shard_under_a_mesh():
  helpers.run_on_simulated_devices(_SHARDED)


# --- lowering ---------------------------------------------------------------------------

_sds = helpers.sds


# Both sizes with the default plans; every plan option at 1.4B (Dk = 256, past the
# wide-key launch threshold), where each kernel's tiles are the largest.
@pytest.mark.parametrize("platform,lowering,options,size", [
    ("gpu", "cuda", {}, "0.4B"), ("tpu", "tpu", {}, "0.4B"),
    ("gpu", "cuda", {}, "1.4B"), ("tpu", "tpu", {}, "1.4B")] + [
    ("gpu", "cuda", options, "1.4B") for options in (
        dict(inverse_precision="tf32", block_v=32, block_k=32, num_warps=8),
        dict(keep_states=True), dict(decay_on="keys"), dict(qk_key_grid=False),
        dict(recurrence_block_v=32), dict(output_value_grid=True), dict(fuse_wy=False))])
def test_lowers_at_preset_shapes(platform, lowering, options, size):
  g_cfg = configs.get_config("GDN", size).gdn
  b, t, h, dk = 1, 4096, g_cfg.num_heads, g_cfg.head_dim
  dv = int(dk * g_cfg.expand_v)

  def op(q, k, v, g, beta, h0, segment_ids):
    o, h_last = chunk_gated_delta_rule_pallas(
        q, k, v, g, beta, scale=dk ** -0.5, initial_state=h0, output_final_state=True,
        segment_ids=segment_ids, platform=platform, interpret=False, **options)
    return o.astype(jnp.float32).sum() + h_last.sum()

  args = (_sds(b, t, h, dk), _sds(b, t, h, dk), _sds(b, t, h, dv),
          _sds(b, t, h, dtype=jnp.float32), _sds(b, t, h), _sds(b, h, dk, dv, dtype=jnp.float32),
          _sds(b, t, dtype=jnp.int32))
  target = {"cuda": "__gpu$xla.gpu.triton", "tpu": "tpu_custom_call"}[lowering]
  # Forward: inverse, WY, states, outputs. With gradients: those, then WY and states
  # again (recomputed from the saved inverse, unless kept), local dV,
  # reverse states, dq/dk/dW, WY grads. fuse_wy: no WY transform, forward or backward.
  kept = options.get("keep_states", False)
  fused = (platform == "gpu" and options.get("fuse_wy", True) and not kept
           and options.get("decay_on") != "keys")
  for fn, kernels in ((op, 4 - fused), (jax.value_and_grad(op, argnums=tuple(range(6))),
                                        8 if kept else 10 - 2 * fused)):
    text = jax.jit(fn).trace(*args).lower(lowering_platforms=(lowering,)).as_text()
    assert text.count(f"@{target}(") == kernels, (target, text.count(f"@{target}("))
