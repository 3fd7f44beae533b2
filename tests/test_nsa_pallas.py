"""Pallas NSA (selected-block kernels): interpreted kernels vs the reference, errors, lowering.

The selected-block kernels (lte_jax.kernels.nsa_attention) run interpreted on CPU in both
forms: GPU ([B, T, Hkv, D] K/V, group and head dims padded to 16, the generic interpreter)
and TPU ([B, Hkv, T, D] K/V, integer tables in SMEM, the TPU interpreter, which raises on
out-of-bounds reads). nsa_attention(implementation='pallas') is compared with
implementation='reference', output and the gradients of q, k, v and the gates, per batch
row (a row of huge logits would otherwise hide the others' errors). Tolerances (relative
RMS): fp32 2e-5 (output) / 5e-5 (gradients), bf16 inputs 1e-2 / 2e-2 (the kernels' dots
take bf16 operands, the reference computes in fp32); rows of logits ~1e3 2e-4 for the
gradients (the backward recomputes probabilities from the fp32 lse, rounded at
|logit| * 2^-24 ~ 6e-5: lte_attention/tiles.py). A gradient is compared with an atol of 1e-2
times its row's gradient scale: with one key at every position dq is 0 in exact arithmetic
and ~1e-7 of rounding in both. Lowering for 'cuda' (Triton) and
'tpu' (Mosaic) runs at the laNSA 0.4B shape with T = 4096 on abstract inputs.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lte_jax import configs
from lte_jax.kernels.nsa_attention import make_plan, parse_options, selected_attention
from lte_jax.ops.attention.reference import masked_attention_reference
from lte_jax.ops.nsa_attention import nsa_attention
from lte_jax.ops.nsa_attention.pallas import nsa_attention_pallas
from tests import helpers
from tests.helpers import rel_rms
from tests.quick_compile import quick_compile  # noqa: F401  (autouse fixture)

TOLERANCES = {jnp.float32: (2e-5, 5e-5), jnp.bfloat16: (1e-2, 2e-2)}
HUGE_GRAD_TOL = 2e-4
BLOCK = 16


def _inputs(seed, batch, time, hq, hkv, d, dtype, rows=("random",)):
  """q, k, v, gates, dO; batch row r is built as rows[r % len(rows)]:
  'random' normals; 'same_keys' one key vector at every position (every compressed block
  ties: the earlier block wins); 'one_token' q, k, v all one repeated token;
  'huge' logits q . k * scale ~ 1e3 (the online softmax must not overflow)."""
  rng = np.random.default_rng(seed)
  normal = lambda *s: rng.standard_normal(s).astype(np.float32)
  q, k, v, do = (normal(batch, time, hq, d), normal(batch, time, hkv, d),
                 normal(batch, time, hkv, d), normal(batch, time, hq, d))
  for r in range(batch):
    kind = rows[r % len(rows)]
    if kind == "same_keys":
      k[r] = normal(1, hkv, d)
    elif kind == "one_token":
      q[r], k[r], v[r] = normal(1, hq, d), normal(1, hkv, d), normal(1, hkv, d)
    elif kind == "huge":
      q[r] *= 30.0
      k[r] *= 30.0
  gates = rng.uniform(size=(batch, time, hq, 3)).astype(np.float32)
  return tuple(jnp.asarray(x, dtype) for x in (q, k, v, gates, do))


@functools.partial(jax.jit, static_argnames=("kw", "platform"))
def _value_and_grads(q, k, v, gates, do, segment_ids, *, kw, platform):
  def loss(q, k, v, gates):
    if platform is None:
      o = nsa_attention(q, k, v, gates, segment_ids=segment_ids, implementation="reference",
                        **dict(kw))
    else:
      o = nsa_attention_pallas(q, k, v, gates, segment_ids=segment_ids, platform=platform,
                               interpret=True, scale=q.shape[-1] ** -0.5, **dict(kw))
    return jnp.sum(o.astype(jnp.float32) * do.astype(jnp.float32)), o
  (_, o), grads = jax.value_and_grad(loss, argnums=(0, 1, 2, 3), has_aux=True)(q, k, v, gates)
  return o, grads


def _rms(x) -> float:
  return float(np.sqrt(np.mean(np.asarray(x, np.float64) ** 2)))


def _assert_rows_match(got, want, dtype, rows):
  (o, grads), (o_ref, grads_ref) = got, want
  tol_o, tol_g = TOLERANCES[dtype]
  assert o.dtype == o_ref.dtype == dtype and o.shape == o_ref.shape
  for r in range(o.shape[0]):
    kind = rows[r % len(rows)]
    scale = max(_rms(g[r]) for g in grads_ref[:3])
    checks = [("o", o, o_ref, tol_o, 1e-5)] + [
        (name, g, g_ref, max(tol_g, HUGE_GRAD_TOL if kind == "huge" else 0), 1e-2 * scale)
        for name, g, g_ref in zip(("dq", "dk", "dv", "dgates"), grads, grads_ref)]
    for name, a, b, tol, atol in checks:
      assert a.dtype == b.dtype, name
      assert np.isfinite(np.asarray(a[r], np.float32)).all(), (name, kind)
      err = rel_rms(a[r], b[r], atol=atol)
      assert err < tol, (name, kind, err)


def _segments(rng, batch, time, packed_rows):
  """Packed documents (1-token ones and documents starting off the block grid) in the first
  packed_rows rows, one document in the others."""
  seg = np.ones((batch, time), np.int32)
  seg[:packed_rows] = helpers.packed_segment_ids(rng, packed_rows, time, lengths=(1, 3, 20, 37))
  return jnp.asarray(seg)


# (platform, batch rows, T, Hq, Hkv, D, block_count, window, packed rows, dtype). T off the
# block grid, G = 2; every adversarial row kind, the window and packed documents in the
# first case. G = 1 and the TPU form run in test_kernels_read_exactly_the_selected_blocks
# (the TPU interpreter is slow to compile).
CASES = [
    ("gpu", ("random", "same_keys", "one_token", "huge"), 75, 4, 2, 32, 4, 5, 1, jnp.float32),
    ("gpu", ("random", "huge"), 57, 4, 2, 16, 4, None, 1, jnp.bfloat16),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: (
    f"{c[0]}-T{c[2]}-H{c[3]}/{c[4]}-D{c[5]}-n{c[6]}-w{c[7]}-{jnp.dtype(c[9]).name}"))
def test_matches_reference(case):
  platform, rows, time, hq, hkv, d, block_count, window, packed, dtype = case
  q, k, v, gates, do = _inputs(time, len(rows), time, hq, hkv, d, dtype, rows)
  seg = _segments(np.random.default_rng(time), len(rows), time, packed)
  kw = tuple(dict(block_size=BLOCK, block_count=block_count, window_size=window).items())
  _assert_rows_match(_value_and_grads(q, k, v, gates, do, seg, kw=kw, platform=platform),
                     _value_and_grads(q, k, v, gates, do, seg, kw=kw, platform=None), dtype,
                     rows)


def _selected_mask(selected, seg):
  """selected [B, T, Hkv, C] (blocks of each query's document) -> [B, Hkv, T, T] mask."""
  time = seg.shape[1]
  starts = np.zeros_like(seg)
  for b in range(seg.shape[0]):
    for i in range(1, time):
      starts[b, i] = i if seg[b, i] != seg[b, i - 1] else starts[b, i - 1]
  i, j = np.arange(time)[:, None], np.arange(time)[None, :]
  mask = np.zeros((seg.shape[0], selected.shape[2], time, time), bool)
  for b in range(seg.shape[0]):
    s = starts[b][:, None]
    inside = (j >= s) & (j <= i)
    block = np.clip((j - s) // BLOCK, 0, selected.shape[-1] - 1)
    for h in range(selected.shape[2]):
      mask[b, h] = inside & np.take_along_axis(selected[b, :, h], block, axis=1)
  return mask


@pytest.mark.parametrize("platform,hq", [("gpu", 4), ("tpu", 2)])
def test_kernels_read_exactly_the_selected_blocks(platform, hq):
  """The kernels alone on an arbitrary selection (gaps, blocks off the grid in packed
  documents, queries that select nothing): output and q/k/v gradients equal masked
  attention; a query that sees nothing gets zeros and no NaN anywhere. G = 2 and 1. One
  short row: the TPU interpreter takes ~0.1 s a grid step."""
  batch, time, hkv, d = 1, 50, 2, 16
  q, k, v, _, do = _inputs(4, batch, time, hq, hkv, d, jnp.float32)
  rng = np.random.default_rng(4)
  # Documents of 3 and 1 tokens, one of 39 starting off the block grid, 7 tokens of padding.
  seg = np.repeat(np.asarray([[1, 2, 3, 0]], np.int32), [3, 1, 39, 7], axis=1)
  num_blocks = -(-time // BLOCK)
  selected = rng.uniform(size=(batch, time, hkv, num_blocks)) < 0.5
  selected[:, :7] = False          # the first queries select nothing
  # The kernels' contract: blocks of the query's document up to its own block.
  for b in range(batch):
    for i in range(time):
      start = np.nonzero(seg[b] == seg[b, i])[0][0]
      selected[b, i, :, (i - start) // BLOCK + 1:] = False
  mask = _selected_mask(selected, seg)
  assert not mask[:, :, :7].any() and mask.any(axis=-1).mean() > 0.5

  def grads(fn):
    loss = lambda q, k, v: jnp.sum(fn(q, k, v) * do)
    return jax.jit(lambda *a: (fn(*a), jax.grad(loss, argnums=(0, 1, 2))(*a)))(q, k, v)

  o, g = grads(lambda q, k, v: selected_attention(
      q, k, v, jnp.asarray(selected), block_size=BLOCK, block_count=num_blocks,
      segment_ids=jnp.asarray(seg), scale=d ** -0.5, platform=platform, interpret=True))
  o_ref, g_ref = grads(lambda q, k, v: masked_attention_reference(
      q, k, v, jnp.asarray(mask), scale=d ** -0.5))
  assert np.all(np.asarray(o[:, :7]) == 0)
  assert rel_rms(o, o_ref) < 2e-5
  for name, a, b in zip("qkv", g, g_ref):
    assert np.isfinite(np.asarray(a)).all(), name
    assert rel_rms(a, b) < 5e-5, name


@pytest.mark.parametrize("kwargs,needle", [
    (dict(block_size=12), "block_size must be a power of two >= 16"),
    (dict(block_size=8), "block_size must be a power of two >= 16"),
    (dict(implementation="xla", plan_options={"block_t": 2}), "plan_options is for"),
    (dict(plan_options={"block_q": 2}), "unknown keys"),
    (dict(plan_options={"block_t": 3}), "block_t must be a power of two"),
])
def test_bad_arguments_raise_value_errors(kwargs, needle):
  q, k, v, gates, _ = _inputs(0, 1, 32, 2, 1, 16, jnp.float32)
  kw = dict(block_size=16, block_count=3, window_size=None, implementation="pallas")
  with pytest.raises(ValueError, match=needle):
    jax.eval_shape(lambda *a: nsa_attention(*a, **{**kw, **kwargs}), q, k, v, gates)


def test_plan_defaults_and_parsing():
  assert make_plan("gpu", True).block_t == 1 and make_plan("tpu", True).block_t == 8
  assert parse_options("block_t=4;num_warps=2") == {"block_t": 4, "num_warps": 2}
  measured = make_plan("gpu", False)   # the measured launches apply on a real GPU only
  assert dict((n, (w, s)) for n, w, s in measured.launch) == {
      "nsa_selected_fwd": (2, 2), "nsa_selected_dq": (2, 2)}
  assert make_plan("gpu", True).launch == () and make_plan("gpu", False, dict(
      num_warps=8)).launch == ()
  plan = make_plan("gpu", False, dict(launch="nsa_selected_dkv=2/3"))
  assert ("nsa_selected_dkv", 2, 3) in plan.launch and plan.num_warps == 4
  assert ("nsa_selected_fwd", 2, 2) in plan.launch   # one entry does not drop the others
  with pytest.raises(ValueError, match="unknown kernel"):
    make_plan("gpu", False, dict(launch="nsa_dkv=2/3"))


# --- lowering ---------------------------------------------------------------------------


@pytest.mark.parametrize("platform,lowering", [("gpu", "cuda"), ("tpu", "tpu")])
def test_gradient_lowers_at_the_0_4b_shape(platform, lowering):
  """Forward and backward at laNSA 0.4B (Hq 32, Hkv 2, D 64, blocks of 64, 16 selected,
  window 512) with T = 4096: six kernels (selected forward, dq, dk/dv; window forward, dq,
  dk/dv). Nothing runs."""
  cfg = configs.get_config("laNSA", "0.4B").nsa
  b, t, d = 1, 4096, cfg.head_dim
  sds = helpers.sds
  args = (sds(b, t, cfg.num_heads, d), sds(b, t, cfg.num_kv_heads, d),
          sds(b, t, cfg.num_kv_heads, d), sds(b, t, cfg.num_heads, 3),
          sds(b, t, dtype=jnp.int32))

  def loss(q, k, v, gates, seg):
    return nsa_attention_pallas(q, k, v, gates, block_size=cfg.block_size,
                                block_count=cfg.block_count, window_size=cfg.window_size - 1,
                                segment_ids=seg, scale=d ** -0.5, platform=platform,
                                interpret=False).astype(jnp.float32).sum()

  text = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3))).trace(*args).lower(
      lowering_platforms=(lowering,)).as_text()
  target = {"cuda": "__gpu$xla.gpu.triton", "tpu": "tpu_custom_call"}[lowering]
  assert text.count(f"@{target}(") == 6


def test_nsa_layer_trains_the_same_on_the_kernels():
  """NSAAttention with NSAConfig.implementation='pallas' vs 'xla' (the laNSA training path):
  output and every parameter gradient (q/k/v/o projections, the gate projection), packed
  documents, GQA."""
  from flax import nnx
  from lte_jax.layers.nsa import NSAAttention
  rng = np.random.default_rng(5)
  x = jnp.asarray(rng.standard_normal((1, 48, 32)), jnp.float32)
  w = jnp.asarray(rng.standard_normal((1, 48, 32)), jnp.float32)
  seg = jnp.asarray(helpers.packed_segment_ids(rng, 1, 48))
  results = []
  for impl in ("xla", "pallas"):
    cfg = configs.NSAConfig(num_heads=4, num_kv_heads=2, head_dim=16, block_size=16,
                            block_count=3, window_size=20, implementation=impl)
    layer = NSAAttention(cfg, 32, num_layers=2, init_std=0.3, rngs=nnx.Rngs(0))
    loss = lambda m: jnp.sum(m(x, segment_ids=seg)[0] * w)
    results.append(nnx.jit(nnx.value_and_grad(loss))(layer))
  (l_xla, g_xla), (l_pallas, g_pallas) = results
  assert abs(float(l_pallas) - float(l_xla)) < 1e-4 * abs(float(l_xla))
  leaves_xla, leaves_pallas = jax.tree.leaves(g_xla), jax.tree.leaves(g_pallas)
  assert len(leaves_xla) == len(leaves_pallas) >= 5
  for a, b in zip(leaves_pallas, leaves_xla):
    assert rel_rms(a, b) < 1e-4


def test_default_implementation_per_backend_and_block_size():
  from lte_jax.ops.nsa_attention.api import default_implementation
  assert default_implementation("gpu", 64) == "pallas"
  assert default_implementation("gpu", 48) == "xla"   # not a power of two: no kernel for it
  assert default_implementation("gpu", 8) == "xla"    # below Triton's 16
  assert default_implementation("tpu", 64) == "xla"
  assert default_implementation("cpu", 64) == "xla"
