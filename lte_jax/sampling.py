"""Next-token choice from logits: greedy, or sampled with temperature / top-k / top-p.

``SamplingConfig(temperature=0)`` is greedy (argmax). Otherwise logits are
divided by the temperature, cut to the ``top_k`` largest (0: no cut) and to
the smallest set whose probability reaches ``top_p`` (1.0: no cut), then one
token is drawn per row.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
  temperature: float = 0.0   # 0: greedy
  top_k: int = 0             # 0: every token
  top_p: float = 1.0         # 1.0: every token

  def __post_init__(self):
    t, k, p = self.temperature, self.top_k, self.top_p
    if isinstance(t, bool) or not isinstance(t, (int, float)) or not t >= 0:
      raise ValueError(f"temperature must be a number >= 0 (0: greedy), got {t!r}")
    if isinstance(k, bool) or not isinstance(k, int) or k < 0:
      raise ValueError(f"top_k must be an integer >= 0 (0: no cut), got {k!r}")
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 < p <= 1:
      raise ValueError(f"top_p must be a number in (0, 1] (1: no cut), got {p!r}")

  @property
  def greedy(self) -> bool:
    return self.temperature == 0


GREEDY = SamplingConfig()


def sample(key: jax.Array, logits: jax.Array, cfg: SamplingConfig = GREEDY) -> jax.Array:
  """logits [B, V] -> token ids [B] int32."""
  logits = logits.astype(jnp.float32)
  if cfg.greedy:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = logits / cfg.temperature
  if cfg.top_k and cfg.top_k < logits.shape[-1]:
    kth = jax.lax.top_k(logits, cfg.top_k)[0][..., -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  if cfg.top_p < 1:
    sorted_desc = jnp.sort(logits, axis=-1)[..., ::-1]
    probs = jax.nn.softmax(sorted_desc, axis=-1)
    # Mass strictly before each sorted token: a token stays while that is < top_p,
    # so the most likely token always stays.
    before = jnp.cumsum(probs, axis=-1) - probs
    kept = jnp.where(before < cfg.top_p, sorted_desc, jnp.inf)
    cutoff = jnp.min(kept, axis=-1, keepdims=True)
    logits = jnp.where(logits < cutoff, -jnp.inf, logits)
  return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)
