"""Public Native Sparse Attention: ``nsa_attention`` (sequences) and ``nsa_decode`` (one step)."""
from __future__ import annotations

import jax

from lte_jax import _checks
from lte_jax.ops.attention.api import (check_implementation, check_qkv, check_window_size,
                                       resolve_scale)
from lte_jax.ops.nsa_attention import decode, decode_pallas, pallas, reference, xla

IMPLEMENTATIONS = {
    "reference": reference.nsa_attention_reference,
    "xla": xla.nsa_attention_xla,
    "pallas": pallas.nsa_attention_pallas,
}
# nsa_decode's steps: plain JAX, or selection in plain JAX then lte_jax.kernels.nsa_decode.
DECODE_IMPLEMENTATIONS = {
    "xla": decode.nsa_decode_xla,
    "pallas": decode_pallas.nsa_decode_pallas,
}
# implementation=None per backend. GPU: 'pallas', measured on an H100 (2026-12-07,
# BENCHMARKS.md): forward+backward 11.6 ms against 'xla' 110 ms at (4, 4096, 32 / 2 heads,
# 64) and 28.3 against 243 ms at (1, 16384, ...), blocks of 64, 16 selected, window 512.
# TPU keeps 'xla' until the Mosaic kernels have run on a TPU; the CPU runs Pallas only
# interpreted. Block sizes the kernels cannot take fall back to 'xla'.
DEFAULT_IMPLEMENTATIONS = {"gpu": "pallas", "tpu": "xla", "cpu": "xla"}
# Blocks 0, c - 1 and c are always selected, so fewer slots could not hold them.
MIN_BLOCK_COUNT = 3


def check_block_args(block_size, block_count) -> None:
  _checks.check_positive_int("block_size", block_size)
  _checks.check_positive_int("block_count", block_count)
  if block_count < MIN_BLOCK_COUNT:
    raise ValueError(f"block_count must be an integer >= {MIN_BLOCK_COUNT} (blocks 0, c - 1 "
                     f"and c are always selected), got {block_count!r}")


def default_implementation(backend: str | None = None, block_size: int = 64) -> str:
  name = DEFAULT_IMPLEMENTATIONS.get(backend or jax.default_backend(), "xla")
  return "xla" if name == "pallas" and not _pallas_block_size(block_size) else name


def _pallas_block_size(block_size) -> bool:
  return block_size >= 16 and not block_size & (block_size - 1)


def check_pallas_block_size(block_size) -> None:
  """The kernels read K/V in aligned tiles of block_size rows: Triton blocks are powers
  of two and its dots need every dim >= 16."""
  if not _pallas_block_size(block_size):
    raise ValueError(f"block_size must be a power of two >= 16 for implementation='pallas', "
                     f"got {block_size!r}")


def check_gates(gates, q) -> None:
  batch, time, num_heads, _ = q.shape
  _checks.check_shape("gates", gates, (batch, time, num_heads, 3),
                      "[batch, time, q_heads, 3 branches (cmp, slc, swa)]")
  _checks.check_float_dtype("gates", gates)


def nsa_attention(q: jax.Array, k: jax.Array, v: jax.Array, gates: jax.Array, *,
                  block_size: int = 64, block_count: int = 16, window_size: int | None = 511,
                  segment_ids: jax.Array | None = None, scale: float | None = None,
                  implementation: str | None = None,
                  plan_options: dict | None = None) -> jax.Array:
  """Causal Native Sparse Attention with mean-pooled compression (PAPER.md section 4).

  Three branches per query i (in-document position p, current block c = p // block_size):
    cmp: attention over the means of the block_size-token blocks complete by i;
    slc: attention over the tokens j <= i of the selected blocks: 0, c - 1, c, and the
         blocks with the largest cmp probabilities summed over the query heads of the
         KV group, block_count blocks in all (fewer while fewer exist);
    swa: attention over i - window_size <= j <= i.
  o = gates[..., 0] * o_cmp + gates[..., 1] * o_slc + gates[..., 2] * o_swa.

  Gradients: selection is a hard choice and carries none. The compression branch is
  trained through its own output o_cmp only, which reaches q and, through the mean
  pooling, k and v; as in the reference, where the selection kernel reads but never
  differentiates the compression probabilities.

  Args:
    q: [B, T, Hq, D] queries; query head h reads KV head h // (Hq // Hkv).
    k: [B, T, Hkv, D] keys.
    v: [B, T, Hkv, Dv] values.
    gates: [B, T, Hq, 3] gate values (sigmoid outputs) for (cmp, slc, swa).
    block_size: tokens per block (compression and selection); blocks start at each
      document's first token.
    block_count: blocks selected per query, >= 3.
    window_size: None (no sliding branch; gates[..., 2] unused) or the largest distance
      i - j of the window (window_size + 1 tokens; the reference's 512 is 511 here).
    segment_ids: [B, T] int document ids; None: one document per row.
    scale: logit scale of every branch, default D ** -0.5.
    implementation: 'reference', 'xla' or 'pallas' (None: default_implementation(), 'pallas'
      on GPU where block_size allows, else 'xla'). 'pallas' reads only
      the selected blocks (lte_jax.kernels.nsa_attention; block_size a power of two >= 16)
      and runs the sliding window on the band kernels; interpreted on CPU.
    plan_options: 'pallas' only: lte_jax.kernels.nsa_attention.Plan fields, e.g.
      {'block_t': 2, 'num_warps': 2} (parse_options('block_t=2;num_warps=2')).

  Returns:
    o [B, T, Hq, Dv] in v.dtype.
  """
  check_qkv(q, k, v)
  check_gates(gates, q)
  check_block_args(block_size, block_count)
  check_window_size(window_size)
  _checks.check_segment_ids(segment_ids, q.shape[0], q.shape[1])
  scale = resolve_scale(scale, q.shape[-1])
  check_implementation(implementation, IMPLEMENTATIONS)
  name = default_implementation(block_size=block_size) if implementation is None else (
      implementation)
  extra = {}
  if name == "pallas":
    check_pallas_block_size(block_size)
    extra = dict(plan_options=plan_options)
  elif plan_options is not None:
    raise ValueError(f"plan_options is for implementation='pallas' only, got "
                     f"implementation={implementation!r}")
  return IMPLEMENTATIONS[name](q, k, v, gates, block_size=block_size, block_count=block_count,
                               window_size=window_size, segment_ids=segment_ids, scale=scale,
                               **extra)


def nsa_decode(q: jax.Array, k_cache: jax.Array, v_cache: jax.Array, k_cmp: jax.Array,
               v_cmp: jax.Array, gates: jax.Array, position: jax.Array, *,
               block_size: int = 64, block_count: int = 16, window_size: int | None = 511,
               scale: float | None = None, implementation: str | None = None) -> jax.Array:
  """One decode step of ``nsa_attention`` (one document per row, all rows at ``position``).

  Args:
    q: [B, 1, Hq, D] the query at ``position``.
    k_cache, v_cache: [B, L, Hkv, D] / [B, L, Hkv, Dv] keys and values of positions
      0..position (later slots are ignored); L a multiple of block_size.
    k_cmp, v_cmp: [B, L / block_size, Hkv, D] / [..., Dv]: the mean of each block complete
      by ``position`` (later blocks are ignored).
    gates: [B, 1, Hq, 3] gate values for (cmp, slc, swa).
    position: int scalar, the query's position, in [0, L): checked (ValueError) when
      concrete; traced under jit it cannot be checked without a host sync, and a
      position outside the cache gives a NaN output.
    block_size, block_count, window_size, scale: as ``nsa_attention``.
    implementation: 'xla' (gathers the selected blocks; the default) or 'pallas' (one
      kernel per (batch, KV head) reads the selected and window blocks of the cache in
      place, lte_jax.kernels.nsa_decode; block_size a power of two >= 16; interpreted on
      CPU). Both share the compression branch and the selection (plain JAX).

  Returns:
    o [B, 1, Hq, Dv] in v_cache.dtype, equal to row ``position`` of ``nsa_attention``.
  """
  _checks.check_shape("q", q, (None, 1, None, None), "[batch, 1, q_heads, head_dim]")
  check_qkv(q, k_cache, v_cache, same_time=False)
  check_gates(gates, q)
  check_block_args(block_size, block_count)
  check_window_size(window_size)
  batch, cache_len, num_kv_heads, head_dim = k_cache.shape
  if cache_len % block_size:
    raise ValueError(f"k_cache length ({cache_len}) must be a multiple of "
                     f"block_size={block_size}")
  layout = "[batch, cache_len / block_size, kv_heads, head_dim]"
  _checks.check_shape("k_cmp", k_cmp, (batch, cache_len // block_size, num_kv_heads, head_dim),
                      layout)
  _checks.check_shape("v_cmp", v_cmp, (batch, cache_len // block_size, num_kv_heads,
                                       v_cache.shape[-1]), layout)
  _checks.check_rank("position", position, 0, "[] (a scalar)")
  _checks.check_int_dtype("position", position)
  _checks.check_values("position", position, lambda p: (p >= 0) & (p < cache_len),
                       f"in [0, cache length) = [0, {cache_len})")
  scale = resolve_scale(scale, head_dim)
  check_implementation(implementation, DECODE_IMPLEMENTATIONS)
  if implementation == "pallas":
    check_pallas_block_size(block_size)
  step = DECODE_IMPLEMENTATIONS[implementation or "xla"]
  return step(q, k_cache, v_cache, k_cmp, v_cmp, gates, position, block_size=block_size,
              block_count=block_count, window_size=window_size, scale=scale)
