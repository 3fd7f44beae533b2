"""Batched generation through a model's decode caches, compiled end to end.

``generate(model, prompts, lengths, max_new_tokens=...)`` runs ONE compiled
program: ``prefill`` over the first ``prefill_len`` tokens of every row (all
rows share one position, as the caches require), then a ``lax.while_loop``
that feeds one token per step to ``decode``. Prompts of different lengths
need no per-row cache positions: a row whose prompt is longer than the step
position is fed its own next prompt token (teacher forcing through
``decode``, which equals prefill for every mixer), and a row past its prompt
is fed the token just chosen from its last logits. So row b's output equals
running prompt b alone.

    position p:  0 .. prefill_len-1 | prefill_len .......................... |
    row 0 (len 5)   prefill         | gen gen gen ...
    row 1 (len 9)   prefill         | prompt prompt prompt prompt | gen gen ...

A row stops after an EOS id, after a stop id (tokens whose text holds a stop
string: see ``stop_token_ids``), or after ``max_new_tokens``; the loop ends
when every row has stopped.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lte_jax._checks import check_positive_int
from lte_jax.sampling import GREEDY, SamplingConfig, sample


@dataclasses.dataclass(frozen=True)
class Generation:
  """tokens [B, max_new_tokens] int32 (0 after a row's end); num_tokens [B] int32.

  A row's tokens are ``tokens[b, :num_tokens[b]]``, its EOS / stop token included.
  """
  tokens: np.ndarray
  num_tokens: np.ndarray

  def rows(self) -> list[list[int]]:
    return [self.tokens[b, :n].tolist() for b, n in enumerate(self.num_tokens)]


def pad_prompts(prompts: Sequence[Sequence[int]], *, width: int | None = None,
                pad_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """Right-pad token lists into (tokens [B, width] int32, lengths [B] int32)."""
  if not prompts or any(len(p) == 0 for p in prompts):
    raise ValueError("prompts must be a non-empty list of non-empty token lists")
  longest = max(len(p) for p in prompts)
  width = longest if width is None else width
  if width < longest:
    raise ValueError(f"width must be >= the longest prompt ({longest}), got {width}")
  tokens = np.full((len(prompts), width), pad_id, np.int32)
  for b, p in enumerate(prompts):
    tokens[b, :len(p)] = p
  return tokens, np.asarray([len(p) for p in prompts], np.int32)


def stop_token_ids(tokenizer, stop_strings: Iterable[str]) -> tuple[int, ...]:
  """Ids whose decoded text contains one of ``stop_strings`` (e.g. '\\n').

  A token-level check: a stop string split over several tokens is not caught
  here (generation then runs on), so callers also cut the decoded text.
  """
  stops = [s for s in stop_strings]
  if any(not isinstance(s, str) or not s for s in stops):
    raise ValueError(f"stop_strings must be non-empty strings, got {stops!r}")
  if not stops:
    return ()
  return tuple(i for i in range(tokenizer.vocab_size)
               if any(s in tokenizer.decode([i]) for s in stops))


def cut_at_stop(text: str, stop_strings: Iterable[str]) -> str:
  """``text`` up to (not including) the first stop string."""
  cut = len(text)
  for s in stop_strings:
    at = text.find(s)
    if at >= 0:
      cut = min(cut, at)
  return text[:cut]


def generate(model: nnx.Module, prompts, lengths=None, *, max_new_tokens: int,
             sampling: SamplingConfig = GREEDY, eos_ids: Iterable[int] = (),
             stop_ids: Iterable[int] = (), rng: jax.Array | None = None,
             prefill_len: int | None = None, cache_dtype=None) -> Generation:
  """Generate up to ``max_new_tokens`` per row after each prompt.

  Args:
    model: a HybridLM (call ``model.eval()`` first; for LTE layers also
      ``set_attributes(enforce_budget=True)`` so the cache matches training's view).
    prompts: [B, T] int token ids, right-padded; ``lengths`` [B] the real lengths
      (None: every row is T long).
    sampling: greedy by default; temperature / top_k / top_p otherwise (needs ``rng``).
    eos_ids, stop_ids: token ids that end a row (the token is kept in the output).
    prefill_len: tokens of every row run by prefill (<= the shortest prompt; default
      the shortest). A smaller multiple of some bucket limits recompiles when prompt
      lengths vary; the rest runs through the step loop.
    cache_dtype: dtype of the k/v caches (default: the model's compute dtype).
  """
  prompts = np.asarray(prompts)
  if prompts.ndim != 2 or not np.issubdtype(prompts.dtype, np.integer):
    raise ValueError(f"prompts must be an integer array [batch, time], got {prompts.dtype} "
                     f"with shape {prompts.shape}")
  b, t = prompts.shape
  lengths = np.full((b,), t, np.int32) if lengths is None else np.asarray(lengths, np.int32)
  if lengths.shape != (b,) or lengths.min() < 1 or lengths.max() > t:
    raise ValueError(f"lengths must be [batch={b}] integers in [1, {t}], got {lengths.tolist()}")
  check_positive_int("max_new_tokens", max_new_tokens)
  if not isinstance(sampling, SamplingConfig):
    raise ValueError(f"sampling must be a SamplingConfig, got {type(sampling).__name__}")
  if not sampling.greedy and rng is None:
    raise ValueError("rng must be a jax.random key when sampling (temperature > 0)")
  shortest = int(lengths.min())
  prefill_len = shortest if prefill_len is None else prefill_len
  check_positive_int("prefill_len", prefill_len)
  if prefill_len > shortest:
    raise ValueError(f"prefill_len must be <= the shortest prompt ({shortest}), got {prefill_len}")
  rng = jax.random.key(0) if rng is None else rng
  graphdef, state = nnx.split(model)
  run = _compiled(graphdef, prefill_len, max_new_tokens, sampling,
                  tuple(sorted({int(i) for i in eos_ids} | {int(i) for i in stop_ids})),
                  cache_dtype)
  tokens, num = run(state, jnp.asarray(prompts, jnp.int32), jnp.asarray(lengths), rng)
  return Generation(np.asarray(tokens), np.asarray(num))


@functools.lru_cache(maxsize=32)
def _compiled(graphdef, prefill_len, max_new, sampling, end_ids, cache_dtype):
  """A jitted generate for one model structure and static setting."""

  def run(state, prompts, lengths, rng):
    model = nnx.merge(graphdef, state)
    b, t = prompts.shape
    cache = model.init_cache(b, t + max_new, cache_dtype)
    logits, cache = model.prefill(prompts[:, :prefill_len], cache)
    end = jnp.asarray(end_ids if end_ids else (-1,), jnp.int32)
    rows = jnp.arange(b)
    # Every row stops within (longest prompt - prefill_len) + max_new steps.
    last_step = t - prefill_len + max_new

    # The parameters ride in the carry: a module merged inside the body from
    # arrays of the outer trace is rejected by NNX when a layer writes to it.
    def cond(carry):
      _, step, _, _, _, _, done = carry
      return (step < last_step) & ~jnp.all(done)

    def body(carry):
      params, step, cache, last, out, num, done = carry
      pos = prefill_len + step
      chosen = sample(jax.random.fold_in(rng, step), last, sampling)
      in_prompt = pos < lengths
      tok = jnp.where(in_prompt, prompts[:, jnp.minimum(pos, t - 1)], chosen)
      write = ~in_prompt & ~done
      # Rows that are not writing aim past the buffer; mode='drop' ignores them.
      col = jnp.where(write, pos - lengths, max_new)
      out = out.at[rows, col].set(tok, mode="drop")
      num = num + write
      done = done | (write & jnp.any(tok[:, None] == end[None, :], axis=-1)) | (num >= max_new)
      logits, cache = nnx.merge(graphdef, params).decode(tok[:, None], cache)
      return params, step + 1, cache, logits[:, 0], out, num, done

    carry = (state, jnp.int32(0), cache, logits[:, -1], jnp.zeros((b, max_new), jnp.int32),
             jnp.zeros((b,), jnp.int32), jnp.zeros((b,), bool))
    *_, out, num, _ = jax.lax.while_loop(cond, body, carry)
    return out, num

  return jax.jit(run)
