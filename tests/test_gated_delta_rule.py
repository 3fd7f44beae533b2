"""Gated delta rule: chunked ('xla') vs recurrent reference, forward and every gradient.

Compilation dominates the run time on CPU, so cases are chosen to cover every
value of each axis (T, D, dtype, Dk != Dv, chunk size) rather than their product,
and compiled functions are shared between tests of the same shapes.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lte_jax.ops.gated_delta_rule import (IMPLEMENTATIONS, chunk_gated_delta_rule,
                                          recurrent_gated_delta_rule)
from tests.quick_compile import quick_compile  # noqa: F401  (autouse fixture)

ARG_NAMES = ("q", "k", "v", "g", "beta", "initial_state")
# Relative-RMS bounds per input dtype: (output and state, dq/dk/dv/dh0, dg/dbeta).
TOLERANCES = {jnp.float32: (2e-5, 2e-4, 2e-4), jnp.bfloat16: (5e-3, 8e-3, 2e-2)}


def _inputs(batch, time, heads, dk, dv, dtype, *, seed=0, g_dtype=None):
  """Inputs as the GDN layer makes them: unit q, k; g <= 0, some strongly negative.

  Drawn with numpy so that a new shape costs no eager XLA compilations.
  """
  rng = np.random.default_rng(seed)
  normal = lambda *shape: rng.standard_normal(shape).astype(np.float32)
  unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)
  q = unit(normal(batch, time, heads, dk))
  k = unit(normal(batch, time, heads, dk))
  v = normal(batch, time, heads, dv)
  g = -np.logaddexp(0.0, -(2.0 * normal(batch, time, heads) + 2.0))   # log_sigmoid
  g = np.where(rng.uniform(size=g.shape) < 0.05, -12.0, g)
  beta = 1.0 / (1.0 + np.exp(-normal(batch, time, heads)))
  h0 = 0.5 * normal(batch, heads, dk, dv)
  cast = lambda x: jnp.asarray(x, dtype)
  return (cast(q), cast(k), cast(v), jnp.asarray(g, g_dtype or dtype), cast(beta),
          jnp.asarray(h0, jnp.float32))


def _numpy_recurrence(q, k, v, g, beta, h0=None, scale=None):
  """Float64 oracle, one document per row: h <- e^g h; h += k beta (v - h^T k)^T."""
  q, k, v, g, beta = (np.asarray(x, np.float64) for x in (q, k, v, g, beta))
  batch, time, heads, dk = q.shape
  scale = dk ** -0.5 if scale is None else scale
  h = np.zeros((batch, heads, dk, v.shape[-1])) if h0 is None else np.array(h0, np.float64)
  o = np.zeros(v.shape)
  for t in range(time):
    h = np.exp(g[:, t])[..., None, None] * h
    v_new = beta[:, t, :, None] * (v[:, t] - np.einsum("bhkv,bhk->bhv", h, k[:, t]))
    h = h + k[:, t, ..., None] * v_new[..., None, :]
    o[:, t] = np.einsum("bhkv,bhk->bhv", h, scale * q[:, t])
  return o.astype(np.float32), h.astype(np.float32)


@functools.lru_cache(maxsize=None)
def _forward_fn(**static):
  """Jitted chunk_gated_delta_rule with keyword arguments fixed (cached per setting)."""
  return jax.jit(lambda *args, **kw: chunk_gated_delta_rule(*args, **static, **kw))


def _forward(*args, **kwargs):
  static = {n: kwargs.pop(n) for n in ("scale", "output_final_state", "chunk_size",
                                       "implementation") if n in kwargs}
  return _forward_fn(**static)(*args, **kwargs)


@functools.lru_cache(maxsize=None)
def _grad_fn(implementation, chunk_size):
  """Jitted (o, final_state) and gradients of <o, d_o> + <h, d_h> w.r.t. all six inputs."""

  def loss(q, k, v, g, beta, h0, d_o, d_h, segment_ids):
    o, h = chunk_gated_delta_rule(q, k, v, g, beta, initial_state=h0, output_final_state=True,
                                  segment_ids=segment_ids, chunk_size=chunk_size,
                                  implementation=implementation)
    return jnp.sum(o.astype(jnp.float32) * d_o) + jnp.sum(h * d_h), (o, h)

  return jax.jit(jax.value_and_grad(loss, argnums=tuple(range(6)), has_aux=True))


def _value_and_grads(implementation, args, *, segment_ids=None, chunk_size=64):
  rng = np.random.default_rng(1)
  d_o = jnp.asarray(rng.standard_normal(args[2].shape), jnp.float32)
  d_h = jnp.asarray(rng.standard_normal(args[5].shape), jnp.float32)
  (_, (o, h)), grads = _grad_fn(implementation, chunk_size)(*args, d_o, d_h, segment_ids)
  return o, h, grads


def _rel_rms(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def _assert_close(name, got, want, tol):
  assert got.dtype == want.dtype, (name, got.dtype, want.dtype)
  assert np.all(np.isfinite(np.asarray(got, np.float32))), f"{name} has inf/NaN"
  err = _rel_rms(got, want)
  assert err <= tol, f"{name}: relative RMS error {err:.2e} > {tol:.0e}"


def _compare_with_reference(args, dtype, **kwargs):
  tol_o, tol_qkv, tol_gb = TOLERANCES[dtype]
  o, h, grads = _value_and_grads("xla", args, **kwargs)
  o_ref, h_ref, grads_ref = _value_and_grads("reference", args, **kwargs)
  _assert_close("o", o, o_ref, tol_o)
  _assert_close("final_state", h, h_ref, tol_o)
  for name, got, want in zip(ARG_NAMES, grads, grads_ref):
    _assert_close(f"d{name}", got, want, tol_gb if name in ("g", "beta") else tol_qkv)


# (batch, time, heads, dk, dv, dtype, g_dtype): every T and every D at least once,
# both dtypes, Dk != Dv both ways, T = 1 (one short chunk), T not a chunk multiple.
CASES = [
    (2, 1, 2, 32, 32, jnp.float32, None),
    (1, 63, 2, 64, 64, jnp.bfloat16, None),
    (2, 64, 1, 32, 100, jnp.float32, None),
    (1, 75, 2, 100, 100, jnp.bfloat16, jnp.float32),
    (1, 200, 1, 128, 64, jnp.float32, None),
]


@pytest.mark.parametrize("batch,time,heads,dk,dv,dtype,g_dtype", CASES)
def test_chunk_matches_reference(batch, time, heads, dk, dv, dtype, g_dtype):
  args = _inputs(batch, time, heads, dk, dv, dtype, g_dtype=g_dtype)
  _compare_with_reference(args, dtype)


def test_strongly_negative_decay_keeps_gradients_finite_and_exact():
  q, k, v, _, beta, h0 = _inputs(1, 200, 1, 128, 64, jnp.float32, seed=5)
  g = jnp.full(beta.shape, -30.0, jnp.float32)    # e^g ~ 1e-13 at every one of 200 steps
  _compare_with_reference((q, k, v, g, beta, h0), jnp.float32)


@pytest.mark.parametrize("implementation,chunk_size",
                         [("reference", 64), ("xla", 7), ("xla", 16), ("xla", 128)])
def test_forward_matches_float64_recurrence(implementation, chunk_size):
  args = _inputs(1, 75, 2, 32, 48, jnp.float32, seed=3)
  o, h = _forward(*args[:5], initial_state=args[5], output_final_state=True,
                  chunk_size=chunk_size, implementation=implementation)
  o_np, h_np = _numpy_recurrence(*args)
  _assert_close("o", o, o_np, 2e-5)
  _assert_close("final_state", h, h_np, 2e-5)


def test_default_and_custom_scale():
  q, k, v, g, beta, _ = _inputs(1, 40, 2, 16, 24, jnp.float32, seed=4)
  o, h = _forward(q, k, v, g, beta)
  assert h is None and o.shape == v.shape and o.dtype == v.dtype
  _assert_close("o", o, _numpy_recurrence(q, k, v, g, beta)[0], 2e-5)
  o_half, _ = _forward(q, k, v, g, beta, scale=0.5)
  _assert_close("o(scale=0.5)", o_half, _numpy_recurrence(q, k, v, g, beta, scale=0.5)[0],
                2e-5)


# Documents (lengths) packed into one row of 100 tokens, with id 0 padding at the end:
# starts mid-chunk for chunk 16 and 64, a 1-token document, and one spanning chunks.
DOC_LENGTHS = (5, 1, 70, 17, 7)
DOC_IDS = (3, 4, 9, 2, 0)


def _packed_segment_ids():
  return jnp.concatenate([jnp.full((n,), i, jnp.int32) for n, i in zip(DOC_LENGTHS, DOC_IDS)])


@pytest.mark.parametrize("implementation,chunk_size",
                         [("reference", 64), ("xla", 16), ("xla", 64)])
def test_packed_documents_equal_separate_runs(implementation, chunk_size):
  q, k, v, g, beta, h0 = _inputs(1, sum(DOC_LENGTHS), 2, 32, 24, jnp.float32, seed=6)
  o, h = _forward(q, k, v, g, beta, initial_state=h0, segment_ids=_packed_segment_ids()[None],
                  output_final_state=True, chunk_size=chunk_size,
                  implementation=implementation)
  bounds = np.cumsum((0,) + DOC_LENGTHS)
  outs = []
  for i, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:])):
    o_doc, h_doc = _numpy_recurrence(q[:, lo:hi], k[:, lo:hi], v[:, lo:hi], g[:, lo:hi],
                                     beta[:, lo:hi], h0 if i == 0 else None)
    outs.append(o_doc)
  _assert_close("o", o, np.concatenate(outs, axis=1), 2e-5)
  _assert_close("final_state", h, h_doc, 2e-5)


def test_packed_documents_gradients_match_reference():
  args = _inputs(2, 100, 1, 32, 40, jnp.float32, seed=7)
  row_b = jnp.repeat(jnp.arange(5, dtype=jnp.int32), 20).at[60:64].set(7)
  segment_ids = jnp.stack([_packed_segment_ids(), row_b])
  _compare_with_reference(args, jnp.float32, segment_ids=segment_ids, chunk_size=16)


def test_recurrent_decode_continues_chunked_prefill():
  q, k, v, g, beta, h0 = _inputs(2, 70, 2, 32, 32, jnp.float32, seed=8)
  split = 66
  before = lambda x: x[:, :split]
  _, h = _forward(before(q), before(k), before(v), before(g), before(beta), initial_state=h0,
                  output_final_state=True)
  o_np, h_np = _numpy_recurrence(q, k, v, g, beta, h0)
  decode = jax.jit(functools.partial(recurrent_gated_delta_rule, output_final_state=True))
  for t in range(split, 70):
    step = lambda x: x[:, t:t + 1]
    o_t, h = decode(step(q), step(k), step(v), step(g), step(beta), initial_state=h)
    _assert_close(f"o[{t}]", o_t, o_np[:, t:t + 1], 2e-5)
  _assert_close("final_state", h, h_np, 2e-5)


def test_implementation_table():
  assert set(IMPLEMENTATIONS) == {"reference", "xla", "pallas"}


def _good_args():
  q, k, v, g, beta, h0 = _inputs(1, 8, 2, 16, 12, jnp.float32)
  return dict(q=q, k=k, v=v, g=g, beta=beta), h0


BAD_INPUTS = [
    ("q", lambda a, h0: dict(a, q=a["q"][0])),
    ("k", lambda a, h0: dict(a, k=a["k"][..., :8])),
    ("v", lambda a, h0: dict(a, v=a["v"][:, :4])),
    ("v", lambda a, h0: dict(a, v=a["v"][..., 0])),
    ("g", lambda a, h0: dict(a, g=a["g"][..., None])),
    ("beta", lambda a, h0: dict(a, beta=a["beta"][:, :, :1])),
    ("q", lambda a, h0: dict(a, q=a["q"].astype(jnp.int32))),
    ("g", lambda a, h0: dict(a, g=a["g"].astype(jnp.int32))),
    ("initial_state", lambda a, h0: dict(a, initial_state=h0[..., :5])),
    ("initial_state", lambda a, h0: dict(a, initial_state=h0.astype(jnp.int32))),
    ("segment_ids", lambda a, h0: dict(a, segment_ids=jnp.zeros((1, 7), jnp.int32))),
    ("segment_ids", lambda a, h0: dict(a, segment_ids=jnp.zeros((1, 8), jnp.float32))),
    ("scale", lambda a, h0: dict(a, scale=-1.0)),
    ("chunk_size", lambda a, h0: dict(a, chunk_size=0)),
    ("chunk_size", lambda a, h0: dict(a, chunk_size=16.0)),
    ("implementation", lambda a, h0: dict(a, implementation="triton")),
    ("chunk_size", lambda a, h0: dict(a, implementation="pallas", chunk_size=48)),
    ("chunk_size", lambda a, h0: dict(a, implementation="pallas", chunk_size=8)),
]


@pytest.mark.parametrize("needle,make", BAD_INPUTS)
def test_bad_input_raises_value_error_naming_argument(needle, make):
  args, h0 = _good_args()
  with pytest.raises(ValueError, match=needle):
    chunk_gated_delta_rule(**make(args, h0))


def test_float64_rejected_and_reference_validates():
  args, _ = _good_args()
  with jax.enable_x64(True):
    q64 = jnp.asarray(np.asarray(args["q"]), jnp.float64)
    with pytest.raises(ValueError, match="q"):
      chunk_gated_delta_rule(**dict(args, q=q64))
  with pytest.raises(ValueError, match="k"):
    recurrent_gated_delta_rule(**dict(args, k=args["k"][:, :3]))
