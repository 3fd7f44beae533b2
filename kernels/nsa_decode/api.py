"""One NSA decode step's sparse branches on the Pallas kernel: layout glue and block table."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from lte_jax.kernels.nsa_decode import backend, kernel

F32 = jnp.float32


def _pow2_at_least(n: int, floor: int) -> int:
  return max(floor, 1 << (n - 1).bit_length())


def _pad(x: jax.Array, axis: int, size: int) -> jax.Array:
  if x.shape[axis] == size:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, size - x.shape[axis])
  return jnp.pad(x, widths)


def window_blocks(window_size: int, block_size: int, num_blocks: int) -> int:
  """Blocks a window of window_size + 1 tokens can touch: ceil(w / bs) + 1, at most all."""
  return min(num_blocks, -(-window_size // block_size) + 1)


def nsa_decode_pallas(q: jax.Array, k_cache: jax.Array, v_cache: jax.Array, o_cmp: jax.Array,
                      selected: jax.Array, gates: jax.Array, position: jax.Array, *,
                      block_size: int, window_size: int | None, scale: float,
                      platform: str | None = None, interpret: bool | None = None,
                      **plan_options) -> jax.Array:
  """The rest of an NSA decode step once its compression branch and selection are known.

  q [B, 1, Hq, D]; k_cache [B, L, Hkv, D], v_cache [B, L, Hkv, Dv] (positions
  0..position, L a multiple of block_size); o_cmp [B, Hkv, G, Dv] fp32, the compression
  branch (G = Hq / Hkv); selected [B, Hkv, N] int32, the selected blocks (-1: unused);
  gates [B, 1, Hq, 3] (cmp, slc, swa); position: int scalar. platform: 'gpu' or 'tpu'
  kernel (None: this backend's); interpret: Pallas interpreter (None: on CPU only);
  plan_options: backend.Plan fields (num_warps, num_stages).
  Returns o [B, 1, Hq, Dv] in v_cache.dtype, NaN for a position outside [0, L).
  """
  if interpret is None:
    interpret = jax.default_backend() == "cpu"
  plan = backend.Plan(platform or backend.default_platform(), interpret=interpret,
                      **plan_options)
  batch, _, num_heads, dk = q.shape
  cache_len, num_kv = k_cache.shape[1], k_cache.shape[2]
  dv = v_cache.shape[-1]
  plan.check_block_size(block_size, cache_len)
  group = num_heads // num_kv
  rows = _pow2_at_least(group, plan.min_rows)
  position = jnp.asarray(position, jnp.int32)

  if plan.platform == "gpu":
    # Triton tiles need power-of-two widths >= 16: odd head dims are padded (a copy of
    # the cache; the presets' 64 needs none).
    dk_p, dv_p = _pow2_at_least(dk, 16), _pow2_at_least(dv, 16)
    k_cache, v_cache = _pad(k_cache, 3, dk_p), _pad(v_cache, 3, dv_p)
  else:
    dk_p, dv_p = dk, dv
  qg = _pad(_pad(q[:, 0].reshape(batch, num_kv, group, dk), 2, rows), 3, dk_p)
  g = gates[:, 0].astype(F32).reshape(batch, num_kv, group, 3)
  base = _pad(_pad(g[..., 0:1] * o_cmp.astype(F32), 2, rows), 3, dv_p)
  g_sparse = _pad(jnp.moveaxis(g[..., 1:3], -1, 2)[..., None], 3, rows)   # [B, Hkv, 2, R, 1]

  steps = selected.astype(jnp.int32)
  if window_size is not None:
    count = window_blocks(window_size, block_size, cache_len // block_size)
    first = jnp.maximum(position - window_size, 0) // block_size
    window = jnp.broadcast_to(first + jnp.arange(count, dtype=jnp.int32),
                              (batch, num_kv, count))
    steps = jnp.concatenate([steps, window], axis=-1)
  o = kernel.attend(plan, position.reshape(1), steps, qg, k_cache, v_cache, base, g_sparse,
                    block_size=block_size, top=selected.shape[-1], window=window_size,
                    scale=scale, out_dtype=v_cache.dtype)
  o = o[:, :, :group, :dv].reshape(batch, 1, num_heads, dv)
  # Past the cache the block table is clamped into it: mark the answer undefined.
  return jnp.where((position >= 0) & (position < cache_len), o, jnp.nan)
