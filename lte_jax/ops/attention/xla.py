"""Memory-aware softmax attention in plain JAX, shared by every masked-softmax op.

The engine, ``blockwise_attention``, walks over blocks of queries with
``lax.map`` and rematerialises each block in the backward pass, so at most one
block of fp32 logits, [B, Hq, block_q, keys], is alive at a time instead of the
whole [B, Hq, T, T]. Which keys a query sees comes from a ``mask_fn`` that
builds one block of the mask from index vectors, so causal/window/document
attention and LTE's retain pattern reuse the same softmax. Inputs may be
bf16; logits, softmax statistics and the P @ V accumulation are fp32.
"""
from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp

# 512 queries x 4096 keys x fp32 is 8 MiB per (batch, head): small next to the
# activations of a layer, large enough that each matmul keeps the chip busy.
DEFAULT_BLOCK_Q = 512

# mask_fn(q_idx [Bq] int32, k_idx [Sk] int32) -> [B or 1, Hkv or 1, Bq, Sk] bool.
MaskFn = Callable[[jax.Array, jax.Array], jax.Array]


def _einsum(spec: str, a: jax.Array, b: jax.Array) -> jax.Array:
  """An fp32-accumulated product; fp32 operands at full fp32 (the GPU default, TF32,
  rounds logits of ~1e3 by ~1: 0.15 relative error in dk on an H100, check_adversarial)."""
  fp32 = a.dtype == jnp.float32 and b.dtype == jnp.float32
  return jnp.einsum(spec, a, b, preferred_element_type=jnp.float32,
                    precision=jax.lax.Precision.HIGHEST if fp32 else None)


def _probabilities(q, k, mask, scale):
  """Masked fp32 softmax probabilities of one block.

  q [B, Bq, Hkv, G, D], k [B, Sk, Hkv, D], mask [B or 1, Hkv or 1, Bq, Sk]
  -> p [B, Hkv, G, Bq, Sk], exactly 0 where masked and on rows with no visible key.
  Normalised as exp(logits - row max) / sum, not exp(logits - lse): an fp32 lse of
  logits near 1e3 - 1e4 is off by ~|logit| * 2^-24, which would scale every probability
  by up to 1 +- 1e-3 (the backward recomputes p here rather than saving an lse).
  """
  logits = _einsum("bqhgd,bkhd->bhgqk", q, k) * scale
  logits = jnp.where(mask[:, :, None], logits, -jnp.inf)
  row_max = jnp.max(logits, axis=-1, keepdims=True)
  row_max = jnp.where(jnp.isneginf(row_max), 0.0, row_max)
  e = jnp.exp(logits - row_max)
  denom = jnp.sum(e, axis=-1, keepdims=True)
  return e / jnp.where(denom > 0, denom, 1.0)


def _split_heads(q, num_kv_heads):
  batch, block, num_heads, head_dim = q.shape
  return q.reshape(batch, block, num_kv_heads, num_heads // num_kv_heads, head_dim)


def _attend_fwd(q, k, v, mask, scale):
  qg = _split_heads(q, k.shape[2])
  p = _probabilities(qg, k, mask, scale)
  o = _einsum("bhgqk,bkhd->bqhgd", p.astype(v.dtype), v)
  o = o.reshape(*q.shape[:3], v.shape[-1])
  return o, (q, k, v, mask, o)


def _attend_bwd(scale, res, do):
  # The flash-attention backward: dP and the row term D = rowsum(dO * O) stay in
  # fp32, which autodiff of a bf16 P @ V would round to bf16 (and then dS, the
  # small difference dP - D, would lose most of its bits).
  q, k, v, mask, o = res
  num_kv_heads = k.shape[2]
  qg = _split_heads(q, num_kv_heads)
  do = _split_heads(do.astype(v.dtype), num_kv_heads)  # [B, Bq, Hkv, G, Dv]
  p = _probabilities(qg, k, mask, scale)
  dv = _einsum("bhgqk,bqhgd->bkhd", p.astype(v.dtype), do)
  dp = _einsum("bqhgd,bkhd->bhgqk", do, v)
  row = jnp.sum(do.astype(jnp.float32) * _split_heads(o, num_kv_heads), axis=-1)
  ds = (p * (dp - jnp.transpose(row, (0, 2, 3, 1))[..., None])).astype(q.dtype)
  dq = _einsum("bhgqk,bkhd->bqhgd", ds, k) * scale
  dk = _einsum("bhgqk,bqhgd->bkhd", ds, qg) * scale
  return (dq.reshape(q.shape).astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _attend(q, k, v, mask, scale):
  return _attend_fwd(q, k, v, mask, scale)[0]


_attend.defvjp(_attend_fwd, _attend_bwd)


def attend_block(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, *,
                 scale: float) -> jax.Array:
  """One block: q [B, Bq, Hq, D], k [B, Sk, Hkv, D], v [B, Sk, Hkv, Dv],
  mask [B or 1, Hkv or 1, Bq, Sk] bool -> o [B, Bq, Hq, Dv] float32.

  Query head h reads KV head h // (Hq // Hkv); a row with no visible key gives
  zeros and zero gradients. Logits, softmax and accumulation are fp32; P and dS
  meet the matmuls in the input dtype, as in flash attention.
  """
  return _attend(q, k, v, mask, scale)


def blockwise_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask_fn: MaskFn, *,
                        scale: float, block_q: int = DEFAULT_BLOCK_Q,
                        lookback: int | None = None) -> jax.Array:
  """Masked GQA softmax attention, one block of queries at a time.

  q [B, Tq, Hq, D], k [B, S, Hkv, D], v [B, S, Hkv, Dv] -> o [B, Tq, Hq, Dv] float32.
  ``mask_fn(q_idx, k_idx)`` gives the visibility of keys ``k_idx`` to queries
  ``q_idx`` (indices into the time axes; q_idx may run past Tq in the last
  block, k_idx outside [0, S) is masked here). With ``lookback`` (self-attention
  only, Tq == S) query block [i0, i0 + block_q) reads only keys
  [i0 - lookback, i0 + block_q): the caller promises the mask is False elsewhere.
  Memory: O(B * Hq * block_q * keys_per_block) fp32 in forward and backward.
  """
  batch, time_q, num_heads, head_dim = q.shape
  time_k = k.shape[1]

  def block_out(q_blk, k_blk, v_blk, q_idx, k_idx):
    mask = mask_fn(q_idx, k_idx) & ((k_idx >= 0) & (k_idx < time_k))
    return attend_block(q_blk, k_blk, v_blk, mask, scale=scale)

  if time_q <= block_q:
    return block_out(q, k, v, jnp.arange(time_q), jnp.arange(time_k))

  num_blocks = -(-time_q // block_q)
  padded = num_blocks * block_q
  q_blocks = jnp.pad(q, ((0, 0), (0, padded - time_q), (0, 0), (0, 0)))
  q_blocks = jnp.moveaxis(q_blocks.reshape(batch, num_blocks, block_q, num_heads, head_dim), 1, 0)

  if lookback is not None and lookback + block_q < time_k:
    span = lookback + block_q
    # Pad so every slice [i0 - lookback, i0 + block_q) is in range.
    pad = ((0, 0), (lookback, max(0, padded - time_k)), (0, 0), (0, 0))
    k_pad, v_pad = jnp.pad(k, pad), jnp.pad(v, pad)

    def body(args):
      q_blk, blk = args
      start = blk * block_q
      k_blk = jax.lax.dynamic_slice_in_dim(k_pad, start, span, axis=1)
      v_blk = jax.lax.dynamic_slice_in_dim(v_pad, start, span, axis=1)
      k_idx = start - lookback + jnp.arange(span)
      return block_out(q_blk, k_blk, v_blk, start + jnp.arange(block_q), k_idx)
  else:
    def body(args):
      q_blk, blk = args
      start = blk * block_q
      return block_out(q_blk, k, v, start + jnp.arange(block_q), jnp.arange(time_k))

  # Rematerialise each block in the backward pass: only q blocks are saved.
  out = jax.lax.map(jax.checkpoint(body, prevent_cse=False), (q_blocks, jnp.arange(num_blocks)))
  out = jnp.moveaxis(out, 0, 1).reshape(batch, padded, num_heads, v.shape[-1])
  return out[:, :time_q]


def take_time(x: jax.Array, idx: jax.Array) -> jax.Array:
  """x [B, T, ...] gathered at time indices idx (clipped into range) -> [B, len(idx), ...]."""
  return jnp.take(x, jnp.clip(idx, 0, x.shape[1] - 1), axis=1)


def causal_mask_fn(segment_ids: jax.Array | None, window_size: int | None) -> MaskFn:
  """Mask builder for causal attention with an optional window (max distance) and documents."""
  def mask_fn(q_idx, k_idx):
    dist = q_idx[:, None] - k_idx[None, :]
    mask = dist >= 0
    if window_size is not None:
      mask = mask & (dist <= window_size)
    mask = mask[None, None]
    if segment_ids is not None:
      seg_q = take_time(segment_ids, q_idx)
      seg_k = take_time(segment_ids, k_idx)
      mask = mask & (seg_q[:, None, :, None] == seg_k[:, None, None, :])
    return mask
  return mask_fn


def attention_xla(q: jax.Array, k: jax.Array, v: jax.Array, *, window_size: int | None,
                  segment_ids: jax.Array | None, scale: float,
                  block_q: int = DEFAULT_BLOCK_Q) -> jax.Array:
  """Causal attention: q [B, T, Hq, D], k [B, T, Hkv, D], v [B, T, Hkv, Dv] -> [B, T, Hq, Dv].

  With a window only the keys [i0 - window_size, i0 + block_q) of each query
  block are read, so sliding-window attention costs O(T * (window + block_q)).
  """
  o = blockwise_attention(q, k, v, causal_mask_fn(segment_ids, window_size), scale=scale,
                          block_q=block_q, lookback=window_size)
  return o.astype(v.dtype)


def masked_attention_xla(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, *,
                         scale: float, block_q: int = DEFAULT_BLOCK_Q) -> jax.Array:
  """q [B, Tq, Hq, D], k [B, S, Hkv, D], v [B, S, Hkv, Dv], mask [B, Hkv or 1, Tq, S] bool
  -> o [B, Tq, Hq, Dv] in v.dtype."""
  def mask_fn(q_idx, k_idx):
    rows = jnp.take(mask, jnp.clip(q_idx, 0, mask.shape[2] - 1), axis=2)
    return jnp.take(rows, jnp.clip(k_idx, 0, mask.shape[3] - 1), axis=3)

  return blockwise_attention(q, k, v, mask_fn, scale=scale, block_q=block_q).astype(v.dtype)
