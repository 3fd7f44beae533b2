"""Native Sparse Attention: a float64 loop definition, reference vs XLA (forward and grads),
block edges, the layer's prefill + decode against its full forward, and argument errors.

How the compression branch is trained (as the reference, fla's parallel_nsa): through its
own output only. o_cmp reaches q and, through the mean pooling, k and v; the selection reads
the compression probabilities but is a hard top-n choice with no gradient.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lte_jax import configs
from lte_jax.layers import NSAAttention
from lte_jax.ops import attention
from lte_jax.ops.attention.reference import masked_attention_reference
from lte_jax.ops.nsa_attention import nsa_attention, nsa_decode
from lte_jax.ops.nsa_attention import xla as nsa_xla
from lte_jax.training import metrics
from tests import helpers
from tests.helpers import rel_rms
from tests.quick_compile import quick_compile  # noqa: F401  (autouse fixture)

STATIC = ("block_size", "block_count", "window_size", "implementation")
nsa_jit = jax.jit(nsa_attention, static_argnames=STATIC)
attention_jit = jax.jit(attention)


def make_inputs(seed, batch, time, num_heads, num_kv_heads, head_dim):
  rng = np.random.default_rng(seed)
  shapes = [(batch, time, num_heads, head_dim), (batch, time, num_kv_heads, head_dim),
            (batch, time, num_kv_heads, head_dim), (batch, time, num_heads, head_dim)]
  q, k, v, do = (rng.standard_normal(s).astype(np.float32) for s in shapes)
  gates = rng.uniform(size=(batch, time, num_heads, 3)).astype(np.float32)
  return q, k, v, gates, do


def _softmax_attend(q, k, v, scale):
  """q [G, D], k [S, D], v [S, Dv] -> [G, Dv] in float64."""
  logits = q @ k.T * scale
  p = np.exp(logits - logits.max(-1, keepdims=True))
  return (p / p.sum(-1, keepdims=True)) @ v, p / p.sum(-1, keepdims=True)


def nsa_loops(q, k, v, gates, seg, *, block_size, block_count, window_size):
  """float64 NSA by plain loops -> (o [B, T, Hq, Dv], selected-token mask [B, Hkv, T, T])."""
  q, k, v, gates = (np.asarray(x, np.float64) for x in (q, k, v, gates))
  batch, time, num_heads, head_dim = q.shape
  num_kv_heads = k.shape[2]
  group, scale = num_heads // num_kv_heads, head_dim ** -0.5
  o = np.zeros(q.shape[:3] + (v.shape[-1],))
  mask = np.zeros((batch, num_kv_heads, time, time), bool)
  for b in range(batch):
    start = 0
    for i in range(time):
      if i and seg[b, i] != seg[b, i - 1]:
        start = i
      p, cur = i - start, (i - start) // block_size
      for h in range(num_kv_heads):
        heads = slice(h * group, (h + 1) * group)
        qs = q[b, i, heads]
        blocks = [slice(start + c * block_size, start + (c + 1) * block_size)
                  for c in range((p + 1) // block_size)]
        o_cmp, importance = np.zeros((group, v.shape[-1])), None
        if blocks:
          k_cmp = np.stack([k[b, s, h].mean(0) for s in blocks])
          v_cmp = np.stack([v[b, s, h].mean(0) for s in blocks])
          o_cmp, probs = _softmax_attend(qs, k_cmp, v_cmp, scale)
          importance = probs.sum(0)
        forced = sorted({0, cur - 1, cur} & set(range(cur + 1)))
        free = sorted(range(1, cur - 1), key=lambda c: (-importance[c], c))
        chosen = set(forced + free[:block_count - len(forced)])
        keys = [j for j in range(start, i + 1) if (j - start) // block_size in chosen]
        mask[b, h, i, keys] = True
        o_slc, _ = _softmax_attend(qs, k[b, keys, h], v[b, keys, h], scale)
        out = gates[b, i, heads, 0:1] * o_cmp + gates[b, i, heads, 1:2] * o_slc
        if window_size is not None:
          win = list(range(max(start, i - window_size), i + 1))
          o_swa, _ = _softmax_attend(qs, k[b, win, h], v[b, win, h], scale)
          out = out + gates[b, i, heads, 2:3] * o_swa
        o[b, i, heads] = out
  return o, mask


@functools.partial(jax.jit, static_argnames=STATIC + ("block_q",))
def value_and_grads(q, k, v, gates, do, segment_ids, *, block_size, block_count, window_size,
                    implementation, block_q=None):
  def loss(q, k, v, gates):
    kw = dict(block_size=block_size, block_count=block_count, window_size=window_size,
              segment_ids=segment_ids)
    if block_q is not None:  # the XLA path with several query blocks
      o = nsa_xla.nsa_attention_xla(q, k, v, gates, scale=q.shape[-1] ** -0.5,
                                    block_q=block_q, **kw)
    else:
      o = nsa_attention(q, k, v, gates, implementation=implementation, **kw)
    return jnp.sum(o * do), o
  (_, o), grads = jax.value_and_grad(loss, argnums=(0, 1, 2, 3), has_aux=True)(q, k, v, gates)
  return o, grads


# (time, block_size, block_count, window, heads, kv_heads, packed): T off the block grid with
# free picks, packed documents, GQA group 4 without a window, exactly one 64-token block,
# 64-token blocks with fewer blocks than n.
CASES = [
    (45, 4, 4, 5, 4, 2, False),
    (45, 4, 4, 5, 4, 2, True),
    (37, 4, 5, None, 4, 1, False),
    (64, 64, 16, 511, 2, 1, False),
    (150, 64, 16, 40, 2, 1, True),
]


@pytest.mark.parametrize("time,block_size,block_count,window,heads,kv_heads,packed", CASES)
def test_xla_and_reference_match_loops_forward_and_grads(time, block_size, block_count, window,
                                                         heads, kv_heads, packed):
  rng = np.random.default_rng(time)
  q, k, v, gates, do = make_inputs(time, 2, time, heads, kv_heads, 8)
  seg = (helpers.packed_segment_ids(rng, 2, time, lengths=(1, 3, 9, 30, 70))
         if packed else np.ones((2, time), np.int32))
  kw = dict(block_size=block_size, block_count=block_count, window_size=window)
  want, _ = nsa_loops(q, k, v, gates, seg, **kw)
  seg_arg = jnp.asarray(seg) if packed else None
  o_ref, g_ref = value_and_grads(q, k, v, gates, do, seg_arg, implementation="reference", **kw)
  o_xla, g_xla = value_and_grads(q, k, v, gates, do, seg_arg, implementation="xla", **kw)
  assert rel_rms(o_ref, want) < 1e-5
  assert rel_rms(o_xla, want) < 1e-5
  for name, got, ref in zip(("dq", "dk", "dv", "dgates"), g_xla, g_ref):
    assert rel_rms(got, ref) < 1e-5, name
  assert float(jnp.abs(g_ref[1]).max()) > 0


def test_xla_query_blocks_match_one_block():
  """Several query blocks (lax.map in the selection and the softmax) change nothing."""
  q, k, v, gates, do = make_inputs(7, 1, 53, 4, 2, 8)
  kw = dict(block_size=4, block_count=4, window_size=6)
  one, g_one = value_and_grads(q, k, v, gates, do, None, implementation="xla", **kw)
  many, g_many = value_and_grads(q, k, v, gates, do, None, implementation="xla", block_q=16, **kw)
  assert rel_rms(many, one) < 1e-6
  for got, want in zip(g_many, g_one):
    assert rel_rms(got, want) < 1e-6


def test_selection_carries_no_gradient():
  """With only the selected branch on, gradients are those of attention under a FIXED mask."""
  q, k, v, gates, do = make_inputs(3, 1, 41, 4, 2, 8)
  gates = np.broadcast_to(np.asarray([0.0, 1.0, 0.0], np.float32), gates.shape)
  kw = dict(block_size=4, block_count=4, window_size=5)
  _, mask = nsa_loops(q, k, v, gates, np.ones((1, 41), np.int32), **kw)
  assert not mask.all(axis=-1).any() and mask.sum() < np.tril(np.ones((41, 41))).sum() * 2

  def fixed(q, k, v):
    return jnp.sum(masked_attention_reference(q, k, v, jnp.asarray(mask), scale=8 ** -0.5) * do)
  want = jax.grad(fixed, argnums=(0, 1, 2))(q, k, v)
  _, got = value_and_grads(q, k, v, gates, do, None, implementation="xla", **kw)
  for g, w in zip(got[:3], want):
    assert rel_rms(g, w) < 1e-5


def test_block_edges():
  q, k, v, _, _ = make_inputs(11, 1, 130, 2, 1, 8)
  ones = np.ones(q.shape[:3] + (3,), np.float32)
  only = lambda i: ones * np.eye(3, dtype=np.float32)[i]  # noqa: E731
  kw = dict(block_size=64, block_count=16, window_size=None)
  # Before the first block is complete the compression branch outputs zeros; the 64th
  # token sees exactly one compressed block: the mean of the block's values.
  o_cmp = np.asarray(nsa_jit(q, k, v, only(0), **kw))
  assert np.all(o_cmp[:, :63] == 0)
  np.testing.assert_allclose(o_cmp[0, 63, 0], v[0, :64, 0].mean(0), rtol=1e-5, atol=1e-6)
  assert np.all(np.abs(o_cmp[:, 64:]) > 0)
  # 3 blocks < n = 16: every block is selected, so the selected branch is causal attention.
  o_slc = nsa_jit(q, k, v, only(1), **kw)
  np.testing.assert_allclose(o_slc, attention_jit(q, k, v), rtol=1e-5, atol=1e-6)
  # Fewer tokens than one block.
  short = nsa_jit(q[:, :5], k[:, :5], v[:, :5], ones[:, :5], **kw)
  np.testing.assert_allclose(short, attention_jit(q[:, :5], k[:, :5], v[:, :5]), rtol=1e-5,
                             atol=1e-6)


def _layer(init_std=0.3):
  cfg = configs.NSAConfig(num_heads=4, num_kv_heads=2, head_dim=8, block_size=4, block_count=4,
                          window_size=6)
  return NSAAttention(cfg, 16, num_layers=2, init_std=init_std, rngs=nnx.Rngs(0))


@pytest.mark.parametrize("prompt_len", [1, 4, 10])
def test_layer_prefill_then_decode_matches_full_forward(prompt_len):
  layer = _layer()
  total = 30
  x = jnp.asarray(np.random.default_rng(prompt_len).standard_normal((2, total, 16)), jnp.float32)
  full, _ = nnx.jit(lambda m, x: m(x))(layer, x)
  cache = layer.init_cache(2, total - 1)  # rounds up to whole blocks: 32 slots
  assert cache["k"].shape == (2, 32, 2, 8) and cache["k_cmp"].shape == (2, 8, 2, 8)
  y, cache = nnx.jit(lambda m, x, c: m.prefill(x, c))(layer, x[:, :prompt_len], cache)
  steps = [y]
  decode = nnx.jit(lambda m, t, c: m.decode(t, c))
  for t in range(prompt_len, total):
    y, cache = decode(layer, x[:, t:t + 1], cache)
    steps.append(y)
  np.testing.assert_allclose(jnp.concatenate(steps, axis=1), full, rtol=1e-4, atol=1e-5)
  # The compressed cache holds the mean of each complete block's keys.
  np.testing.assert_allclose(cache["k_cmp"][:, 6], cache["k"][:, 24:28].mean(1), rtol=1e-5,
                             atol=1e-6)


def test_layer_segment_ids_isolate_documents():
  layer = _layer()
  rng = np.random.default_rng(4)
  a, b = (jnp.asarray(rng.standard_normal((1, n, 16)), jnp.float32) for n in (13, 22))
  seg = jnp.asarray([[1] * 13 + [2] * 22], jnp.int32)
  forward = nnx.jit(lambda m, x, s: m(x, segment_ids=s)[0])
  got = forward(layer, jnp.concatenate([a, b], axis=1), seg)
  want = jnp.concatenate([forward(layer, a, seg[:, :13]), forward(layer, b, seg[:, 13:])], axis=1)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_gates_are_sigmoid_per_branch_per_query_head():
  layer = _layer()
  x = jnp.asarray(np.random.default_rng(5).standard_normal((1, 3, 16)), jnp.float32)
  _, _, _, gates = layer._project(x, jnp.zeros((1, 3), jnp.int32))
  logits = (x @ layer.g_proj.kernel[...]).reshape(1, 3, 4, 3)
  np.testing.assert_allclose(gates, jax.nn.sigmoid(logits), rtol=1e-6)


def _bad_calls():
  q, k, v, g, _ = (jnp.asarray(a) for a in make_inputs(0, 1, 8, 4, 2, 8))
  k_cache = jnp.zeros((1, 8, 2, 8))
  k_cmp = jnp.zeros((1, 2, 2, 8))
  op = functools.partial(nsa_attention, block_size=4, block_count=4, window_size=3)
  layer = _layer()
  cache = layer.init_cache(1, 8)
  return [
      (lambda: op(q, k, v, g[..., :2]), "gates"),
      (lambda: op(q, k, v, g.astype(jnp.int32)), "gates"),
      (lambda: op(q, jnp.zeros((1, 8, 3, 8)), jnp.zeros((1, 8, 3, 8)), g), "multiple"),
      (lambda: op(q, k, v, g, block_count=2), "block_count"),
      (lambda: op(q, k, v, g, block_size=0), "block_size"),
      (lambda: op(q, k, v, g, window_size=-1), "window_size"),
      (lambda: op(q, k, v, g, segment_ids=jnp.zeros((1, 9), jnp.int32)), "segment_ids"),
      (lambda: op(q, k, v, g, implementation="pallas"), "power of two >= 16"),
      (lambda: op(q, k, v, g, implementation="triton"), "implementation"),
      (lambda: nsa_decode(q[:, :1], k_cache[:, :6], k_cache[:, :6], k_cmp, k_cmp, g[:, :1],
                          jnp.int32(0), block_size=4), "multiple of block_size"),
      (lambda: nsa_decode(q[:, :1], k_cache, k_cache, k_cmp[:, :1], k_cmp, g[:, :1],
                          jnp.int32(0), block_size=4), "k_cmp"),
      (lambda: nsa_decode(q[:, :1], k_cache, k_cache, k_cmp, k_cmp, g[:, :1],
                          jnp.zeros((1,), jnp.int32), block_size=4), "position"),
      (lambda: configs.NSAConfig(block_count=2), "NSAConfig.block_count"),
      (lambda: configs.NSAConfig(num_kv_heads=3), "NSAConfig.num_kv_heads"),
      (lambda: configs.NSAConfig(window_size=0), "NSAConfig.window_size"),
      (lambda: NSAAttention(configs.LTEConfig(), 16, num_layers=2, init_std=0.1,
                            rngs=nnx.Rngs(0)), "NSAConfig"),
      (lambda: layer.prefill(jnp.zeros((1, 9, 16)), cache), "larger max_len"),
      (lambda: layer.decode(jnp.zeros((1, 1, 16)), dict(cache, extra=0)), "cache"),
      (lambda: layer(jnp.zeros((1, 4, 15))), "x"),
  ]


@pytest.mark.parametrize("index", range(19))
def test_bad_inputs_raise_value_error(index):
  call, match = _bad_calls()[index]
  with pytest.raises(ValueError, match=match):
    call()


def test_lansa_preset_shapes():
  for size in ("0.4B", "1.4B"):
    cfg = configs.get_config("laNSA", size)
    assert cfg.layers[0::2] == ("gdn",) * 12 and cfg.layers[1::2] == ("nsa",) * 12
    n = cfg.nsa
    assert (n.num_heads, n.num_kv_heads, n.head_dim) == (32, 2, 64)
    assert (n.block_size, n.block_count, n.window_size) == (64, 16, 512)


def test_nsa_flops_per_token():
  cfg = configs.get_config("laNSA", "0.4B")
  per_token = lambda t: metrics._mixer_flops("nsa", cfg, t)  # noqa: E731
  heads_dim = 4.0 * 32 * 64  # QK^T and PV over 32 heads of 64
  # Past 16 blocks and the window only the compressed keys grow: T / (2 x 64) of them.
  assert per_token(8192) - per_token(4096) == pytest.approx(heads_dim * 4096 / 128)
  # Short sequences: the selected blocks and the window are capped by the causal context.
  assert per_token(63) == pytest.approx(heads_dim * (63 / 128 + 32 + 32))


@pytest.mark.parametrize("platform", ["tpu", "cuda"])
def test_xla_path_lowers_at_paper_shape(platform):
  """Forward + gradients at the preset shape (T = 4096, bf16, packed) lower for TPU and CUDA
  on this CPU-only machine: nothing is allocated or run."""
  n = configs.get_config("laNSA", "1.4B").nsa
  b, t = 1, 4096
  sds = lambda *shape, dtype=jnp.bfloat16: jax.ShapeDtypeStruct(shape, dtype)  # noqa: E731
  args = (sds(b, t, n.num_heads, n.head_dim), sds(b, t, n.num_kv_heads, n.head_dim),
          sds(b, t, n.num_kv_heads, n.head_dim), sds(b, t, n.num_heads, 3),
          sds(b, t, dtype=jnp.int32))

  def loss(q, k, v, gates, segment_ids):
    o = nsa_attention(q, k, v, gates, block_size=n.block_size, block_count=n.block_count,
                      window_size=n.window_size - 1, segment_ids=segment_ids,
                      implementation="xla")
    return o.astype(jnp.float32).sum()

  grad = jax.grad(loss, argnums=(0, 1, 2, 3))
  text = jax.jit(grad).trace(*args).lower(lowering_platforms=(platform,)).as_text()
  assert "func.func public @main" in text
