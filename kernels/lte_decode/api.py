"""LTE cache attention on the Pallas kernel: layout glue and the split combine."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from lte_jax.kernels.lte_decode import backend, kernel

F32 = jnp.float32


def _pow2_at_least(n: int, floor: int) -> int:
  return max(floor, 1 << (n - 1).bit_length())


def combine(acc: jax.Array, m: jax.Array, l: jax.Array) -> jax.Array:
  """Merge split partials: acc [..., N, R, Dv], m and l [..., N, R, 1] -> o [..., R, Dv].

  A row that saw no visible slot in any split (m = -inf everywhere) gives zeros.
  """
  m_max = jnp.max(m, axis=-3, keepdims=True)
  m_max = jnp.where(m_max == -jnp.inf, 0.0, m_max)
  weight = jnp.exp(m - m_max)                                # 0 for empty splits
  denom = jnp.sum(weight * l, axis=-3)
  num = jnp.sum(weight * acc, axis=-3)
  return num / jnp.where(denom > 0, denom, 1.0)


def lte_decode_attention_pallas(q: jax.Array, k: jax.Array, v: jax.Array, fill: jax.Array,
                                num_tokens: jax.Array, *, ring_size: int, scale: float,
                                platform: str | None = None, interpret: bool | None = None,
                                **plan_options) -> jax.Array:
  """Same contract as lte_jax.ops.lte_decode_attention (arguments validated there).

  q [B, Tq, Hq, D]; k [B, W1 + b, Hkv, D]; v [B, W1 + b, Hkv, Dv]; fill [B, Hkv]
  int; num_tokens: int scalar, tokens written so far (the Tq queries are the
  newest). platform: 'gpu' or 'tpu' kernel (None: this backend's); interpret:
  Pallas interpreter (None: on CPU only); plan_options: fields of backend.Plan
  (block_k, split, min_programs, num_warps, num_stages).
  Returns o [B, Tq, Hq, Dv] in v.dtype.
  """
  if interpret is None:
    interpret = jax.default_backend() == "cpu"
  plan = backend.Plan(platform or backend.default_platform(), interpret=interpret,
                      **plan_options)
  batch, num_queries, num_heads, dk = q.shape
  slots, num_kv = k.shape[1], k.shape[2]
  dv = v.shape[-1]
  group = num_heads // num_kv

  # Query rows of one KV head: (token, head in group), token-major, padded.
  rows = num_queries * group
  rows_p = _pow2_at_least(rows, plan.min_rows)
  q_rows = q.reshape(batch, num_queries, num_kv, group, dk).transpose(0, 2, 1, 3, 4)
  q_rows = q_rows.reshape(batch, num_kv, rows, dk)

  split = plan.slots_per_program(slots, batch * num_kv)
  if plan.native_layout:
    # Triton tiles need power-of-two widths >= 16: odd head dims are padded (a copy
    # of the cache; the presets' 64 needs none).
    dk_p, dv_p = _pow2_at_least(dk, 16), _pow2_at_least(dv, 16)
    pad_d = lambda x, d: x if x.shape[-1] == d else jnp.pad(
        x, [(0, 0)] * (x.ndim - 1) + [(0, d - x.shape[-1])])
    k_in, v_in = pad_d(k, dk_p), pad_d(v, dv_p)
  else:
    dk_p = dk
    padded = -(-slots // split) * split
    to_blocks = lambda x: jnp.pad(jnp.swapaxes(x, 1, 2),
                                  ((0, 0), (0, 0), (0, padded - slots), (0, 0)))
    k_in, v_in = to_blocks(k), to_blocks(v)
  q_rows = jnp.pad(q_rows, ((0, 0), (0, 0), (0, rows_p - rows), (0, dk_p - dk)))

  last = jnp.asarray(num_tokens, jnp.int32) - 1
  meta = jnp.stack([last, jnp.mod(last, ring_size)]).astype(jnp.int32)
  # A fill past the retained slots would read past the cache: it counts as all of them.
  fill = jnp.minimum(jnp.asarray(fill, jnp.int32), slots - ring_size)
  acc, m, l = kernel.partials(plan, q_rows, k_in, v_in, meta, fill,
                              ring=ring_size, group=group, num_queries=num_queries,
                              scale=scale, split=split)
  o = combine(acc, m, l)[:, :, :rows, :dv]                   # [B, Hkv, Tq * G, Dv]
  o = o.reshape(batch, num_kv, num_queries, group, dv).transpose(0, 2, 1, 3, 4)
  return o.reshape(batch, num_queries, num_heads, dv).astype(v.dtype)
