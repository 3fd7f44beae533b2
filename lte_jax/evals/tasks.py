"""Run one retrieval task at one context length and score it (EVALS.md).

Every runner returns a dict: ``score`` (0-100), ``num_samples``, ``chance`` (the
score of a uniform guess of the answer, from the task's generator; None where the
answer is document text) with ``chance_basis`` (what that guess is) and task
details; NIAH runners add ``samples`` (needle depth and 0/1 hit of each sample) for
the depth heatmap.
"""
from __future__ import annotations

from typing import Sequence

import jax.numpy as jnp
import numpy as np
from flax import nnx

from lte_jax.data.retrieval import (NIAH_TASKS, NUMBER_RANGE, UUID_RANDOM_BITS, make_niah,
                                    mqar_batch)
from lte_jax.data.tokenizers import Tokenizer
from lte_jax.evals import evaporate
from lte_jax.evals.metrics import contains_any, mqar_accuracy, substring_match
from lte_jax.generate import cut_at_stop, generate, pad_prompts, stop_token_ids

NIAH_MAX_NEW_TOKENS = 128
TASKS = tuple(NIAH_TASKS) + ("mqar",) + evaporate.EVAPORATE_TASKS


def niah_chance(task: str) -> tuple[float, str]:
  """(score 0-100 of guessing the needle's value uniformly, what is guessed)."""
  kind = NIAH_TASKS[task][1]
  if kind == "number":
    count = NUMBER_RANGE[1] - NUMBER_RANGE[0]
    return 100.0 / count, f"a 7-digit number, 1 in {count:,}"
  return 100.0 / 2**UUID_RANDOM_BITS, f"a UUID, 1 in 2^{UUID_RANDOM_BITS}"


def mqar_chance(vocab_size: int, num_pairs: int) -> tuple[float, str]:
  """(score 0-100 of a uniform guess among the value ids, what is guessed): values are
  drawn from the upper half of the MQAR vocab (retrieval.mqar_batch)."""
  values = vocab_size - vocab_size // 2
  return 100.0 / values, (f"one of {values} value ids (one of the {num_pairs} values in the "
                          f"context: {100.0 / num_pairs:.3g})")


def generate_texts(model, tokenizer: Tokenizer, prompts: Sequence[Sequence[int]], *,
                   max_new_tokens: int, stop_strings: Sequence[str] = (),
                   batch_size: int = 8, prefill_bucket: int = 64) -> list[str]:
  """Greedy continuations of ``prompts`` (token ids, BOS included), cut at a stop string.

  Prompts are batched in order of length; batches share one width (the longest
  prompt) and a batch's prefill length is rounded down to a multiple of
  ``prefill_bucket``, so few programs are compiled; the last batch is filled up
  with copies of its first prompt. Texts come back in the order of ``prompts``.
  """
  width = max(len(p) for p in prompts)
  stop_ids = stop_token_ids(tokenizer, stop_strings)
  # Batches of similar lengths: less of each prompt runs through the step loop.
  order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
  texts = []
  for start in range(0, len(prompts), batch_size):
    chunk = [prompts[i] for i in order[start:start + batch_size]]
    real = len(chunk)
    chunk += [chunk[0]] * (batch_size - real)
    tokens, lengths = pad_prompts(chunk, width=width, pad_id=tokenizer.pad_id)
    shortest = int(lengths.min())
    prefill_len = shortest // prefill_bucket * prefill_bucket or shortest
    out = generate(model, tokens, lengths, max_new_tokens=max_new_tokens,
                   eos_ids=[tokenizer.eos_id], stop_ids=stop_ids, prefill_len=prefill_len)
    texts += [cut_at_stop(tokenizer.decode(row), stop_strings) for row in out.rows()[:real]]
  by_prompt = [""] * len(prompts)
  for i, text in zip(order, texts):
    by_prompt[i] = text
  return by_prompt


def run_niah(model, tokenizer: Tokenizer, task: str, length: int, *, num_samples: int,
             seed: int, batch_size: int, max_new_tokens: int = NIAH_MAX_NEW_TOKENS) -> dict:
  """RULER S-NIAH: prompts filled so BOS + prompt + 128 fit ``length``; substring match."""
  rng = np.random.default_rng([seed, length, TASKS.index(task)])
  examples = [make_niah(rng, tokenizer, length - 1, task=task, reserve_tokens=NIAH_MAX_NEW_TOKENS)
              for _ in range(num_samples)]
  prompts = [[tokenizer.bos_id, *tokenizer.encode(ex.prompt)] for ex in examples]
  preds = generate_texts(model, tokenizer, prompts, max_new_tokens=max_new_tokens,
                         batch_size=batch_size)
  hits = [substring_match(p, ex.answer) for p, ex in zip(preds, examples)]
  chance, basis = niah_chance(task)
  return {"score": 100.0 * float(np.mean(hits)), "num_samples": num_samples,
          "chance": chance, "chance_basis": basis,
          "prompt_tokens": [min(map(len, prompts)), max(map(len, prompts))],
          "samples": [{"depth": ex.depth, "hit": h} for ex, h in zip(examples, hits)],
          "examples": [{"answer": ex.answer, "prediction": p}
                       for ex, p in list(zip(examples, preds))[:3]]}


def mqar_num_pairs(seq_len: int, vocab_size: int) -> int:
  """Default N at length L: L/16 as zoology's sweep (4 at 64 ... 16 at 256), capped by the
  distinct keys the vocab holds."""
  return max(1, min(seq_len // 16, vocab_size // 2 - 1))


def run_mqar(model, *, length: int, vocab_size: int, offset: int, bos_id: int,
             num_samples: int, seed: int, batch_size: int, num_pairs: int = 0,
             alpha: float = 0.01) -> dict:
  """MQAR as zoology: one teacher-forced pass, accuracy of the argmax at the queries.

  A sequence is BOS + L MQAR tokens, L the largest even number with L + 1 <= length
  (the layout the training pipeline uses).
  """
  seq_len = (length - 1) // 2 * 2
  num_pairs = num_pairs or mqar_num_pairs(seq_len, vocab_size)
  rng = np.random.default_rng([seed, length, TASKS.index("mqar")])
  data = mqar_batch(rng, num_samples, vocab_size=vocab_size, seq_len=seq_len,
                    num_pairs=num_pairs, alpha=alpha, offset=offset)
  inputs = np.concatenate([np.full((num_samples, 1), bos_id, np.int32), data.inputs], axis=1)
  forward = nnx.jit(lambda m, x: jnp.argmax(m(x)[0], axis=-1))
  preds = []
  for start in range(0, num_samples, batch_size):
    chunk = inputs[start:start + batch_size]
    real = len(chunk)
    chunk = np.concatenate([chunk, np.repeat(chunk[:1], batch_size - real, axis=0)])
    preds.append(np.asarray(forward(model, jnp.asarray(chunk)))[:real])
  # The logit at input index j + 1 (token x[j], after BOS) predicts x[j]'s label.
  preds = np.concatenate(preds)[:, 1:]
  acc = mqar_accuracy(preds, data.labels, data.label_mask)
  chance, basis = mqar_chance(vocab_size, num_pairs)
  return {"score": 100.0 * acc, "num_samples": num_samples, "chance": chance,
          "chance_basis": basis, "seq_len": seq_len,
          "num_pairs": num_pairs, "vocab_size": vocab_size, "alpha": alpha}


def run_evaporate(model, tokenizer: Tokenizer, task: str, length: int, *, data_dir: str | None,
                  num_samples: int, batch_size: int) -> dict:
  """EVAPORATE-style: windowed document + key/question, greedy to "\\n", "contains"."""
  examples = evaporate.load_examples(data_dir, task, num_samples)
  prompts = [[tokenizer.bos_id, *evaporate.windowed_prompt(ex, tokenizer, length)]
             for ex in examples]
  preds = generate_texts(model, tokenizer, prompts, max_new_tokens=evaporate.MAX_NEW_TOKENS,
                         stop_strings=[evaporate.STOP], batch_size=batch_size)
  hits = [contains_any(p, ex.answers) for p, ex in zip(preds, examples)]
  return {"score": 100.0 * float(np.mean(hits)), "num_samples": len(examples),
          "chance": None, "chance_basis": "none computed: the answers are document text",
          "examples": [{"answers": list(ex.answers), "prediction": p}
                       for ex, p in list(zip(examples, preds))[:3]]}
