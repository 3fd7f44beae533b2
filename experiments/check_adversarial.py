"""The backend's fast paths on adversarial inputs, forward and backward, against float64.

    python -m experiments.check_adversarial --out=check_adversarial.json

Runs on whatever backend JAX has (on a GPU: the Triton Pallas kernels at model-sized
heads, which the CPU test suite can only interpret at small shapes). Cases:

  gated delta rule ('xla', 'pallas'): keys that repeat (one unit key for the whole
    sequence) or stay at cosine 0.9-0.99 to each other, g in {0, -0.01, -5} per token,
    beta in {0.5, 1}, float32 and bfloat16 inputs, with packed documents; the oracle is
    the recurrence in float64.
  attention / LTE attention ('xla', 'pallas'): one key repeated with logits ~1e3 (tied),
    logits ~1e3 (saturated), a long run of one token, every LTE score <= 0, a padded
    tail; the oracle is the op's reference in float64.

Errors are relative RMS per case ||got - want|| / ||want|| (float64; for a result that is
exactly 0, relative to 1e-3 x the tensor's RMS over all cases); non-finite values read inf. Prints a table and writes JSON.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from experiments import bench_common
from lte_jax.ops.attention import attention
from lte_jax.ops.attention import reference as attention_reference
from lte_jax.ops.gated_delta_rule import chunk_gated_delta_rule
from lte_jax.ops.gated_delta_rule import reference as gdn_reference
from lte_jax.ops.lte_attention import lte_attention
from lte_jax.ops.lte_attention import reference as lte_reference

_TIME = flags.DEFINE_integer("time", 1024, "tokens per row (T)")
_DK = flags.DEFINE_integer("dk", 128, "gated delta rule key and value head dim")
_IMPLS = flags.DEFINE_list("implementations", ["xla", "pallas"], "fast paths to check")
_OUT = flags.DEFINE_string("out", "check_adversarial.json", "JSON output path")

G_VALUES = (0.0, -0.01, -5.0)
BETAS = (0.5, 1.0)
KEY_KINDS = ("identical", "similar")
GDN_ARGS = ("q", "k", "v", "g", "beta", "h0")


def _unit(x):
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def gdn_inputs(time, dk, seed=0):
  """float64 numpy (q, k, v, g, beta, h0), cotangent d_o, segment_ids: batch rows are
  (key kind, g), heads are beta. Keys: one unit key per (row, head), either repeated or
  at cosine ~U(0.95, 0.995) to it plus an orthogonal random part."""
  rng = np.random.default_rng(seed)
  rows, heads = len(KEY_KINDS) * len(G_VALUES), len(BETAS)
  q = _unit(rng.standard_normal((rows, time, heads, dk)))
  base = _unit(rng.standard_normal((rows, 1, heads, dk)))
  noise = rng.standard_normal((rows, time, heads, dk))
  noise = _unit(noise - np.sum(noise * base, -1, keepdims=True) * base)
  cos = rng.uniform(0.95, 0.995, (rows, time, heads, 1))
  identical = (np.arange(rows) < len(G_VALUES))[:, None, None, None]
  k = np.where(identical, base, cos * base + np.sqrt(1 - cos ** 2) * noise)
  v = rng.standard_normal((rows, time, heads, dk))
  g = np.broadcast_to(np.tile(G_VALUES, len(KEY_KINDS))[:, None, None], (rows, time, heads))
  beta = np.broadcast_to(np.asarray(BETAS)[None, None], (rows, time, heads))
  h0 = 0.5 * rng.standard_normal((rows, heads, dk, dk))
  d_o = rng.standard_normal((rows, time, heads, dk))
  starts = np.asarray([5, time // 3, time // 3 + 37, 3 * time // 4])
  seg = 1 + np.searchsorted(starts, np.arange(time), side="right")
  seg = np.broadcast_to(seg, (rows, time)).astype(np.int32)
  return (q, k, v, g.copy(), beta.copy(), h0), d_o, seg


def _value_and_grads(fn, args, d_o):
  def loss(*a):
    o = fn(*a)
    return jnp.sum(o.astype(d_o.dtype) * d_o), o
  (_, o), grads = jax.jit(jax.value_and_grad(loss, argnums=tuple(range(len(args))),
                                             has_aux=True))(*args)
  return jax.device_get((o, grads))


def _case_errors(got, want, case_axes_fn):
  """Relative RMS per case: got/want [rows, ...]; case_axes_fn(array) -> [rows, heads]."""
  got = np.asarray(jnp.asarray(got, jnp.float32), np.float64)
  if not np.all(np.isfinite(got)):
    return np.full(case_axes_fn(want).shape, np.inf)
  # A case whose true result is 0 (tied logits: dq = 0) is measured against the
  # tensor's size over every case instead.
  floor = max(1e-3 * float(np.sqrt(np.mean(want ** 2))), 1e-30)
  return np.sqrt(case_axes_fn((got - want) ** 2)) / np.maximum(
      np.sqrt(case_axes_fn(want ** 2)), floor)


def check_gdn(impl, dtype, time, dk):
  """Rows of (case, tensor, relative RMS) for one implementation and dtype."""
  args64, d_o64, seg = gdn_inputs(time, dk)
  cast = [jnp.asarray(x, dtype) for x in args64[:5]] + [jnp.asarray(args64[5], jnp.float32)]
  # The oracle sees the inputs as the implementation does (bf16 rounded first).
  seen = [np.asarray(jnp.asarray(x, jnp.float32), np.float64) for x in cast]
  reset = np.zeros(seg.shape, bool)
  reset[:, 1:] = seg[:, 1:] != seg[:, :-1]
  with jax.enable_x64(True):
    oracle = lambda *a: gdn_reference.recurrence(*a, jnp.asarray(reset))[1]
    want_o, want_grads = _value_and_grads(oracle, [jnp.asarray(x) for x in seen],
                                          jnp.asarray(d_o64))
  fn = lambda q, k, v, g, beta, h0: chunk_gated_delta_rule(
      q, k, v, g, beta, initial_state=h0, segment_ids=jnp.asarray(seg),
      implementation=impl)[0]
  got_o, got_grads = _value_and_grads(fn, cast, jnp.asarray(d_o64, jnp.float32))
  per_token = lambda x: np.mean(x, axis=(1, 3))        # [rows, T, H, D] -> [rows, H]
  per_state = lambda x: np.mean(x, axis=(2, 3))        # [rows, H, Dk, Dv] -> [rows, H]
  per_scalar = lambda x: np.mean(x, axis=1)            # [rows, T, H] -> [rows, H]
  reducers = [per_token] * 3 + [per_scalar] * 2 + [per_state]
  rows = [("o", _case_errors(got_o, want_o, per_token))]
  rows += [(f"d{n}", _case_errors(g, w, r)) for n, g, w, r in
           zip(GDN_ARGS, got_grads, want_grads, reducers)]
  out = []
  for tensor, err in rows:
    worst = np.unravel_index(np.argmax(err), err.shape)
    case = (f"{KEY_KINDS[worst[0] // len(G_VALUES)]} g={G_VALUES[worst[0] % len(G_VALUES)]} "
            f"beta={BETAS[worst[1]]}")
    out.append(dict(op="gated_delta_rule", implementation=impl, dtype=jnp.dtype(dtype).name,
                    tensor=tensor, worst_rel_rms=float(np.max(err)), worst_case=case))
  return out


ATTN_ROWS = ("tied_large", "large", "run", "scores_negative", "padded")


def attention_inputs(time, heads_q, heads_kv, dim, seed=0):
  """float64 q [5, T, Hq, D], k, v [5, T, Hkv, D], scores [5, T, Hkv], do, segment_ids:
  one ATTN_ROWS pattern per batch row."""
  rng = np.random.default_rng(seed)
  rows = len(ATTN_ROWS)
  q = rng.standard_normal((rows, time, heads_q, dim))
  k = rng.standard_normal((rows, time, heads_kv, dim))
  v = rng.standard_normal((rows, time, heads_kv, dim))
  r = rng.standard_normal((rows, time, heads_kv))
  do = rng.standard_normal((rows, time, heads_q, dim))
  seg = np.ones((rows, time), np.int32)
  k[0] = k[0, :1]
  q[0], k[0] = 20 * q[0], 20 * k[0]
  q[1], k[1] = 25 * q[1], 25 * k[1]
  for x in (q, k, v):
    x[2, 8:-8] = x[2, 8:9]
  r[3] = -np.abs(r[3])
  seg[4, time // 2:] = 0
  return q, k, v, r, do, seg


def check_attention(op, impl, dtype, time):
  """LTE attention (sink 4, window 63, budget 64) or sliding-window attention (window 127)
  on ATTN_ROWS against the op's reference in float64."""
  q64, k64, v64, r64, do64, seg = attention_inputs(time, 4, 2, 64)
  seg = jnp.asarray(seg)
  if op == "lte_attention":
    kw = dict(sink_size=4, window_size=63, budget=64, segment_ids=seg)
    fast = lambda q, k, v, r: lte_attention(q, k, v, r, implementation=impl, **kw)
    ref = lambda q, k, v, r: lte_reference.lte_attention_reference(q, k, v, r, scale=0.125,
                                                                     **kw)
    args64 = (q64, k64, v64, r64)
  else:
    kw = dict(window_size=127, segment_ids=seg)
    fast = lambda q, k, v: attention(q, k, v, implementation=impl, **kw)
    ref = lambda q, k, v: attention_reference.attention_reference(q, k, v, scale=0.125, **kw)
    args64 = (q64, k64, v64)
  cast = [jnp.asarray(x, dtype) for x in args64]
  seen = [np.asarray(jnp.asarray(x, jnp.float32), np.float64) for x in cast]
  with jax.enable_x64(True):
    want_o, want_grads = _value_and_grads(ref, [jnp.asarray(x) for x in seen],
                                          jnp.asarray(do64))
  got_o, got_grads = _value_and_grads(fast, cast, jnp.asarray(do64, jnp.float32))
  per_row = lambda x: np.mean(x.reshape(x.shape[0], -1), axis=1)[:, None]
  names = ("o", "dq", "dk", "dv", "dscores")
  out = []
  for name, got, want in zip(names, (got_o, *got_grads), (want_o, *want_grads)):
    err = _case_errors(got, want, per_row)[:, 0]
    out.append(dict(op=op, implementation=impl, dtype=jnp.dtype(dtype).name, tensor=name,
                    worst_rel_rms=float(np.max(err)),
                    worst_case=ATTN_ROWS[int(np.argmax(err))]))
  return out


def main(argv):
  del argv
  env = bench_common.environment()
  print(env, flush=True)
  rows = []
  jobs = [functools.partial(check_gdn, impl, dtype, _TIME.value, _DK.value)
          for impl in _IMPLS.value for dtype in (jnp.float32, jnp.bfloat16)]
  jobs += [functools.partial(check_attention, op, impl, dtype, _TIME.value)
           for op in ("lte_attention", "attention") for impl in _IMPLS.value
           for dtype in (jnp.float32, jnp.bfloat16)]
  for job in jobs:
    new = job()
    rows += new
    bench_common.print_table([dict(r, rel_rms=f"{r['worst_rel_rms']:.2e}") for r in new],
                             ["op", "implementation", "dtype", "tensor", "rel_rms",
                              "worst_case"])
    bench_common.write_json(_OUT.value, dict(environment=env, time=_TIME.value,
                                             dk=_DK.value, rows=rows))


if __name__ == "__main__":
  app.run(main)
