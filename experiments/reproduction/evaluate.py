"""Evaluate one trained model of the study: retrieval, perplexity by position, memory, LTE.

NIAH is scored two ways on the same samples: **teacher-forced** (one forward over BOS +
prompt + " " + answer; a hit when the argmax at every answer token is that token, with the
answer's log-likelihood beside it) at every length and sample, and **greedy generation**
through the decode caches (RULER's substring match) on the first ``greedy_samples`` of each
task at the training length. Where both run they must agree on nearly every sample: a gap
would mean the decode path and the forward disagree. ``decode_check`` measures that directly:
the logits of prefill + one-token decode steps against the full forward on one sample.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lte_jax import data as data_lib
from lte_jax.data.retrieval import NIAH_TASKS, make_niah, needle_sentence
from lte_jax.data.tokenizers import Tokenizer
from lte_jax.evals import perplexity, tasks
from lte_jax.evals.memory import cache_bytes_per_sequence
from lte_jax.generate import generate, pad_prompts
from lte_jax.training import evaluation

EVAL_SEED = 1234  # training documents use the data seed (0); evaluation another


def wilson(hits: int, n: int, z: float = 1.96) -> tuple[float, float]:
  """95% Wilson score interval of a proportion, in percent."""
  if n == 0:
    return (0.0, 100.0)
  p = hits / n
  denom = 1 + z * z / n
  centre = (p + z * z / (2 * n)) / denom
  half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
  return (100 * max(0.0, centre - half), 100 * min(1.0, centre + half))


@dataclasses.dataclass(frozen=True)
class NIAHSample:
  ids: list[int]           # BOS + prompt + " " + answer
  prompt_len: int          # BOS + prompt + " ": the answer starts here
  example: object          # retrieval.NIAHExample


def niah_samples(tokenizer: Tokenizer, task: str, length: int, n: int) -> list[NIAHSample]:
  """``n`` needle samples filled to ``length`` as RULER (128 tokens reserved for the answer),
  from the evaluation seed (tasks.run_niah draws the same prompts)."""
  rng = np.random.default_rng([EVAL_SEED, length, tasks.TASKS.index(task)])
  out = []
  for _ in range(n):
    ex = make_niah(rng, tokenizer, length - 1, task=task,
                   reserve_tokens=tasks.NIAH_MAX_NEW_TOKENS)
    prompt = [tokenizer.bos_id, *tokenizer.encode(ex.prompt + " ")]
    out.append(NIAHSample(prompt + tokenizer.encode(ex.answer), len(prompt), ex))
  return out


@functools.cache  # one jitted function: every task and batch of a length reuses its program
def _forward_fn():
  @nnx.jit
  def run(model, x):
    logits, _ = model(x)
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    # log p(next token) at each position, gathered here: the host needs [B, T], not [B, T, V].
    nxt = jnp.concatenate([x[:, 1:], x[:, :1]], axis=1)  # the last column is never read
    return jnp.argmax(logits, axis=-1), jnp.take_along_axis(logp, nxt[..., None], axis=-1)[..., 0]
  return run


def teacher_forced(model, samples: Sequence[NIAHSample], width: int, batch: int) -> dict:
  """Hit (every answer token the argmax) and answer log-likelihood of each sample."""
  run = _forward_fn()
  hits, loglik, token_acc = [], [], []
  for start in range(0, len(samples), batch):
    chunk = list(samples[start:start + batch])
    real = len(chunk)
    chunk += [chunk[0]] * (batch - real)
    x = np.zeros((batch, width), np.int32)
    for i, s in enumerate(chunk):
      x[i, :len(s.ids)] = s.ids
    pred, logp = run(model, jnp.asarray(x))
    pred, logp = np.asarray(pred), np.asarray(logp)
    for i, s in enumerate(chunk[:real]):
      pos = np.arange(s.prompt_len - 1, len(s.ids) - 1)   # logits predicting the answer
      target = np.asarray(s.ids[s.prompt_len:])
      ok = pred[i, pos] == target
      hits.append(bool(ok.all()))
      token_acc.append(float(ok.mean()))
      loglik.append(float(logp[i, pos].sum()))
  return {"hits": hits, "loglik": loglik, "token_acc": token_acc}


def greedy(model, tokenizer: Tokenizer, samples: Sequence[NIAHSample], batch: int,
           max_new_tokens: int) -> list[bool]:
  """RULER's substring match of greedy continuations through the decode caches; one
  compiled program (one width and prefill length for every batch)."""
  prompts = [s.ids[:s.prompt_len - 1] for s in samples]  # without the trailing " "
  width = max(map(len, prompts))
  prefill = min(map(len, prompts)) // 64 * 64 or min(map(len, prompts))
  hits = []
  for start in range(0, len(prompts), batch):
    chunk = prompts[start:start + batch]
    real = len(chunk)
    chunk += [chunk[0]] * (batch - real)
    tokens, lengths = pad_prompts(chunk, width=width, pad_id=tokenizer.pad_id)
    out = generate(model, tokens, lengths, max_new_tokens=max_new_tokens,
                   eos_ids=[tokenizer.eos_id], prefill_len=prefill)
    for row, s in zip(out.rows()[:real], samples[start:start + real]):
      hits.append(s.example.answer in tokenizer.decode(row))
  return hits


def decode_check(model, ids: Sequence[int], prefill: int) -> dict:
  """Full-forward logits vs prefill(ids[:prefill]) + one decode step a token, same model."""
  x = jnp.asarray([list(ids)], jnp.int32)
  t = x.shape[1]
  graphdef, state = nnx.split(model)

  @jax.jit
  def both(state, x):
    model = nnx.merge(graphdef, state)
    full, _ = model(x)
    cache = model.init_cache(1, t)
    first, cache = model.prefill(x[:, :prefill], cache)

    # The parameters ride in the carry: NNX rejects a layer writing to a module merged
    # from arrays of the outer trace (as lte_jax.generate does).
    def step(carry, tok):
      params, cache = carry
      logits, cache = nnx.merge(graphdef, params).decode(tok[:, None], cache)
      return (params, cache), logits[:, -1]
    _, steps = jax.lax.scan(step, (state, cache), x[:, prefill:].T)
    dec = jnp.concatenate([first, jnp.swapaxes(steps, 0, 1)], axis=1)
    return full.astype(jnp.float32), dec.astype(jnp.float32)

  full, dec = (np.asarray(a)[0] for a in both(state, x))
  scale = float(np.abs(full).max())
  return {"tokens": t, "prefill": prefill,
          "max_abs_diff": float(np.abs(full - dec).max()),
          "rel_max": float(np.abs(full - dec).max() / max(scale, 1e-30)),
          "argmax_agree": float((full.argmax(-1) == dec.argmax(-1)).mean())}


def needle_span(tokenizer: Tokenizer, sample: NIAHSample) -> tuple[int, int]:
  """[start, end) token positions (BOS = 0) of the needle sentence in a byte-exact prompt."""
  ex = sample.example
  kind = NIAH_TASKS[ex.task][1]
  needle = needle_sentence(ex.key, ex.answer, kind)
  text = ex.prompt
  at = text.find(needle)
  start = 1 + len(tokenizer.encode(text[:at]))
  return start, start + len(tokenizer.encode(needle))


def lte_keep_map(model, tokenizer: Tokenizer, sample: NIAHSample) -> dict:
  """Which prompt positions every LTE layer and KV head holds in its retained slots after
  prefilling the prompt (the constant-size cache the answer is read from), and the needle.

  Returns {'layers': [layer index], 'retained': [layer][head] -> sorted positions,
  'needle': [start, end), 'prompt_len', 'window', 'sinks', 'needle_kept': [layer][head]
  fraction of needle tokens retained or still in the window}.
  """
  prompt = sample.ids[:sample.prompt_len - 1]
  t = len(prompt)
  graphdef, state = nnx.split(model)

  @jax.jit
  def prefill(state, x):
    m = nnx.merge(graphdef, state)
    return m.prefill(x, m.init_cache(1, t + 1))[1]
  cache = prefill(state, jnp.asarray([prompt], jnp.int32))
  cfg = model.config.lte
  start, end = needle_span(tokenizer, sample)
  layers, retained, needle_kept = [], [], []
  for i, (mixer, c) in enumerate(zip(model.config.layers, cache)):
    if mixer != "lte":
      continue
    pos = np.asarray(c["ret_pos"])[0]                 # [budget slots, Hkv]
    heads = [sorted(int(p) for p in pos[:, h] if p >= 0) for h in range(pos.shape[1])]
    window_lo = t - 1 - cfg.window_size
    kept = [float(np.mean([p in held or p >= window_lo for p in range(start, end)]))
            for held in map(set, heads)]
    layers.append(i)
    retained.append(heads)
    needle_kept.append(kept)
  return {"layers": layers, "retained": retained, "needle": [start, end], "prompt_len": t,
          "window": cfg.window_size, "sinks": cfg.sink_size, "budget": cfg.budget,
          "needle_kept": needle_kept, "task": sample.example.task}


def perplexity_by_position(model, data_cfg: data_lib.DataConfig, eval_cfg, lengths,
                           rows: int, batch: int, bin_size: int) -> dict:
  """Held-out corpus loss by position at each length (lte_jax.evals.perplexity)."""
  cfg = dataclasses.replace(data_cfg, mixture={"corpus": 1.0}, shuffle=False, num_epochs=1,
                            worker_count=0)
  cfg, split = evaluation.validation_data(eval_cfg, cfg)
  docs = data_lib.make_document_dataset(cfg, split=split)
  found, stats = perplexity.document_rows((docs[i] for i in range(len(docs))), lengths, rows)
  out = {"documents": stats, "results": {}}
  for n in lengths:
    nll = perplexity.token_losses(model, found[n]["inputs"], found[n]["targets"], batch)
    out["results"][str(n)] = perplexity.summarize(nll, bin_size)
  return out


def _batch(preset, length: int) -> int:
  """Rows a forward at ``length`` takes: eval_batch at the training length, fewer beyond, so
  the activations stay the size of the training length's."""
  return max(1, preset.eval_batch * preset.seq_len // length)


def _greedy_entries(model, tokenizer: Tokenizer, at_train_length: dict, niah: dict, preset,
                    log) -> float | None:
  """Greedy generation of every task's samples at the training length in one batch list
  (one compiled program for all tasks), into niah[task@length]['greedy'];
  -> % of samples where greedy and teacher forcing agree (None without samples)."""
  if not at_train_length:
    return None
  flat = [s for sub, _ in at_train_length.values() for s in sub]
  hits = greedy(model, tokenizer, flat, preset.eval_batch, max_new_tokens=48)
  agree = []
  for task, (sub, forced) in at_train_length.items():
    mine, hits = hits[:len(sub)], hits[len(sub):]
    entry = niah[f"{task}@{preset.seq_len}"]
    entry["greedy"], entry["greedy_samples"] = 100 * float(np.mean(mine)), len(sub)
    agree += [a == b for a, b in zip(mine, forced)]
    log(f"  {task} @ {preset.seq_len}: greedy {entry['greedy']:.1f}% of {len(sub)}")
  return 100 * float(np.mean(agree))


def evaluate_model(model, tokenizer: Tokenizer, data_cfg, eval_cfg, preset,
                   log=print) -> dict:
  """Every measurement of one model (see the module docstring) as a JSON-able dict."""
  results = {"niah": {}, "mqar": {}, "memory": {}}
  at_train_length = {}   # task -> (samples generated greedily, their teacher-forced hits)
  for task in NIAH_TASKS:
    for length in preset.eval_lengths:
      samples = niah_samples(tokenizer, task, length, preset.eval_samples)
      tf = teacher_forced(model, samples, length, _batch(preset, length))
      k = sum(tf["hits"])
      entry = {"teacher_forced": 100 * k / len(samples), "ci95": wilson(k, len(samples)),
               "num_samples": len(samples), "answer_loglik": float(np.mean(tf["loglik"])),
               "token_acc": 100 * float(np.mean(tf["token_acc"])),
               "depth_hits": [[s.example.depth, h] for s, h in zip(samples, tf["hits"])]}
      if length == preset.seq_len and preset.greedy_samples:
        at_train_length[task] = (samples[:preset.greedy_samples], tf["hits"])
      results["niah"][f"{task}@{length}"] = entry
      log(f"  {task} @ {length}: teacher-forced {entry['teacher_forced']:.1f}%")
  results["greedy_vs_teacher_forced_agreement"] = _greedy_entries(
      model, tokenizer, at_train_length, results["niah"], preset, log)
  for length, pairs in preset.mqar_lengths_pairs:
    r = tasks.run_mqar(model, length=length + 1, vocab_size=data_cfg.mqar_vocab_size,
                       offset=data_cfg.mqar_vocab_offset, bos_id=tokenizer.bos_id,
                       num_samples=preset.mqar_samples, seed=EVAL_SEED,
                       batch_size=preset.eval_batch, num_pairs=pairs)
    results["mqar"][f"{pairs}@{length}"] = {
        "accuracy": r["score"], "num_pairs": pairs, "seq_len": r["seq_len"],
        "queries": pairs * preset.mqar_samples,
        "ci95": wilson(round(r["score"] * pairs * preset.mqar_samples / 100),
                       pairs * preset.mqar_samples)}
    log(f"  MQAR {pairs} pairs @ {length}: {r['score']:.1f}%")
  for length in preset.eval_lengths:
    results["memory"][str(length)] = cache_bytes_per_sequence(model, length)
  results["perplexity"] = perplexity_by_position(
      model, data_cfg, eval_cfg, list(preset.eval_lengths), preset.ppl_rows,
      _batch(preset, max(preset.eval_lengths)), bin_size=max(1, preset.seq_len // 16))
  sample = niah_samples(tokenizer, "niah_single_2", preset.seq_len, 1)[0]
  results["decode_check"] = decode_check(model, sample.ids, sample.prompt_len // 2)
  if "lte" in model.config.layers:
    results["lte_keep_map"] = lte_keep_map(model, tokenizer, sample)
  return results
