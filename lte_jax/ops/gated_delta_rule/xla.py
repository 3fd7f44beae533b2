"""Chunked gated delta rule in plain JAX (PAPER.md section 2, steps 1-6).

The sequence is cut into chunks of C tokens. Inside a chunk everything is dense
matrix algebra, parallel over chunks; only the state h [Dk, Dv] entering each
chunk is carried by a scan. All arithmetic is float32.

Packed documents (segment_ids) are exact: within a chunk, seg = number of
document starts up to and including each token, so seg == 0 marks tokens that
continue the document of the state h_n entering the chunk. Tokens of different
documents never interact (a same-document mask on A and on the intra-chunk
attention), only seg == 0 tokens read h_n, and h_{n+1} keeps h_n only if the
whole chunk is one continuing document and collects K^T V_new only from the
chunk's last document. Derivation, for token i of a chunk with G = cumsum(g):
  h~_i = [seg_i == 0] e^{G_i} h_n + sum_{j<i, same doc} e^{G_i - G_j} k_j v'_j^T
  v'_i = beta_i (v_i - h~_i^T k_i)
  =>  (I + A) V' = beta V - ([seg == 0] beta e^G K) h_n,
      A_ij = [j < i, same doc] beta_i e^{G_i - G_j} k_i.k_j,
so with U = (I + A)^-1 beta V and W = (I + A)^-1 ([seg == 0] beta e^G K):
V' = U - W h_n, which is step 4-5 of the paper with the two masks added.

Decay differences G_i - G_j are summed directly from g (no subtraction of
large cumulative sums), and every exp is taken of a masked value, so nothing
above the diagonal or across documents reaches exp or its gradient; plain
autodiff stays finite and accurate even for g = -30 per token.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from lte_jax import segments

# Products that feed the triangular inverse and the state carry compound their
# rounding errors, so they run at full float32 even where the backend's default
# would drop to TF32 or bf16 passes.
MATMUL_PRECISION = jax.lax.Precision.HIGHEST


def _einsum(spec: str, *operands: jax.Array) -> jax.Array:
  return jnp.einsum(spec, *operands, precision=MATMUL_PRECISION)


def _masked_exp(x: jax.Array, mask: jax.Array) -> jax.Array:
  """exp(x) where mask, else 0; masked entries never reach exp (nor its gradient)."""
  return jnp.where(mask, jnp.exp(jnp.where(mask, x, 0.0)), 0.0)


def _block_doubling_inverse(a: jax.Array) -> jax.Array:
  """(I + a)^-1 for strictly lower-triangular a [..., C, C], any C >= 1.

  The recursive 2x2-block inverse written as full-size masked products: with T the
  inverse of the diagonal blocks of size s, the inverse on blocks of size 2s is
  T - T L T, L being a's lower-left s x s block inside each 2s block (exact since
  L T L = 0); ceil(log2 C) levels of two [C, C] matmuls (the Pallas kernels'
  'doubling' form, kernels/gated_delta_rule/chunk_math.py).
  """
  n = a.shape[-1]
  i = jnp.arange(n)[:, None]
  j = jnp.arange(n)[None, :]
  t = jnp.broadcast_to(jnp.eye(n, dtype=a.dtype), a.shape)
  level = 0
  while (1 << level) < n:
    # Rows in the lower half of a block of 2^(level+1), columns in its upper half.
    lower_left = (((i >> (level + 1)) == (j >> (level + 1)))
                  & (((i >> level) & 1) == 1) & (((j >> level) & 1) == 0))
    l_t = _einsum("...ij,...jk->...ik", jnp.where(lower_left, a, 0.0), t)
    t = t - _einsum("...ij,...jk->...ik", t, l_t)
    level += 1
  return t


@jax.custom_vjp
def _unit_lower_inverse(a: jax.Array) -> jax.Array:
  """(I + a)^-1 for strictly lower-triangular a [..., C, C] (_block_doubling_inverse).

  Why this form: every product is of a's blocks with T, the inverse of smaller
  diagonal blocks, whose entries stay bounded when keys repeat (one key, no decay:
  T_ij = -beta (1 - beta)^(i-j-1)). The power series (I - a)(I + a^2)(I + a^4)...,
  used before, spends as many matmuls, but the powers of a grow like binomial
  coefficients and cancel catastrophically in fp32: errors of 1e8 at T = 256 and
  overflow by T = 1024 for one repeated key. No slicing, so it compiles as fast as
  the series; no jax.scipy.linalg.solve_triangular, whose XLA CPU expansion hung the
  data-parallel train step on two simulated CPU devices (WORKSPACE.md "Fixed
  problem"). The custom VJP, dA = -T^T dT T^T on a's strictly lower part, keeps
  only T for the backward (autodiff of the levels keeps each level's T and costs
  four matmuls a level) and compiles faster.
  """
  return _block_doubling_inverse(a)


def _unit_lower_inverse_fwd(a: jax.Array) -> tuple[jax.Array, jax.Array]:
  t = _block_doubling_inverse(a)
  return t, t


def _unit_lower_inverse_bwd(t: jax.Array, d_t: jax.Array) -> tuple[jax.Array]:
  # d(T) = -T d(A) T; a's entries on and above the diagonal are not free.
  d_a = -_einsum("...ji,...jk->...ik", t, _einsum("...ij,...kj->...ik", d_t, t))
  return (jnp.where(jnp.tri(t.shape[-1], k=-1, dtype=bool), d_a, 0.0),)


_unit_lower_inverse.defvjp(_unit_lower_inverse_fwd, _unit_lower_inverse_bwd)


def _segment_sums(g: jax.Array, strict: jax.Array) -> jax.Array:
  """[..., C] -> [..., C, C]: out[i, j] = g_{j+1} + ... + g_i for i >= j, 0 above the diagonal.

  Summed directly rather than as G_i - G_j: no cancellation when |G| is large
  (g = -30 over a chunk gives G ~ -2000), and the diagonal is a constant 0, so
  the gradient of g does not carry O(1) terms that cancel to its true size.
  """
  terms = jnp.where(strict, g[..., :, None], 0.0)                  # terms[t, j] = g_t [t > j]
  return jnp.cumsum(terms, axis=-2)


def _to_chunks(x: jax.Array, num_chunks: int, chunk: int) -> jax.Array:
  """[B, T', H, ...] -> [B, H, N, C, ...] with T' = N * C."""
  b, _, h = x.shape[:3]
  x = x.reshape(b, num_chunks, chunk, h, *x.shape[3:])
  return jnp.moveaxis(x, 3, 1)


def chunk_gated_delta_rule_xla(q: jax.Array, k: jax.Array, v: jax.Array, g: jax.Array,
                               beta: jax.Array, *, scale: float,
                               initial_state: jax.Array | None,
                               output_final_state: bool,
                               segment_ids: jax.Array | None,
                               chunk_size: int) -> tuple[jax.Array, jax.Array | None]:
  """Chunked form of ``recurrent_gated_delta_rule`` (same arguments, validated by the caller).

  q, k: [B, T, H, Dk]; v: [B, T, H, Dv]; g, beta: [B, T, H]; initial_state
  [B, H, Dk, Dv] or None; segment_ids [B, T] or None. Returns o [B, T, H, Dv]
  in v.dtype and the final state [B, H, Dk, Dv] float32 (or None).
  """
  batch, time, heads, dk = q.shape
  dv = v.shape[-1]
  chunk = min(chunk_size, time)
  num_chunks = math.ceil(time / chunk)
  pad = num_chunks * chunk - time

  f32 = lambda x: jnp.asarray(x, jnp.float32)
  if segment_ids is None:
    starts = None
  else:
    # initial_state belongs to the row's first document: t = 0 is no restart.
    starts = segments.document_starts(segment_ids).at[:, 0].set(False)

  # Padding tokens have g = 0, beta = 0, k = 0 and no document start, so they
  # leave the state untouched; their outputs are sliced off.
  def pad_time(x):
    return jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))

  q_c = _to_chunks(pad_time(f32(q) * scale), num_chunks, chunk)    # [B, H, N, C, Dk]
  k_c = _to_chunks(pad_time(f32(k)), num_chunks, chunk)            # [B, H, N, C, Dk]
  v_c = _to_chunks(pad_time(f32(v)), num_chunks, chunk)            # [B, H, N, C, Dv]
  g_c = _to_chunks(pad_time(f32(g)), num_chunks, chunk)            # [B, H, N, C]
  beta_c = _to_chunks(pad_time(f32(beta)), num_chunks, chunk)      # [B, H, N, C]

  causal = jnp.tril(jnp.ones((chunk, chunk), bool))
  strict = jnp.tril(jnp.ones((chunk, chunk), bool), -1)
  if starts is None:
    same_doc = jnp.ones((1, 1, 1, chunk, chunk), bool)
    continues = jnp.ones((1, 1, 1, chunk), bool)     # token reads h_n
  else:
    starts_c = pad_time(starts).reshape(batch, 1, num_chunks, chunk)
    seg = jnp.cumsum(starts_c.astype(jnp.int32), axis=-1)          # [B, 1, N, C]
    same_doc = seg[..., :, None] == seg[..., None, :]               # [B, 1, N, C, C]
    continues = seg == 0
  last_doc = same_doc[..., -1, :]                                  # token j in last doc

  # Step 1: within-chunk cumulative log decay.
  big_g = jnp.cumsum(g_c, axis=-1)                                 # [B, H, N, C]
  diff = _segment_sums(g_c, strict)                                # G_i - G_j, i >= j
  decay_strict = _masked_exp(diff, strict & same_doc)
  decay_causal = _masked_exp(diff, causal & same_doc)
  decay_from_h = _masked_exp(big_g, continues)                     # e^{G_i} [seg_i == 0]

  # Steps 2-4: A, T = (I + A)^-1, U = T beta V, W = T ([seg == 0] beta e^G K).
  # T comes from _unit_lower_inverse (matmuls only), then U and W are plain matmuls.
  a = beta_c[..., :, None] * _einsum("bhncd,bhnsd->bhncs", k_c, k_c) * decay_strict
  t = _unit_lower_inverse(a)                                       # [B, H, N, C, C]
  u = _einsum("bhncs,bhnsv->bhncv", t, beta_c[..., None] * v_c)
  w = _einsum("bhncs,bhnsk->bhnck", t, (beta_c * decay_from_h)[..., None] * k_c)

  # Ingredients of the carry, still parallel over chunks.
  q_from_h = decay_from_h[..., None] * q_c                         # reads h_n
  k_to_h = _masked_exp(diff[..., -1, :], last_doc)[..., None] * k_c
  h_decay = decay_from_h[..., -1]                                  # [B, H, N]

  # Step 5: the only sequential part.
  def step(h, xs):
    w_n, u_n, q_n, k_n, decay_n = xs
    v_new = u_n - _einsum("bhck,bhkv->bhcv", w_n, h)
    o_inter = _einsum("bhck,bhkv->bhcv", q_n, h)
    h = decay_n[..., None, None] * h + _einsum("bhck,bhcv->bhkv", k_n, v_new)
    return h, (v_new, o_inter)

  if initial_state is None:
    h0 = jnp.zeros((batch, heads, dk, dv), jnp.float32)
  else:
    h0 = f32(initial_state)
  chunk_major = lambda x: jnp.moveaxis(x, 2, 0)
  h_final, (v_new, o_inter) = jax.lax.scan(
      step, h0, (chunk_major(w), chunk_major(u), chunk_major(q_from_h),
                 chunk_major(k_to_h), chunk_major(h_decay)))
  v_new = jnp.moveaxis(v_new, 0, 2)                                # [B, H, N, C, Dv]
  o_inter = jnp.moveaxis(o_inter, 0, 2)

  # Step 6: intra-chunk attention on V_new plus what h_n contributes.
  scores = _einsum("bhncd,bhnsd->bhncs", q_c, k_c) * decay_causal
  o = o_inter + _einsum("bhncs,bhnsv->bhncv", scores, v_new)
  o = jnp.moveaxis(o, 1, 3).reshape(batch, num_chunks * chunk, heads, dv)[:, :time]
  return o.astype(v.dtype), (h_final if output_final_state else None)
