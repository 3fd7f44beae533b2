"""Short conv + SiLU: the Pallas kernels (interpreted) against the plain-JAX reference,
forward and both gradients, the public entry's checks, the sharded path, and lowering.

Shapes are ugly on purpose: T not a multiple of the row tile, channels not a multiple
of 16 (padded inside), K = 3 (taps padded to a power of two), documents that start
within K-1 tokens of each other and of a tile edge.
"""
from __future__ import annotations

import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lte_jax import configs
from lte_jax.kernels.short_conv import short_conv_pallas
from lte_jax.layers import ShortConv
from lte_jax.ops.short_conv import short_conv, short_conv_reference
from tests import helpers
from tests.quick_compile import quick_compile  # noqa: F401  (autouse fixture)


def _inputs(b, t, c, k, *, segments, dtype=jnp.float32, seed=0):
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.standard_normal((b, t, c)), dtype)
  w = jnp.asarray(0.5 * rng.standard_normal((k, c)), jnp.float32)
  seg = None
  if segments:
    starts = rng.random((b, t)) < 0.15
    starts[:, [1, 2, 16, 17]] = True           # neighbouring starts, one at a tile edge
    seg = jnp.asarray(np.cumsum(starts, axis=1), jnp.int32)
  dy = jnp.asarray(rng.standard_normal((b, t, c)), jnp.float32)
  return x, w, seg, dy


def _value_and_grads(fn, x, w, seg, dy):
  def loss(x, w):
    return jnp.sum(fn(x, w, seg).astype(jnp.float32) * dy)
  return fn(x, w, seg), jax.grad(loss, argnums=(0, 1))(x, w)


@pytest.mark.parametrize("b,t,c,k,segments,block_t,backward", [
    (2, 37, 5, 4, False, 16, "fused"),
    (2, 37, 5, 4, True, 16, "fused"),
    (2, 37, 5, 4, True, 16, "split"),
    (1, 70, 40, 3, True, 32, "fused"),
    (1, 70, 40, 3, False, 32, "split"),
    (1, 16, 16, 4, False, 16, "split"),
    (1, 50, 24, 2, True, 16, "fused"),
])
def test_kernels_match_reference(b, t, c, k, segments, block_t, backward):
  x, w, seg, dy = _inputs(b, t, c, k, segments=segments)
  kernel = lambda x, w, s: short_conv_pallas(x, w, s, block_t=block_t, block_c=16,
                                             backward=backward)
  y, (dx, dw) = _value_and_grads(kernel, x, w, seg, dy)
  y0, (dx0, dw0) = _value_and_grads(short_conv_reference, x, w, seg, dy)
  assert helpers.rel_rms(y, y0) < 1e-6
  assert helpers.rel_rms(dx, dx0) < 1e-6
  assert helpers.rel_rms(dw, dw0) < 1e-6


def test_bf16_inputs_keep_fp32_math():
  x, w, seg, dy = _inputs(2, 45, 20, 4, segments=True, dtype=jnp.bfloat16, seed=1)
  y, (dx, dw) = _value_and_grads(lambda x, w, s: short_conv(x, w, s, implementation="pallas"),
                                 x, w, seg, dy)
  y0, (dx0, dw0) = _value_and_grads(short_conv_reference, x, w, seg, dy)
  assert y.dtype == dx.dtype == jnp.bfloat16 and dw.dtype == jnp.float32
  assert helpers.rel_rms(y, y0) < 4e-3        # both round the fp32 result to bf16 once
  assert helpers.rel_rms(dx, dx0) < 4e-3
  assert helpers.rel_rms(dw, dw0) < 1e-5


def test_layer_implementations_agree():
  x, _, seg, _ = _inputs(2, 33, 12, 4, segments=True, seed=2)
  out = {}
  for impl in ("xla", "pallas"):
    conv = ShortConv(12, 4, init_std=0.5, implementation=impl, rngs=nnx.Rngs(0))
    out[impl] = conv(x, segment_ids=seg)
  assert helpers.rel_rms(out["pallas"], out["xla"]) < 1e-6
  cfg = configs.GDNConfig(num_heads=2, head_dim=16, conv_implementation="pallas")
  assert cfg.conv_implementation == "pallas"


def test_prefill_with_the_kernels_continues_the_state():
  """A long prefill (>= 64 rows: the kernels) from a non-empty conv state equals 'xla'."""
  x, _, _, _ = _inputs(2, 70, 12, 4, segments=False, seed=4)
  state = jnp.asarray(np.random.default_rng(5).standard_normal((2, 3, 12)), jnp.float32)
  out = {}
  for impl in ("xla", "pallas"):
    conv = ShortConv(12, 4, init_std=0.5, implementation=impl, rngs=nnx.Rngs(0))
    out[impl] = conv.prefill(x, state)
  assert helpers.rel_rms(out["pallas"][0], out["xla"][0]) < 1e-6
  np.testing.assert_array_equal(out["pallas"][1], out["xla"][1])


@pytest.mark.parametrize("kwargs,needle", [
    (dict(implementation="cuda"), "implementation"),
    (dict(implementation="xla", plan_options={"block_t": 16}), "plan_options"),
    (dict(implementation="pallas", plan_options={"block_rows": 16}), "block_rows"),
    (dict(implementation="pallas", plan_options={"block_t": 24}), "block_t"),
    (dict(implementation="pallas", plan_options={"backward": "both"}), "backward"),
    (dict(implementation="pallas", weight=jnp.zeros((18, 6)), plan_options={"block_t": 16}),
     "kernel_size"),
    (dict(weight=jnp.zeros((4, 7))), "weight"),
    (dict(x=jnp.zeros((2, 9, 6), jnp.int32)), "x"),
    (dict(segment_ids=jnp.zeros((2, 8), jnp.int32)), "segment_ids"),
])
def test_bad_arguments_raise_value_errors(kwargs, needle):
  args = dict(x=jnp.zeros((2, 9, 6)), weight=jnp.zeros((4, 6)), segment_ids=None)
  args.update(kwargs)
  with pytest.raises(ValueError, match=needle):
    short_conv(**args)


_SHARDED = textwrap.dedent("""
    import jax, jax.numpy as jnp
    from lte_jax.ops.short_conv import short_conv, short_conv_reference
    from lte_jax.training import make_mesh
    from tests import helpers
    from tests.test_short_conv import _inputs, _value_and_grads
    x, w, seg, dy = _inputs(4, 21, 32, 4, segments=True, seed=3)
    want = _value_and_grads(short_conv_reference, x, w, seg, dy)
    fn = lambda x, w, s: short_conv(x, w, s, implementation="pallas")
    with jax.set_mesh(make_mesh(data=2, fsdp=1, tensor=2)):
      run = jax.jit(lambda x, w, s: _value_and_grads(fn, x, w, s, dy))
      text = run.lower(x, w, seg).as_text()
      got = run(x, w, seg)
    assert "shard_map" in text or "manual" in text, "kernels not under shard_map"
    for g, r in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
      assert helpers.rel_rms(g, r) < 1e-6, helpers.rel_rms(g, r)
    print("OK")
""")


def test_runs_per_shard_under_a_mesh():
  helpers.run_on_simulated_devices(_SHARDED)


@pytest.mark.parametrize("size,segments,backward", [("0.4B", True, "fused"),
                                                    ("1.4B", False, "split")])
def test_lowers_for_cuda_at_preset_shapes(size, segments, backward):
  gdn = configs.get_config("GDN", size).gdn
  c = gdn.num_heads * gdn.head_dim
  x, w = helpers.sds(8, 4096, c), helpers.sds(gdn.conv_size, c, dtype=jnp.float32)
  seg = helpers.sds(8, 4096, dtype=jnp.int32) if segments else None

  def step(x, w, seg):
    y, vjp = jax.vjp(lambda x, w: short_conv_pallas(x, w, seg, interpret=False,
                                                    backward=backward), x, w)
    return y, vjp(y)

  text = jax.jit(step).trace(x, w, seg).lower(lowering_platforms=("cuda",)).as_text()
  # The forward, then one backward kernel (fused) or two (split).
  assert text.count("@__gpu$xla.gpu.triton(") == (2 if backward == "fused" else 3)
