"""NSA decode step on the Pallas kernel vs the plain-JAX step and the training op's rows.

The kernel runs interpreted on CPU in both of its forms: the GPU form (one program per
(batch, KV head) loops over its block table, masked strided loads from the cache in
place; generic interpreter) and the TPU form (an ordered grid axis of blocks fetched by
scalar-prefetched index; the TPU interpreter). Positions 0, block_size - 1, block_size, a
middle one and the last; G = 1 and G = 2; no window and a window over three blocks;
adversarial keys (identical in every block: top-k ties; huge logits) and a bf16 cache.
Lowering for 'cuda' (Triton) and 'tpu' (Mosaic) at the laNSA 0.4B decode shape on
abstract inputs (nothing runs).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lte_jax import configs
from lte_jax.layers.nsa import block_means
from lte_jax.ops.nsa_attention import nsa_attention, nsa_decode
from lte_jax.ops.nsa_attention.decode import nsa_decode_xla, select_decode_blocks
from lte_jax.ops.nsa_attention.decode_pallas import nsa_decode_pallas
from tests import helpers
from tests.quick_compile import quick_compile  # noqa: F401  (autouse fixture)

BLOCK, CACHE, COUNT, D = 16, 128, 4, 16
POSITIONS = (0, BLOCK - 1, BLOCK, 70, CACHE - 1)


def _sequence(seed, *, hq=4, hkv=2, dtype=jnp.float32, key_scale=1.0, tied_keys=False):
  """q, k, v, gates of a CACHE-token sequence ([B, T, H, D]; k and v in dtype)."""
  rng = np.random.default_rng(seed)
  normal = lambda *s: rng.standard_normal(s).astype(np.float32)
  q, k = normal(2, CACHE, hq, D) * key_scale, normal(2, CACHE, hkv, D) * key_scale
  if tied_keys:   # one key everywhere: every block mean ties, every logit ties
    k = np.broadcast_to(k[:, :1], k.shape)
  v = normal(2, CACHE, hkv, D)
  gates = rng.uniform(size=(2, CACHE, hq, 3)).astype(np.float32)
  return tuple(jnp.asarray(x, dtype) for x in (q, k, v)) + (jnp.asarray(gates),)


def _step_args(seq, position):
  """The decode step's arguments at `position` from a whole sequence: the cache holds
  every token (later slots are ignored by the step), the block means all blocks."""
  q, k, v, gates = seq
  return (q[:, position:position + 1], k, v, block_means(k, BLOCK), block_means(v, BLOCK),
          gates[:, position:position + 1], jnp.int32(position))


@functools.lru_cache(maxsize=None)
def _decode(impl, window, platform=None):
  kw = dict(block_size=BLOCK, block_count=COUNT, window_size=window, scale=0.25)
  if impl == "xla":
    return jax.jit(functools.partial(nsa_decode_xla, **kw))
  if platform is None:   # the public entry: this backend's form (GPU, interpreted on CPU)
    return jax.jit(functools.partial(nsa_decode, implementation="pallas", **kw))
  return jax.jit(functools.partial(nsa_decode_pallas, **kw,
                                   plan_options=dict(platform=platform, interpret=True)))


def _check(seq, window, positions, *, platform=None, tol=1e-5):
  for position in positions:
    args = _step_args(seq, position)
    got = _decode("pallas", window, platform)(*args)
    want = _decode("xla", window)(*args)
    assert got.dtype == want.dtype and got.shape == want.shape
    err = helpers.rel_rms(got, want)
    assert err < tol, (position, err)


@pytest.mark.parametrize("platform,hq,window,dtype,positions", [
    (None, 4, 20, jnp.float32, POSITIONS),          # the public entry: GPU form, G = 2
    (None, 2, None, jnp.bfloat16, POSITIONS),       # G = 1, no window, bf16 cache
    # Block 0 only (unused slots, window blocks past it); a middle step.
    ("tpu", 4, 20, jnp.bfloat16, (BLOCK - 1, 70)),
])
def test_kernel_matches_xla_step(platform, hq, window, dtype, positions):
  seq = _sequence(hq, hq=hq, dtype=dtype)
  _check(seq, window, positions, platform=platform,
         tol=5e-3 if dtype == jnp.bfloat16 else 1e-5)


_training_op = jax.jit(functools.partial(nsa_attention, block_size=BLOCK, block_count=COUNT,
                                        window_size=20, scale=0.25, implementation="reference"))


@pytest.mark.parametrize("tied_keys,key_scale", [(False, 1.0), (True, 1.0), (False, 30.0)])
def test_kernel_matches_training_op_rows(tied_keys, key_scale):
  """Row `position` of nsa_attention('reference'); tied keys: every block mean ties, the
  earlier blocks win; key_scale 30: logits of ~1e3, one-hot softmaxes (measured 1e-7)."""
  seq = _sequence(7, tied_keys=tied_keys, key_scale=key_scale)
  q, k, v, gates = seq
  full = _training_op(q, k, v, gates)
  for position in POSITIONS:
    got = _decode("pallas", 20)(*_step_args(seq, position))
    err = helpers.rel_rms(got[:, 0], full[:, position])
    assert np.all(np.isfinite(got)) and err < 1e-5, (position, err)
  if tied_keys:
    qg = q[:, 70].reshape(2, 2, 2, D)
    select = jax.jit(functools.partial(select_decode_blocks, block_size=BLOCK,
                                       block_count=COUNT, scale=0.25))
    _, selected = select(qg, block_means(k, BLOCK), block_means(v, BLOCK), jnp.int32(70))
    # Forced blocks 0, 3 and 4 (position 70 is in block 4), then the earliest free one.
    np.testing.assert_array_equal(np.sort(np.asarray(selected), axis=-1),
                                  np.broadcast_to([0, 1, 3, 4], (2, 2, 4)))


def test_position_outside_the_cache_is_nan():
  seq = _sequence(1)
  step = _decode("pallas", 20)
  for position in (-1, CACHE):
    args = _step_args(seq, 0)[:-1] + (jnp.int32(position),)
    assert np.all(np.isnan(step(*args)))


def test_bad_arguments_raise_value_errors():
  args = _step_args(_sequence(2), 3)
  with pytest.raises(ValueError, match="implementation"):
    nsa_decode(*args, block_size=BLOCK, block_count=COUNT, implementation="reference")
  with pytest.raises(ValueError, match="block_size must be a power of two"):
    halves = [jnp.repeat(x, 2, axis=1) for x in args[3:5]]   # block means of 8 tokens
    nsa_decode(*args[:3], *halves, *args[5:], block_size=8, block_count=COUNT,
               implementation="pallas")


@pytest.mark.parametrize("platform,lowering", [("gpu", "cuda"), ("tpu", "tpu")])
def test_lowers_at_the_lansa_0_4b_decode_shape(platform, lowering):
  nsa = configs.get_config("laNSA", "0.4B").nsa
  batch, cache, bs, d = 32, 4096, nsa.block_size, nsa.head_dim
  sds = helpers.sds
  kv = sds(batch, cache, nsa.num_kv_heads, d)
  cmp = sds(batch, cache // bs, nsa.num_kv_heads, d)
  args = (sds(batch, 1, nsa.num_heads, d), kv, kv, cmp, cmp,
          sds(batch, 1, nsa.num_heads, 3, dtype=jnp.float32), sds(dtype=jnp.int32))
  op = functools.partial(nsa_decode_pallas, block_size=bs, block_count=nsa.block_count,
                         window_size=nsa.window_size - 1, scale=d ** -0.5,
                         plan_options=dict(platform=platform, interpret=False))
  text = jax.jit(op).trace(*args).lower(lowering_platforms=(lowering,)).as_text()
  target = {"cuda": "__gpu$xla.gpu.triton", "tpu": "tpu_custom_call"}[lowering]
  assert text.count(f"@{target}(") == 1
