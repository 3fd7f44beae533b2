"""In-kernel algebra of one chunk, shared by every kernel and both lowerings.

Everything here takes and returns 2-D arrays (the Triton lowering has no
batched dots), builds masks from iota (no captured constants) and keeps
per-token scalars as columns [C, 1] or rows [1, C], so that no kernel needs a
transpose of a vector, which Mosaic handles poorly.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

F32 = jnp.float32


def mm(a: jax.Array, b: jax.Array, *, ta: bool = False, tb: bool = False,
       dtype=F32, precision=None) -> jax.Array:
  """a @ b (a^T, b^T when asked) with operands cast to `dtype`, fp32 accumulation.

  fp32 operands use full fp32 products unless `precision` says otherwise: the
  recurrence compounds rounding, and Triton would otherwise drop to TF32.
  """
  a, b = a.astype(dtype), b.astype(dtype)
  dims = (((0,) if ta else (1,), (1,) if tb else (0,)), ((), ()))
  if precision is None and dtype == F32:
    precision = jax.lax.Precision.HIGHEST
  return jax.lax.dot_general(a, b, dims, precision=precision, preferred_element_type=F32)


def column_block(j, block: int):
  """Columns [j * block, (j + 1) * block) of a ref, for a loop index j (a traced
  scalar: qk_grads and wy_grads loop over column blocks with fori_loop, as unrolled
  Python loops let Triton hoist later blocks' loads and spill)."""
  return pl.ds(pl.multiple_of(j * block, block), block)


def masked_exp(x: jax.Array, mask: jax.Array) -> jax.Array:
  """exp(x) where mask, else 0; masked entries never reach exp (nor its gradient)."""
  return jnp.where(mask, jnp.exp(jnp.where(mask, x, 0.0)), 0.0)


def masked_exp2(x: jax.Array, mask: jax.Array) -> jax.Array:
  """2^x where mask, else 0 (in-kernel decays: exp2 is the GPU's native exponential,
  while Triton lowers exp to libdevice's accurate expf around it)."""
  return jnp.where(mask, jnp.exp2(jnp.where(mask, x, 0.0)), 0.0)


def _iota(chunk: int, axis: int) -> jax.Array:
  return jax.lax.broadcasted_iota(jnp.int32, (chunk, chunk), axis)


def decay_masks(g_col: jax.Array, g_row: jax.Array, seg_col: jax.Array,
                seg_row: jax.Array) -> tuple[jax.Array, jax.Array]:
  """In-chunk decays [C, C]: causal[i, j] = e^{G_i - G_j} for j <= i in the same
  document, strict the same for j < i; zero elsewhere.

  g_*: cumulative log decay in base 2, G log2(e) (api.py converts); seg_*: document
  index inside the chunk. One exponential per entry serves both masks.
  """
  chunk = g_col.shape[0]
  i, j = _iota(chunk, 0), _iota(chunk, 1)
  causal = masked_exp2(g_col - g_row, (i >= j) & (seg_col == seg_row))
  return causal, jnp.where(i > j, causal, 0.0)


def strict_lower(x: jax.Array) -> jax.Array:
  """x [C, C] with the diagonal and everything above it zeroed."""
  chunk = x.shape[0]
  return jnp.where(_iota(chunk, 0) > _iota(chunk, 1), x, 0.0)


def rowsum(x: jax.Array) -> jax.Array:
  """[n, m] -> [n, 1]."""
  return jnp.sum(x, axis=1, keepdims=True)


def decay_grads(z: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Z = dD * D [C, C] for a decay matrix D[i, j] = e^{G_i - G_j} -> dG's parts: rows
  [C, 1] (+rowsum) and columns [1, C] (-colsum); the caller adds the two. The diagonal
  decay is a constant e^0: its O(1) terms would enter dG_i twice with opposite signs and
  leave only rounding noise, swamping tiny true gradients, so it is left out."""
  z = strict_lower(z)
  return rowsum(z), -jnp.sum(z, axis=0, keepdims=True)


def unit_lower_inverse(a: jax.Array, precision=jax.lax.Precision.HIGHEST) -> jax.Array:
  """(I + a)^-1 for strictly lower-triangular a [C, C], C a power of two.

  Blockwise doubling: with the inverse T of the diagonal blocks of size s, the
  inverse on blocks of size 2s is T - T L T, L being a's lower-left s x s block
  inside each 2s block (exact since L T L = 0). This is the stable recursive
  block inverse, written as full-size masked products so that it needs no
  slicing; log2(C) levels of two fp32 dots at `precision`.
  """
  chunk = a.shape[0]
  i, j = _iota(chunk, 0), _iota(chunk, 1)
  t = (i == j).astype(F32)
  level = 0
  while (1 << level) < chunk:
    within_pair = (i >> (level + 1)) == (j >> (level + 1))
    off_block = (i >> level) != (j >> level)
    lower_left = jnp.where(within_pair & off_block, a, 0.0)
    t = t - mm(t, mm(lower_left, t, precision=precision), precision=precision)
    level += 1
  return t
