"""Public causal softmax attention: ``attention`` and the decode helper ``masked_attention``."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from lte_jax import _checks
from lte_jax.ops.attention import pallas, reference, xla

NOT_AVAILABLE_YET = ("pallas",)
_CUDNN_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


def check_qkv(q, k, v, *, same_time: bool = True) -> None:
  """q [B, Tq, Hq, D], k [B, S, Hkv, D], v [B, S, Hkv, Dv]; Hq a multiple of Hkv, one float
  dtype, no empty dimension."""
  _checks.check_rank("q", q, 4, "[batch, time, heads, head_dim]")
  batch, time, num_heads, head_dim = q.shape
  key_time = time if same_time else None
  _checks.check_shape("k", k, (batch, key_time, None, head_dim),
                      "[batch, time, kv_heads, head_dim]")
  num_kv_heads = k.shape[2]
  _checks.check_shape("v", v, (batch, k.shape[1], num_kv_heads, None),
                      "[batch, time, kv_heads, head_dim_v]")
  _checks.check_nonempty("q", q, "[batch, time, heads, head_dim]")
  _checks.check_nonempty("k", k, "[batch, time, kv_heads, head_dim]")
  _checks.check_nonempty("v", v, "[batch, time, kv_heads, head_dim_v]")
  if num_heads % num_kv_heads:
    raise ValueError(f"q heads ({num_heads}) must be a multiple of k/v heads ({num_kv_heads})")
  for name, x in (("q", q), ("k", k), ("v", v)):
    _checks.check_float_dtype(name, x)
  if not q.dtype == k.dtype == v.dtype:
    raise ValueError(f"q, k and v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")


def check_window_size(window_size, *, optional: bool = True) -> None:
  """None (if optional) or an int in [0, 2**31 - 1]; a window of T or more is the whole
  causal range."""
  if window_size is None and optional:
    return
  _checks.check_positive_int("window_size", window_size, allow_zero=True)


def resolve_scale(scale, head_dim: int) -> float:
  """Default head_dim ** -0.5; otherwise a positive Python number."""
  if scale is None:
    return float(head_dim) ** -0.5
  if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not scale > 0:
    raise ValueError(f"scale must be None or a positive number, got {scale!r}")
  return float(scale)


def check_implementation(implementation, available) -> None:
  """Unknown names and not-yet-available kernels raise, listing what can be used."""
  if implementation is None or implementation in available:
    return
  names = ", ".join(repr(n) for n in available)
  if implementation in NOT_AVAILABLE_YET:
    raise ValueError(f"implementation={implementation!r} is not available yet; "
                     f"available: {names}")
  raise ValueError(f"implementation must be one of ({names}) or None, got {implementation!r}")


def cudnn_unsupported_reason(q, k, v, segment_ids) -> str | None:
  """Why cuDNN flash attention cannot run these inputs, or None when it can."""
  if jax.default_backend() != "gpu":
    return f"a GPU backend (the default backend is {jax.default_backend()!r})"
  if jnp.dtype(q.dtype) not in _CUDNN_DTYPES:
    return f"bfloat16 or float16 inputs (got {jnp.dtype(q.dtype).name})"
  head_dim = q.shape[-1]
  if v.shape[-1] != head_dim:
    return f"v head_dim equal to q/k head_dim (got {v.shape[-1]} vs {head_dim})"
  capability = getattr(jax.devices()[0], "compute_capability", "0")
  max_dim = 256 if float(capability) >= 9.0 else 128
  if head_dim % 8 or head_dim > max_dim:
    return f"head_dim a multiple of 8 and <= {max_dim} (got {head_dim})"
  # Documents become an additive bias; cuDNN's backward with a bias needs even lengths.
  if segment_ids is not None and q.shape[1] % 2:
    return f"an even sequence length when segment_ids are given (got {q.shape[1]})"
  return None


def attention_cudnn(q, k, v, *, window_size, segment_ids, scale):
  """cuDNN flash attention through jax.nn.dot_product_attention (GPU, bf16/fp16).

  Documents are passed as a [B, 1, T, T] boolean mask, which cuDNN turns into
  an additive bias: O(B * T^2) memory in the input dtype.
  """
  reason = cudnn_unsupported_reason(q, k, v, segment_ids)
  if reason is not None:
    raise ValueError(f"implementation='cudnn' requires {reason}")
  mask = None
  if segment_ids is not None:
    mask = segment_ids[:, None, :, None] == segment_ids[:, None, None, :]
  return jax.nn.dot_product_attention(
      q, k, v, mask=mask, scale=scale, is_causal=True,
      local_window_size=None if window_size is None else (window_size, 0),
      implementation="cudnn")


IMPLEMENTATIONS = {
    "reference": reference.attention_reference,
    "xla": xla.attention_xla,
    "cudnn": attention_cudnn,
    "pallas": pallas.attention_pallas,
}


def attention(q: jax.Array, k: jax.Array, v: jax.Array, *, window_size: int | None = None,
              segment_ids: jax.Array | None = None, scale: float | None = None,
              implementation: str | None = None, plan_options: dict | None = None) -> jax.Array:
  """Causal softmax attention with GQA, an optional sliding window and packed documents.

  Args:
    q: [B, T, Hq, D] queries, every dim >= 1; query head h reads KV head h // (Hq // Hkv).
    k: [B, T, Hkv, D] keys.
    v: [B, T, Hkv, Dv] values.
    window_size: None, or the largest distance i - j a query i may look back, an int in
      [0, 2**31 - 1] (so window_size + 1 keys are visible, the current one included).
    segment_ids: [B, T] int; attention never crosses a change of id. None: one document per row.
    scale: logit scale, default D ** -0.5.
    implementation: 'reference', 'xla', 'cudnn' or 'pallas' (the band kernels of
      lte_jax.kernels.lte_attention: work ~ T * window; interpreted on CPU); None
      picks 'cudnn' on a GPU for supported bf16/fp16 inputs and 'xla' otherwise.
    plan_options: with 'pallas' only, kernel Plan fields such as
      {'block_q': 64, 'block_k': 64, 'num_warps': 4} (tuning).

  Returns:
    o [B, T, Hq, Dv] in v.dtype.
  """
  check_qkv(q, k, v)
  check_window_size(window_size)
  _checks.check_segment_ids(segment_ids, q.shape[0], q.shape[1])
  scale = resolve_scale(scale, q.shape[-1])
  check_implementation(implementation, IMPLEMENTATIONS)
  _checks.check_plan_options(plan_options, implementation)
  if implementation is None:
    supported = cudnn_unsupported_reason(q, k, v, segment_ids) is None
    implementation = "cudnn" if supported else "xla"
  extra = {} if plan_options is None else {"plan_options": plan_options}
  return IMPLEMENTATIONS[implementation](q, k, v, window_size=window_size,
                                         segment_ids=segment_ids, scale=scale, **extra)


def masked_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, *,
                     scale: float | None = None) -> jax.Array:
  """GQA softmax attention over the keys where ``mask`` is True (decode and prefill paths).

  Args:
    q: [B, Tq, Hq, D] queries.
    k: [B, S, Hkv, D] keys (e.g. a cache).
    v: [B, S, Hkv, Dv] values.
    mask: [B, Hkv or 1, Tq, S] bool, True where a query may read a key.
    scale: logit scale, default D ** -0.5.

  Returns:
    o [B, Tq, Hq, Dv] in v.dtype; softmax in fp32; a query with no visible key gets zeros.
  """
  check_qkv(q, k, v, same_time=False)
  num_kv_heads = k.shape[2]
  _checks.check_rank("mask", mask, 4, "[batch, kv_heads or 1, query_time, key_time]")
  if mask.shape[1] not in (1, num_kv_heads):
    raise ValueError(f"mask must have shape [batch, kv_heads or 1, query_time, key_time] with "
                     f"kv_heads={num_kv_heads}, got {tuple(mask.shape)}")
  _checks.check_shape("mask", mask, (q.shape[0], None, q.shape[1], k.shape[1]),
                      "[batch, kv_heads or 1, query_time, key_time]")
  if mask.dtype != jnp.bool_:
    raise ValueError(f"mask must have dtype bool, got {jnp.dtype(mask.dtype).name}")
  scale = resolve_scale(scale, q.shape[-1])
  return xla.masked_attention_xla(q, k, v, mask, scale=scale)
