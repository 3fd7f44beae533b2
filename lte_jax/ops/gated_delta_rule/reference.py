"""Recurrent gated delta rule: the obviously correct float32 reference.

One token at a time, state h [B, H, Dk, Dv] (h = S^T of PAPER.md section 2):
  h <- exp(g_t) h;  v'_t = beta_t (v_t - h^T k_t);  h <- h + k_t v'_t^T;
  o_t = h^T (scale q_t).
With T = 1 this is also the decode step.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from lte_jax import segments
from lte_jax.ops.gated_delta_rule.validation import validate_args

# Full float32 products even where the backend would default to TF32/bf16 passes.
_HIGHEST = jax.lax.Precision.HIGHEST


def recurrent_gated_delta_rule(q: jax.Array, k: jax.Array, v: jax.Array, g: jax.Array,
                               beta: jax.Array, *, scale: float | None = None,
                               initial_state: jax.Array | None = None,
                               output_final_state: bool = False,
                               segment_ids: jax.Array | None = None
                               ) -> tuple[jax.Array, jax.Array | None]:
  """Gated delta rule by a scan over time.

  Args:
    q, k: [B, T, H, Dk] (used as given: normalise them beforehand).
    v: [B, T, H, Dv].
    g: [B, T, H] log decay (<= 0).  beta: [B, T, H] write strength.
    scale: query scale; None means Dk ** -0.5.
    initial_state: [B, H, Dk, Dv] state before t = 0 (zeros when None); it
      belongs to the first document of each row only.
    output_final_state: also return the state after the last token.
    segment_ids: [B, T] int; the state restarts from zero at every document
      start after t = 0.

  Returns:
    o [B, T, H, Dv] in v.dtype and the final state [B, H, Dk, Dv] float32
    (None unless output_final_state).
  """
  batch, time, heads, dk, dv = validate_args(q, k, v, g, beta, scale=scale,
                                             initial_state=initial_state,
                                             segment_ids=segment_ids)
  scale = dk ** -0.5 if scale is None else scale
  f32 = lambda x: jnp.asarray(x, jnp.float32)
  if initial_state is None:
    h0 = jnp.zeros((batch, heads, dk, dv), jnp.float32)
  else:
    h0 = f32(initial_state)
  if segment_ids is None:
    reset = jnp.zeros((batch, time), bool)
  else:
    # The row's first document continues from initial_state, so t = 0 never resets.
    reset = segments.document_starts(segment_ids).at[:, 0].set(False)

  h, o = recurrence(f32(q), f32(k), f32(v), f32(g), f32(beta), h0, reset, scale=scale)
  o = o.astype(v.dtype)
  return o, (h if output_final_state else None)


def recurrence(q: jax.Array, k: jax.Array, v: jax.Array, g: jax.Array, beta: jax.Array,
               h0: jax.Array, reset: jax.Array, *, scale: float | None = None
               ) -> tuple[jax.Array, jax.Array]:
  """The bare recurrence in the inputs' own dtype (float64 under x64: the oracle of the
  adversarial tests and experiments.check_adversarial), no validation.

  q, k [B, T, H, Dk], v [B, T, H, Dv], g, beta [B, T, H], h0 [B, H, Dk, Dv], reset
  [B, T] bool (the state restarts from zero before that token) -> (final h, o [B, T, H, Dv]).
  """
  scale = q.shape[-1] ** -0.5 if scale is None else scale

  def step(h, xs):
    q_t, k_t, v_t, g_t, beta_t, reset_t = xs
    h = jnp.where(reset_t[:, None, None, None], 0.0, h)
    h = jnp.exp(g_t)[..., None, None] * h
    h_k = jnp.einsum("bhkv,bhk->bhv", h, k_t, precision=_HIGHEST)
    v_new = beta_t[..., None] * (v_t - h_k)
    h = h + k_t[..., :, None] * v_new[..., None, :]
    o_t = jnp.einsum("bhkv,bhk->bhv", h, scale * q_t, precision=_HIGHEST)
    return h, o_t

  time_major = lambda x: jnp.moveaxis(x, 1, 0)
  h, o = jax.lax.scan(step, h0, tuple(map(time_major, (q, k, v, g, beta, reset))))
  return h, jnp.moveaxis(o, 0, 1)
