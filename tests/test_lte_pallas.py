"""Pallas LTE / sliding-window attention: interpreted kernels vs the reference, work bounds, lowering.

The kernels run interpreted on CPU in both forms: the GPU form (token tensors as
[B, T, H, D], generic interpreter) and the TPU form ([B, H, T, D], loop bounds in
SMEM; the TPU interpreter, which raises on out-of-bounds reads). Every case
compares the output and the gradients of q, k, v and the scores with the
'reference' implementation, at the tolerances of tests/test_lte_attention.py.
Lowering for 'cuda' (Triton) and 'tpu' (Mosaic) runs at the 0.4B and 1.4B laLTE
shapes with T = 4096 on abstract inputs, so nothing is allocated.
"""
from __future__ import annotations

import functools
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lte_jax import configs
from lte_jax.kernels.lte_attention import (Plan, make_plan, parse_options, sets,
                                           sliding_window_attention_pallas)
from lte_jax.ops import attention, lte_attention
from lte_jax.ops.lte_attention.pallas import lte_attention_pallas
from tests import helpers
from tests.helpers import rel_rms
from tests.test_lte_attention import grads_of, make_inputs, packed_segment_ids
from tests.quick_compile import quick_compile  # noqa: F401  (autouse fixture)

TOLERANCES = {jnp.float32: (2e-5, 5e-5), jnp.bfloat16: (1e-2, 2e-2)}
SMALL = dict(block_q=16, block_k=16)


def _retention(r, pattern):
  """Scores with about half retained ('random'), all retained or none."""
  return {"random": r, "all": jnp.abs(r) + 0.1, "none": -jnp.abs(r) - 0.1}[pattern]


def _assert_matches(got, want, dtype):
  (o, grads), (o_ref, grads_ref) = got, want
  tol_o, tol_g = TOLERANCES[dtype]
  assert o.dtype == o_ref.dtype and o.shape == o_ref.shape
  assert rel_rms(o, o_ref) < tol_o, ("o", rel_rms(o, o_ref))
  for name, g, g_ref in zip(("q", "k", "v", "scores"), grads, grads_ref):
    assert g.dtype == g_ref.dtype, name
    assert rel_rms(g, g_ref) < tol_g, (name, rel_rms(g, g_ref))


# (batch, T, Hq, Hkv, D, Dv, sink, window, budget, documents, retained, dtype, platform,
#  plan options). T of 70 and 130 (no block multiple), GQA and not, D of 48 (padded to
# 64 on GPU), windows below and above T, budgets, all / none retained (none: the far
# part is empty, sliding-window attention with sinks), dk/dv tiles unlike the forward's,
# far tiles every query of a tile reads (unmasked; test_unmasked_far_tiles_... checks the
# sets).
CASES = [
    (2, 70, 4, 2, 32, 16, 2, 5, None, True, "random", jnp.float32, "gpu", SMALL),
    (1, 130, 4, 2, 48, 24, 4, 20, None, True, "random", jnp.bfloat16, "gpu",
     dict(block_q=32, block_k=16, block_q_dkv=16, block_k_dkv=32)),
    (1, 130, 2, 2, 32, 32, 1, 200, None, False, "random", jnp.float32, "gpu", SMALL),
    (2, 70, 4, 2, 32, 16, 2, 5, 6, True, "random", jnp.float32, "gpu", SMALL),
    (1, 130, 4, 1, 16, 16, 3, 9, 12, False, "random", jnp.bfloat16, "gpu",
     dict(block_q=16, block_k=32)),
    (1, 70, 2, 1, 32, 32, 2, 4, None, True, "all", jnp.float32, "gpu", SMALL),
    (1, 70, 4, 2, 32, 16, 0, 7, None, True, "none", jnp.bfloat16, "gpu", SMALL),
    (2, 70, 4, 2, 32, 16, 2, 5, None, True, "random", jnp.float32, "tpu", SMALL),
    (1, 130, 4, 2, 32, 16, 3, 9, 12, True, "random", jnp.bfloat16, "tpu",
     dict(block_q=32, block_k=16, block_q_dkv=16, block_k_dkv=32)),
    (1, 70, 2, 2, 48, 32, 0, 100, None, False, "all", jnp.float32, "tpu", SMALL),
    # One document, no budget, w well under T: whole far tiles skip the masking.
    (1, 130, 2, 2, 32, 32, 2, 9, None, False, "random", jnp.float32, "gpu", SMALL),
    (1, 130, 2, 1, 32, 16, 2, 9, None, False, "all", jnp.bfloat16, "tpu", SMALL),
    # T a multiple of every block: no padded rows, so the empty far slots the GPU default
    # (far_gather='kernel') points at the last row point at a real token, as at T = 4096.
    (2, 64, 4, 2, 16, 16, 1, 5, None, True, "random", jnp.float32, "gpu", SMALL),
    # The GPU default gathers far keys' rows in the kernels (Plan.far_gather); XLA copies
    # them here: GQA with documents, a budget, and everything kept (unmasked far tiles).
    (2, 70, 4, 2, 32, 16, 2, 5, None, True, "random", jnp.float32, "gpu",
     dict(SMALL, far_gather="copy")),
    (1, 130, 4, 1, 16, 16, 3, 9, 12, False, "random", jnp.bfloat16, "gpu",
     dict(block_q=16, block_k=32, far_gather="copy")),
    (1, 130, 2, 2, 32, 32, 2, 9, None, False, "all", jnp.float32, "gpu",
     dict(block_q=32, block_k=16, block_q_dkv=16, block_k_dkv=32, far_gather="copy")),
]


@functools.lru_cache(maxsize=None)
def _lte_fn(impl, sink, window, budget, platform, options):
  def fn(q, k, v, r, seg):
    kw = dict(sink_size=sink, window_size=window, budget=budget, segment_ids=seg)
    if impl == "reference":
      return lte_attention(q, k, v, r, implementation="reference", **kw)
    return lte_attention_pallas(q, k, v, r, scale=q.shape[-1] ** -0.5, platform=platform,
                                interpret=True, plan_options=dict(options), **kw)
  return fn


@pytest.mark.parametrize("case", CASES, ids=lambda c: (
    f"{c[12]}-T{c[1]}-H{c[2]}/{c[3]}-D{c[4]}/{c[5]}-s{c[6]}-w{c[7]}-b{c[8]}-{c[10]}-"
    f"{jnp.dtype(c[11]).name}"))
def test_lte_matches_reference(case):
  batch, time, hq, hkv, d, dv, sink, window, budget, docs, pattern, dtype, platform, opts = case
  q, k, v, r, do = make_inputs(time + d, batch, time, hq, hkv, d, dv, dtype)
  r = _retention(r, pattern)
  seg = jnp.asarray(packed_segment_ids(np.random.default_rng(time), batch, time)) if docs else None
  args = dict(sink=sink, window=window, budget=budget)
  ref = _lte_fn("reference", *args.values(), None, None)
  got = _lte_fn("pallas", *args.values(), platform, tuple(sorted(opts.items())))
  _assert_matches(grads_of(lambda *a: got(*a, seg), q, k, v, r, do),
                  grads_of(lambda *a: ref(*a, seg), q, k, v, r, do), dtype)


@pytest.mark.parametrize("platform,window,docs,dtype", [
    ("gpu", 5, True, jnp.float32), ("gpu", None, True, jnp.bfloat16),
    ("gpu", 0, False, jnp.float32), ("tpu", 9, True, jnp.float32),
    ("tpu", None, False, jnp.bfloat16)])
def test_sliding_window_matches_reference(platform, window, docs, dtype):
  batch, time, hq, hkv, d = 2, 70, 4, 2, 32
  q, k, v, _, do = make_inputs(3, batch, time, hq, hkv, d, d, dtype)
  seg = jnp.asarray(packed_segment_ids(np.random.default_rng(3), batch, time)) if docs else None

  def grads(fn):
    loss = lambda q, k, v: jnp.sum(fn(q, k, v).astype(jnp.float32) * do.astype(jnp.float32))
    return jax.jit(lambda *a: (fn(*a), jax.grad(loss, argnums=(0, 1, 2))(*a)))(q, k, v)

  o, g = grads(lambda q, k, v: sliding_window_attention_pallas(
      q, k, v, window_size=window, segment_ids=seg, scale=d ** -0.5, platform=platform,
      interpret=True, plan_options=SMALL))
  o_ref, g_ref = grads(lambda q, k, v: attention(q, k, v, window_size=window, segment_ids=seg,
                                                 implementation="reference"))
  tol_o, tol_g = TOLERANCES[dtype]
  assert o.dtype == dtype and rel_rms(o, o_ref) < tol_o
  # With window 0 a query reads itself only: dq is exactly 0 in the reference.
  atol = 1e-2 if window == 0 else 1e-5
  for name, a, b in zip("qkv", g, g_ref):
    assert rel_rms(a, b, atol=atol) < tol_g, name


def test_public_entry_points_run_the_kernels():
  """implementation='pallas' with plan_options, as the benchmark calls it (interpreted on CPU)."""
  q, k, v, r, do = make_inputs(5, 1, 40, 4, 2, 16, 16, jnp.float32)
  kw = dict(sink_size=2, window_size=6, budget=9)
  fn = lambda impl, **o: (lambda q, k, v, r: lte_attention(q, k, v, r, implementation=impl,
                                                           **kw, **o))
  _assert_matches(grads_of(fn("pallas", plan_options=parse_options("block_q=16;block_k=16")),
                           q, k, v, r, do),
                  grads_of(fn("reference"), q, k, v, r, do), jnp.float32)
  o = attention(q, k, v, window_size=6, implementation="pallas")
  o_ref = attention(q, k, v, window_size=6, implementation="reference")
  assert rel_rms(o, o_ref) < 2e-5


def test_work_follows_the_attended_set():
  """The loop bounds visit the band tiles and only the compact tiles of kept keys:
  with 5 retained tokens in 512 a query tile reads <= 1 far tile, not T / 16."""
  time, window, block = 512, 40, 16
  rng = np.random.default_rng(0)
  keep = np.zeros((1, time, 1), bool)
  keep[0, rng.choice(np.arange(100, 400), 5, replace=False), 0] = True
  docs = sets.documents(None, 1, time, time)
  lo = sets.band_starts(docs, window)
  far = sets.far_keys(jnp.asarray(keep), None, docs, window)
  bounds = np.asarray(sets.query_bounds(lo, docs, far, window=window, time=time,
                                        block_q=block, block_k=block)).reshape(-1, 8)
  band_tiles, far_tiles = bounds[:, 3] - bounds[:, 0], bounds[:, 7] - bounds[:, 4]
  assert band_tiles.max() <= -(-(window + block) // block) + 1
  assert far_tiles.max() == 1 and far_tiles[:8].sum() == 0   # nothing far before 100 + w
  assert int(far.before[0, 0, -1]) == 5
  # The band dk/dv kernel: a key tile is read by the query tiles within w of it.
  kb = np.asarray(sets.band_key_bounds(lo, docs, window=window, block_q=block,
                                       block_k=block)).reshape(-1, 4)
  assert (kb[:, 3] - kb[:, 0]).max() <= -(-(window + block) // block) + 1
  # Far dk/dv: only the one compact tile holding keys reads queries.
  fb = np.asarray(sets.far_key_bounds(far, window=window, block_q=block,
                                      block_k=block)).reshape(-1, 4)
  assert (fb[1:, 3] - fb[1:, 0]).sum() == 0 and fb[0, 3] > fb[0, 0]


@pytest.mark.parametrize("block_q,block_k", [(16, 16), (32, 16), (16, 32)])
def test_unmasked_band_tiles_are_exactly_the_fully_visible_ones(block_q, block_k):
  """The band ranges that skip masking ([full_lo, full_hi) of both tables) hold exactly
  the (query tile, key tile) pairs whose every pair (i, j) has lo_i <= j <= i, packed
  documents, padding rows and a window over several tiles included; they sit inside the
  band range."""
  time, padded, window = 150, 160, 60
  seg = jnp.asarray(np.repeat([1, 2, 3], [90, 50, 10])[None], jnp.int32)
  docs = sets.documents(seg, 1, time, padded)
  lo = sets.band_starts(docs, window)
  lo_np = np.asarray(lo)[0]
  i = np.arange(padded)
  visible = (lo_np[:, None] <= i[None, :]) & (i[None, :] <= i[:, None])   # [query, key]
  nq, nk = padded // block_q, padded // block_k
  full = visible.reshape(nq, block_q, nk, block_k).all(axis=(1, 3))        # [qt, kt]
  anything = visible.reshape(nq, block_q, nk, block_k).any(axis=(1, 3))
  qb = np.asarray(sets.query_bounds(lo, docs, None, window=window, time=time,
                                    block_q=block_q, block_k=block_k)).reshape(nq, 8)
  kb = np.asarray(sets.band_key_bounds(lo, docs, window=window, block_q=block_q,
                                       block_k=block_k)).reshape(nk, 4)
  for qt in range(nq):
    band_lo, full_lo, full_hi, band_hi = qb[qt, :4]
    assert band_lo <= full_lo <= full_hi <= band_hi
    assert set(range(full_lo, full_hi)) == set(np.flatnonzero(full[qt]))
    assert set(np.flatnonzero(anything[qt])) <= set(range(band_lo, band_hi))
  for kt in range(nk):
    q_lo, full_lo, full_hi, q_hi = kb[kt]
    assert q_lo <= full_lo <= full_hi <= q_hi
    assert set(range(full_lo, full_hi)) == set(np.flatnonzero(full[:, kt]))
    assert set(np.flatnonzero(anything[:, kt])) <= set(range(q_lo, q_hi))
  assert full.any()          # the case exercises the unmasked path


@pytest.mark.parametrize("budget", [False, True])
def test_unmasked_far_tiles_are_fully_visible(budget):
  """Compact tiles in [far_full_lo, far_full_hi) hold only keys every query of the tile
  reads (kept, index below its window, same document, not yet evicted), inside the far
  range; without a budget, a one-document query tile that starts 2 tiles past w gets some;
  with one (last not the document end) none are claimed. The same for the query tiles the
  far dk/dv kernel leaves unmasked, which it finds under a budget too."""
  time, padded, window, block, heads = 300, 320, 40, 16, 2
  rng = np.random.default_rng(2)
  seg = jnp.asarray(np.repeat([1, 2, 3], [200, 90, 10])[None], jnp.int32)
  keep = rng.random((1, time, heads)) < 0.5
  # A budget evicts each token some while after its window has passed.
  evict = np.arange(time)[None, :, None] + window + rng.integers(100, 200, (1, time, heads))
  last = evict.astype(np.int32) if budget else None
  docs = sets.documents(seg, 1, time, padded)
  lo = sets.band_starts(docs, window)
  far = sets.far_keys(jnp.asarray(keep), None if last is None else jnp.asarray(last), docs,
                      window)
  qb = np.asarray(sets.query_bounds(lo, docs, far, window=window, time=time, block_q=block,
                                    block_k=block, last_is_document_end=not budget))
  qb = qb.reshape(heads, padded // block, 8)
  idx, reader = np.asarray(far.idx)[0], np.asarray(far.last)[0]      # [H, Tp]
  start, end = np.asarray(docs.start)[0], np.asarray(docs.end)[0]
  claimed = 0
  for h in range(heads):
    for qt, (_, _, _, _, far_lo, full_lo, full_hi, far_hi) in enumerate(qb[h]):
      assert far_lo <= full_lo <= full_hi <= far_hi
      queries = np.arange(qt * block, (qt + 1) * block)
      for c in range(full_lo, full_hi):
        j, r = idx[h, c * block:(c + 1) * block], reader[h, c * block:(c + 1) * block]
        assert (j < time).all()                                    # no empty slot
        visible = ((j[None] < queries[:, None] - window) & (queries[:, None] <= r[None])
                   & (start[j][None] == start[queries][:, None]))
        assert visible.all(), (h, qt, c)
        claimed += 1
  assert (claimed == 0) if budget else (claimed > 10)
  # The far dk/dv kernel's unmasked query tiles: exact for any `last`, budget or not.
  kb = np.asarray(sets.far_key_bounds(far, window=window, block_q=block, block_k=block))
  claimed = 0
  for h, rows in enumerate(kb.reshape(heads, -1, 4)):
    for c, (q_lo, full_lo, full_hi, q_hi) in enumerate(rows):
      assert q_lo <= full_lo <= full_hi <= q_hi
      j, r = idx[h, c * block:(c + 1) * block], reader[h, c * block:(c + 1) * block]
      for qt in range(full_lo, full_hi):
        queries = np.arange(qt * block, (qt + 1) * block)
        assert (j < time).all()
        assert ((j[None] < queries[:, None] - window) & (queries[:, None] <= r[None])).all()
        claimed += 1
  assert claimed > 10


def test_short_documents_have_no_far_keys():
  """A kept token whose document ends within the window is band-only."""
  seg = jnp.asarray(np.repeat(np.arange(1, 9), 16)[None], jnp.int32)   # 8 documents of 16
  docs = sets.documents(seg, 1, 128, 128)
  far = sets.far_keys(jnp.ones((1, 128, 2), bool), None, docs, 20)
  assert int(far.before[:, :, -1].max()) == 0


@pytest.mark.parametrize("compaction", sets.FAR_COMPACTIONS)
def test_far_keys_compact_kept_tokens_in_time_order(compaction):
  """Compact slots hold the far keys (kept, last reader beyond the window, inside the
  document) in time order with their last readers; the rest of each row is empty."""
  batch, time, padded, heads, window = 2, 70, 80, 3, 8
  rng = np.random.default_rng(1)
  keep = rng.random((batch, time, heads)) < 0.4
  last = rng.integers(0, time + 5, (batch, time, heads)).astype(np.int32)
  seg = np.repeat([1, 2], [45, 25])[None].repeat(batch, 0)
  docs = sets.documents(jnp.asarray(seg, jnp.int32), batch, time, padded)
  far = sets.far_keys(jnp.asarray(keep), jnp.asarray(last), docs, window, compaction)
  end = np.where(np.arange(time) < 45, 44, time - 1)
  for b in range(batch):
    for h in range(heads):
      reader = np.minimum(last[b, :, h], end)
      want = np.flatnonzero(keep[b, :, h] & (reader > np.arange(time) + window))
      n = len(want)
      np.testing.assert_array_equal(np.asarray(far.idx[b, h, :n]), want)
      np.testing.assert_array_equal(np.asarray(far.last[b, h, :n]), reader[want])
      assert (np.asarray(far.idx[b, h, n:]) == padded).all()
      assert (np.asarray(far.last[b, h, n:]) == -1).all()
      assert int(far.before[b, h, -1]) == n


@pytest.mark.parametrize("options,needle", [
    (dict(far_compaction="radix"), "far_compaction must be one of"),
    (dict(far_gather="rows"), r"far_gather must be one of \('copy', 'kernel'\) on gpu"),
    (dict(block_q=24), "block_q must be a power of two >= 16"),
    (dict(block_k_dkv=8), "block_k_dkv must be a power of two >= 16"),
    (dict(num_warps=0), "num_warps must be an integer >= 1"),
    (dict(blockq=16), "unknown keys"),
    (dict(platform="tpu"), "must not set 'platform'"),
])
def test_plan_rejects_bad_options(options, needle):
  with pytest.raises(ValueError, match=needle):
    make_plan("gpu", True, options)


def test_plan_defaults_and_parsing():
  assert Plan("gpu").block_q == 64 and Plan("tpu").block_k == 128
  assert Plan("gpu", block_q=32).block_q_dkv == 32
  assert parse_options("block_q=64; block_k=32;num_warps=8") == dict(block_q=64, block_k=32,
                                                                    num_warps=8)
  with pytest.raises(ValueError, match="platform must be one of"):
    Plan("cuda")
  with pytest.raises(ValueError, match="unknown plan option"):
    parse_options("chunk=64")
  # Per-kernel launches: the measured table on a real GPU, none interpreted or on TPU; a
  # launch string overrides the kernels it names, the others keep the table.
  from lte_jax.kernels.lte_attention.backend import GPU_LAUNCH
  assert dict((n, (w, s)) for n, w, s in Plan("gpu").launch) == GPU_LAUNCH
  assert Plan("gpu", interpret=True).launch == () == Plan("tpu").launch
  options = parse_options("block_q=128;launch=lte_attention_fwd=8/3+lte_attention_dq=2/1")
  assert dict((n, (w, s)) for n, w, s in make_plan("gpu", False, options).launch) == {
      **GPU_LAUNCH, "lte_attention_dq": (2, 1), "lte_attention_fwd": (8, 3)}
  with pytest.raises(ValueError, match="unknown kernel 'lte_fwd'"):
    make_plan("gpu", False, parse_options("launch=lte_fwd=8/3"))


def test_lte_layer_trains_the_same_on_the_kernels():
  """LTEAttention with implementation='pallas' (default plan, and LTEConfig.plan_options
  gathering the far rows in the kernels) vs 'xla': output and every parameter gradient (the
  scorer's through the straight-through estimator), packed documents."""
  from flax import nnx
  from lte_jax.layers.lte import LTEAttention
  rng = np.random.default_rng(4)
  x = jnp.asarray(rng.standard_normal((2, 70, 32)), jnp.float32)
  w = jnp.asarray(rng.standard_normal((2, 70, 32)), jnp.float32)
  seg = jnp.asarray(packed_segment_ids(rng, 2, 70))
  results = []
  for impl, options in (("xla", ""), ("pallas", ""), ("pallas", "far_gather=copy")):
    cfg = configs.LTEConfig(num_heads=4, num_kv_heads=2, head_dim=16, sink_size=2, window_size=13,
                            budget=7, dropout=0.0, score_bias_init=0.0, implementation=impl,
                            plan_options=options)
    layer = LTEAttention(cfg, 32, num_layers=2, init_std=0.3, rngs=nnx.Rngs(0))
    loss = lambda m: jnp.sum(m(x, segment_ids=seg)[0] * w)
    results.append(nnx.jit(nnx.value_and_grad(loss))(layer))
  (l_xla, g_xla), *pallas = results
  for l_pallas, g_pallas in pallas:
    assert abs(float(l_pallas) - float(l_xla)) < 1e-4 * abs(float(l_xla))
    leaves_xla, leaves_pallas = jax.tree.leaves(g_xla), jax.tree.leaves(g_pallas)
    assert len(leaves_xla) == len(leaves_pallas) > 8
    for a, b in zip(leaves_pallas, leaves_xla):
      assert rel_rms(a, b) < 1e-4


def test_lte_layer_checks_its_plan_options():
  """A bad LTEConfig.plan_options fails when the layer is built, naming the field; the
  options are left out where another implementation runs (a GPU config evaluates on CPU)."""
  from flax import nnx
  from lte_jax.layers.lte import LTEAttention
  base = dict(num_heads=2, num_kv_heads=2, head_dim=16, window_size=13, dropout=0.0)
  with pytest.raises(ValueError, match=r"LTEConfig.plan_options='far_gather=rows'.*far_gather"):
    LTEAttention(configs.LTEConfig(**base, plan_options="far_gather=rows"), 32, num_layers=1,
                 init_std=0.1, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="LTEConfig.plan_options"):
    configs.LTEConfig(**base, plan_options=3)
  layer = LTEAttention(configs.LTEConfig(**base, implementation="xla",
                                         plan_options="far_gather=kernel"),
                       32, num_layers=1, init_std=0.1, rngs=nnx.Rngs(0))
  y, _ = layer(jnp.ones((1, 12, 32), jnp.float32))
  assert y.shape == (1, 12, 32)


_SHARDED = textwrap.dedent("""
    import jax, jax.numpy as jnp, numpy as np
    from lte_jax.ops import lte_attention
    from tests.test_lte_attention import make_inputs, packed_segment_ids
    from tests.helpers import rel_rms
    q, k, v, r, do = make_inputs(9, 4, 40, 4, 2, 16, 16, jnp.float32)
    seg = jnp.asarray(packed_segment_ids(np.random.default_rng(0), 4, 40))
    def loss(impl, q, k, v, r):
      o = lte_attention(q, k, v, r, sink_size=2, window_size=5, segment_ids=seg,
                        implementation=impl)
      return jnp.sum(o * do)
    want = jax.grad(lambda *a: loss("xla", *a), argnums=(0, 1, 2, 3))(q, k, v, r)
    from lte_jax.training import make_mesh
    mesh = make_mesh(data=2, fsdp=1, tensor=2)
    with jax.set_mesh(mesh):
      f = jax.jit(jax.grad(lambda *a: loss("pallas", *a), argnums=(0, 1, 2, 3)))
      text = f.lower(q, k, v, r).as_text()
      got = f(q, k, v, r)
    assert "shard_map" in text or "manual" in text, "kernels not under shard_map"
    for a, b in zip(got, want):
      err = rel_rms(a, b)
      assert err < 1e-4, err
    print("OK")
""")


def test_runs_per_shard_under_a_mesh():
  helpers.run_on_simulated_devices(_SHARDED)


# --- lowering ---------------------------------------------------------------------------

_sds = helpers.sds


@pytest.mark.parametrize("platform,lowering", [("gpu", "cuda"), ("tpu", "tpu")])
@pytest.mark.parametrize("size", ["0.4B", "1.4B"])
def test_lowers_at_preset_shapes(platform, lowering, size):
  cfg = configs.get_config("laLTE", size).lte
  b, t, hq, hkv, d = 1, 4096, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
  args = (_sds(b, t, hq, d), _sds(b, t, hkv, d), _sds(b, t, hkv, d),
          _sds(b, t, hkv, dtype=jnp.float32), _sds(b, t, dtype=jnp.int32))

  def lte(q, k, v, r, seg):
    return lte_attention_pallas(q, k, v, r, sink_size=cfg.sink_size,
                                window_size=cfg.window_size, budget=None, segment_ids=seg,
                                scale=d ** -0.5, platform=platform,
                                interpret=False).astype(jnp.float32).sum()

  def swa(q, k, v, r, seg):
    del r
    return sliding_window_attention_pallas(q, k, v, window_size=1023, segment_ids=seg,
                                           scale=d ** -0.5, platform=platform,
                                           interpret=False).astype(jnp.float32).sum()

  target = {"cuda": "__gpu$xla.gpu.triton", "tpu": "tpu_custom_call"}[lowering]
  # LTE: forward; with gradients: forward, dq, band dk/dv, far dk/dv. SWA: no far kernel.
  for fn, argnums, kernels in ((lte, None, 1), (lte, (0, 1, 2, 3), 4), (swa, None, 1),
                               (swa, (0, 1, 2), 3)):
    f = fn if argnums is None else jax.grad(fn, argnums=argnums)
    text = jax.jit(f).trace(*args).lower(lowering_platforms=(lowering,)).as_text()
    assert text.count(f"@{target}(") == kernels, (fn.__name__, argnums, text.count(f"@{target}("))


def test_far_gather_is_gpu_only_and_lowers_for_cuda():
  """far_gather='kernel' is refused on TPU (no row gather in Mosaic); on 'cuda' the LTE
  gradient still lowers to four Triton kernels, the far dk/dv one updating dk, dv in place:
  the XLA gathers of K, V and the scatter of the far keys' gradients are gone."""
  with pytest.raises(ValueError, match=r"far_gather must be one of \('copy',\) on tpu"):
    make_plan("tpu", True, dict(far_gather="kernel"))
  cfg = configs.get_config("laLTE", "0.4B").lte
  b, t, h, d = 1, 4096, cfg.num_heads, cfg.head_dim
  args = (_sds(b, t, h, d), _sds(b, t, h, d), _sds(b, t, h, d), _sds(b, t, h, dtype=jnp.float32))

  def op(q, k, v, r, options):
    return lte_attention_pallas(q, k, v, r, sink_size=cfg.sink_size, window_size=cfg.window_size,
                                budget=None, segment_ids=None, scale=d ** -0.5, platform="gpu",
                                interpret=False, plan_options=options).astype(jnp.float32).sum()

  texts = {name: jax.jit(jax.grad(functools.partial(op, options=dict(far_gather=name)),
                                  argnums=(0, 1, 2, 3))).trace(*args).lower(
                                      lowering_platforms=("cuda",)).as_text()
           for name in ("copy", "kernel")}
  for text in texts.values():
    assert text.count("@__gpu$xla.gpu.triton(") == 4
  # Left in both: the scatter compaction of the far keys' int32 indices (sets.far_keys).
  for op in ("stablehlo.scatter", "stablehlo.gather"):
    assert texts["kernel"].count(op) < texts["copy"].count(op), op


def test_budget_path_lowers_for_cuda():
  cfg = configs.get_config("laLTE", "0.4B").lte
  b, t, h, d = 1, 4096, cfg.num_heads, cfg.head_dim
  args = (_sds(b, t, h, d), _sds(b, t, h, d), _sds(b, t, h, d), _sds(b, t, h, dtype=jnp.float32))

  def op(q, k, v, r):
    return lte_attention_pallas(q, k, v, r, sink_size=cfg.sink_size, window_size=cfg.window_size,
                                budget=cfg.budget, segment_ids=None, scale=d ** -0.5,
                                platform="gpu", interpret=False).astype(jnp.float32).sum()

  text = jax.jit(jax.grad(op, argnums=(0, 1, 2, 3))).trace(*args).lower(
      lowering_platforms=("cuda",)).as_text()
  assert text.count("@__gpu$xla.gpu.triton(") == 4
