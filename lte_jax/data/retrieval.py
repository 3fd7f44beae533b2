"""Synthetic retrieval data (EVALS.md): MQAR token sequences, NIAH needle documents.

Both are pure functions of a ``np.random.Generator``, so a seed fixes them. The
training mixture packs them as documents; the evaluations reuse them as is.

MQAR (zoology's multi-query associative recall), in MQAR ids: keys in
[1, V/2), values in [V/2, V), 0 is filler. Context ``k1 v1 ... kN vN``, then a
query region of L - 2N tokens with (L - 2N)/2 even slots; N distinct slots g
drawn with p(g) proportional to (g + 1)^(alpha - 1); key i is written at
2N + 2 g_i and the label there (the next-token target) is its value. Ids are
shifted by ``offset`` into the model vocab; filler goes to ``filler_id``
(default ``offset``, never a key or value).

NIAH (RULER's single needle tasks): a noise or essay haystack, an
"adjective-noun" key, a 7-digit number or uuid4 value, the needle sentence, and
the question; the essay haystack is Python's own documentation prose. As in
RULER, a haystack grows by units (noise: lines; essay: words, the needle then
placed at a sentence boundary at one of 40 depths) and holds the most units
whose tokenized prompt + the reserved tokens fit the budget. A haystack with
fewer than MIN_DEPTH_PLACES of those places (short contexts: at 512 byte
tokens the prompt and the 128 reserved tokens leave room for a few words)
grows by words instead, and the needle goes to the sentence boundary, or with
too few of those the word boundary, nearest the drawn depth: needles spread
over the haystack at every length, and ``depth`` is where the needle is.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import re
import uuid
from typing import Callable

import numpy as np

from lte_jax.data.sources import prose_sentences
from lte_jax.data.tokenizers import Tokenizer


# ----------------------------------------------------------------------------- MQAR


@dataclasses.dataclass(frozen=True)
class MQARBatch:
  """inputs, labels [B, L] int32 (model ids); label_mask [B, L] bool (True at queries).

  Where label_mask is False, labels hold the filler id and must be ignored.
  """
  inputs: np.ndarray
  labels: np.ndarray
  label_mask: np.ndarray


def check_mqar_args(vocab_size: int, seq_len: int, num_pairs: int, alpha: float,
                    offset: int = 0, prefix: str = "") -> None:
  """Raise ValueError naming the bad MQAR argument (``prefix`` + name)."""
  def bad(name, allowed, value):
    raise ValueError(f"{prefix}{name} must be {allowed}, got {value!r}")
  for name, value in (("vocab_size", vocab_size), ("seq_len", seq_len), ("num_pairs", num_pairs)):
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
      bad(name, "a positive integer", value)
  if not isinstance(offset, (int, np.integer)) or isinstance(offset, bool) or offset < 0:
    bad("offset", "an integer >= 0", offset)
  if seq_len % 2:
    bad("seq_len", "even", seq_len)
  if 4 * num_pairs > seq_len:
    bad("num_pairs", f"<= seq_len / 4 = {seq_len // 4} (4N <= L)", num_pairs)
  if num_pairs > vocab_size // 2 - 1:
    bad("num_pairs", f"<= vocab_size // 2 - 1 = {vocab_size // 2 - 1} (distinct keys)", num_pairs)
  if not (isinstance(alpha, (int, float)) and alpha > 0):
    bad("alpha", "a number > 0", alpha)


def mqar_batch(rng: np.random.Generator, batch_size: int, *, vocab_size: int, seq_len: int,
               num_pairs: int, alpha: float = 0.01, offset: int = 0,
               filler_id: int | None = None) -> MQARBatch:
  """``batch_size`` MQAR sequences of ``seq_len`` tokens, ids in [offset, offset + V)."""
  check_mqar_args(vocab_size, seq_len, num_pairs, alpha, offset)
  n, half = num_pairs, vocab_size // 2
  slots = (seq_len - 2 * n) // 2
  p = np.arange(1, slots + 1, dtype=np.float64) ** (alpha - 1.0)
  p /= p.sum()
  tokens = np.zeros((batch_size, seq_len), np.int64)
  labels = np.zeros((batch_size, seq_len), np.int64)
  mask = np.zeros((batch_size, seq_len), bool)
  for b in range(batch_size):
    keys = rng.choice(np.arange(1, half), size=n, replace=False)
    values = rng.choice(np.arange(half, vocab_size), size=n, replace=False)
    gaps = rng.choice(slots, size=n, replace=False, p=p)
    tokens[b, 0:2 * n:2], tokens[b, 1:2 * n:2] = keys, values
    where = 2 * n + 2 * gaps
    tokens[b, where] = keys
    labels[b, where] = values
    mask[b, where] = True
  filler = offset if filler_id is None else int(filler_id)
  to_model = lambda x: np.where(x == 0, filler, x + offset).astype(np.int32)
  return MQARBatch(to_model(tokens), to_model(labels), mask)


# ----------------------------------------------------------------------------- NIAH

NIAH_TASKS = {  # task -> (haystack, value kind), RULER scripts/synthetic.yaml
    "niah_single_1": ("noise", "number"),
    "niah_single_2": ("essay", "number"),
    "niah_single_3": ("essay", "uuid"),
}
NOISE_LINE = ("The grass is green. The sky is blue. The sun is yellow. Here we go. "
              "There and back again.")
_NOISE_WORDS = tuple(NOISE_LINE.split(" "))
ESSAY_DEPTHS = np.round(np.linspace(0, 100, num=40)).astype(int)
# Needle places (RULER's noise lines, essay sentence boundaries) a haystack needs for RULER's
# placement; fewer, and it is placed finer. One per default heatmap depth bin.
MIN_DEPTH_PLACES = 10
NUMBER_RANGE = (1_000_000, 10_000_000)  # 'number' values: uniform over [low, high)
UUID_RANDOM_BITS = 122  # 'uuid' values: a version-4 UUID's random bits

_ADJECTIVES = (
    "amber", "ancient", "bitter", "bold", "brave", "breezy", "bright", "calm", "clever", "cozy",
    "crimson", "curious", "dusty", "eager", "elegant", "faint", "fancy", "fierce", "fragile",
    "gentle", "gloomy", "golden", "grumpy", "hollow", "humble", "icy", "jolly", "lively", "lonely",
    "lucky", "mellow", "misty", "modest", "noisy", "odd", "pale", "plain", "polite", "proud",
    "quiet", "rapid", "rusty", "shy", "silent", "silver", "sleepy", "smooth", "solemn", "spicy",
    "steady", "stormy", "sturdy", "swift", "tender", "tidy", "vivid", "wary", "wild", "witty",
    "zealous")
_NOUNS = (
    "anchor", "apron", "badger", "banjo", "barrel", "beacon", "bison", "blanket", "bottle",
    "bucket", "cabin", "candle", "canyon", "carpet", "castle", "cellar", "chisel", "compass",
    "cottage", "crayon", "cricket", "dagger", "dolphin", "drum", "falcon", "feather", "fiddle",
    "garden", "glacier", "goblet", "hammer", "harbor", "helmet", "kettle", "ladder", "lantern",
    "lizard", "magnet", "meadow", "mirror", "needle", "orchard", "otter", "paddle", "parrot",
    "pebble", "pillow", "quarry", "raven", "saddle", "scarf", "shovel", "spoon", "teapot",
    "thimble", "tractor", "trumpet", "tunnel", "walnut", "wagon")


@dataclasses.dataclass(frozen=True)
class NIAHExample:
  """One RULER-style single-needle sample.

  ``prompt`` ends with "... mentioned in the provided text is"; the expected
  continuation is " " + ``answer``. ``document`` is both, the training text.
  ``depth`` is the needle's depth in percent: with RULER's placement the drawn
  depth (essay) or the needle's line index / noise lines (noise); with the finer
  placement of short haystacks, the haystack words before the needle / all of them.
  """
  prompt: str
  answer: str
  key: str
  task: str
  depth: float

  @property
  def document(self) -> str:
    return f"{self.prompt} {self.answer}"


def _value(rng: np.random.Generator, kind: str) -> str:
  if kind == "number":
    return str(int(rng.integers(*NUMBER_RANGE)))
  return str(uuid.UUID(bytes=rng.bytes(16), version=4))


def niah_prompt(context: str, key: str, kind: str) -> str:
  return (f"A special magic {kind} is hidden within the following text. Make sure to memorize "
          f"it. I will quiz you about the {kind} afterwards.\n{context}\nWhat is the special "
          f"magic {kind} for {key} mentioned in the provided text? The special magic {kind} for "
          f"{key} mentioned in the provided text is")


def needle_sentence(key: str, value: str, kind: str) -> str:
  # RULER writes the plural in the needle ("numbers", "uuids"), singular in the question.
  return f"One of the special magic {kind}s for {key} is: {value}."


def make_niah(rng: np.random.Generator, tokenizer: Tokenizer, max_tokens: int, *,
              task: str = "niah_single_1", reserve_tokens: int = 128,
              include_answer: bool = False, fill: str = "max") -> NIAHExample:
  """A needle sample whose tokenized text + ``reserve_tokens`` fits ``max_tokens``.

  The text measured is the prompt, or the prompt + answer when
  ``include_answer``. ``fill='max'`` takes the largest haystack (in noise
  lines or essay words) that fits (RULER); ``fill='random'`` a uniform number
  of haystack units up to it (for training on mixed lengths). ValueError when
  even an empty haystack does not fit.
  """
  if task not in NIAH_TASKS:
    raise ValueError(f"task must be one of {tuple(NIAH_TASKS)}, got {task!r}")
  if fill not in ("max", "random"):
    raise ValueError(f"fill must be one of ('max', 'random'), got {fill!r}")
  haystack, kind = NIAH_TASKS[task]
  key = f"{_ADJECTIVES[rng.integers(len(_ADJECTIVES))]}-{_NOUNS[rng.integers(len(_NOUNS))]}"
  value = _value(rng, kind)
  needle = needle_sentence(key, value, kind)
  if haystack == "noise":
    where = float(rng.random())  # needle line index = floor(where * lines), in [0, lines)
    depth_pct = None
  else:
    depth_pct = float(ESSAY_DEPTHS[rng.integers(len(ESSAY_DEPTHS))])
    where = depth_pct / 100
    first_word = int(_essay_sentence_starts()[rng.integers(len(prose_sentences()))])

  def build(n: int, fine: bool) -> tuple[str, float]:
    if haystack == "noise" and not fine:
      # As RULER: n copies of the noise line, the needle a line of its own before copy
      # number floor(where * n) (never after the last one).
      lines = [NOISE_LINE] * n
      at = int(where * n)
      lines.insert(at, needle)
      return "\n".join(lines), 100.0 * at / max(n, 1)
    if haystack == "noise":  # the noise lines' first n words, the needle on a line of its own
      return _place_finely([_NOISE_WORDS[i % len(_NOISE_WORDS)] for i in range(n)],
                           len(_NOISE_WORDS), needle, where, "\n")
    # As RULER: the haystack is the first n WORDS of the essay text (here from a random
    # sentence on, cycling), split into sentences; the needle goes in before sentence
    # int(sentences * depth / 100).
    words = _essay_words()
    words = [words[(first_word + i) % len(words)] for i in range(n)]
    if fine:
      return _place_finely(words, None, needle, where, " ")
    sents = _SENTENCE_END.split(" ".join(words)) if words else []
    at = int(len(sents) * depth_pct / 100)
    return " ".join(sents[:at] + [needle] + sents[at:]), depth_pct

  def fitting(fine: bool) -> tuple[int, Callable[[int], NIAHExample], Callable[[int], int]]:
    def example(n: int) -> NIAHExample:
      context, depth = build(n, fine)
      return NIAHExample(niah_prompt(context, key, kind), value, key, task, depth)

    def count(n: int) -> int:
      ex = example(n)
      return len(tokenizer.encode(ex.document if include_answer else ex.prompt)) + reserve_tokens

    # Every haystack unit holds at least one token, so max_tokens units never fit.
    return _largest_fitting(count, max_tokens, limit=max(max_tokens, 1)), example, count

  n_max, example, count = fitting(fine=False)
  if n_max < 0:
    raise ValueError(f"max_tokens={max_tokens} is too small for a {task} prompt "
                     f"(with reserve_tokens={reserve_tokens})")
  if _ruler_places(haystack, n_max, build) < MIN_DEPTH_PLACES:
    n_max, example, count = fitting(fine=True)
  if fill == "random":
    n = int(rng.integers(n_max + 1))
    # BPE merges make the count only nearly monotone: never return a misfit.
    if n < n_max and count(n) <= max_tokens:
      return example(n)
  return example(n_max)


def _ruler_places(haystack: str, n: int, build: Callable) -> int:
  """Needle places RULER's placement has in a haystack of n units: noise lines, or the
  sentence boundaries of an essay of n words."""
  if haystack == "noise":
    return n
  context = build(n, False)[0]
  return len(_SENTENCE_END.split(context)) if n else 1


def _place_finely(words: list[str], line_words: int | None, needle: str, where: float,
                  glue: str) -> tuple[str, float]:
  """(haystack text with ``needle`` in it, its depth %) for a short haystack of ``words``:
  the needle at the sentence boundary nearest ``where`` (0-1) of the words, or, with fewer
  than MIN_DEPTH_PLACES boundaries, at the nearest word boundary.

  ``line_words``: None (words joined by spaces) or the words a line holds (noise: a line
  break after each copy of the noise line); ``glue`` joins the needle.
  """
  n = len(words)
  seps = [("\n" if line_words and i % line_words == 0 else " ") for i in range(n)]
  ends = [i for i in range(1, n) if words[i - 1][-1] in ".!?" and words[i][:1].isupper()]
  places = [0, *ends, n] if n else [0]
  if len(places) < MIN_DEPTH_PLACES:
    places = list(range(n + 1))
  at = min(places, key=lambda p: abs(p - where * n))
  join = lambda lo, hi: "".join((seps[i] if i > lo else "") + words[i] for i in range(lo, hi))
  parts = [join(0, at), needle, join(at, n)]
  return glue.join(p for p in parts if p), (100.0 * at / n if n else 0.0)


_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")  # as sources.prose_sentences splits


@functools.lru_cache(maxsize=1)
def _essay_words() -> tuple[str, ...]:
  """The essay haystack as words: the prose sentences joined by single spaces."""
  return tuple(" ".join(prose_sentences()).split(" "))


@functools.lru_cache(maxsize=1)
def _essay_sentence_starts() -> np.ndarray:
  """Index in ``_essay_words()`` of each prose sentence's first word."""
  counts = [len(sent.split(" ")) for sent in prose_sentences()]
  return np.concatenate([[0], np.cumsum(counts)[:-1]])


def _largest_fitting(count: Callable[[int], int], budget: int, limit: int) -> int:
  """Largest n in [0, limit] with count(n) <= budget, count increasing in n; -1 if none.

  Newton-like steps on the (nearly linear) token count take a handful of
  tokenizer calls where bisection would take 2 log2(limit); the bracket
  [lo, hi) keeps it exact, with bisection if the steps stall.
  """
  base = count(0)
  if base > budget:
    return -1
  lo, hi, n = 0, limit + 1, min(1, limit)
  for it in range(64):
    if hi - lo <= 1 or n <= lo:
      break
    c = count(n)
    if c <= budget:
      lo = n
    else:
      hi = n
    per_unit = max((c - base) / n, 1e-3)
    step = (budget - c) / per_unit
    guess = n + (int(step) if c <= budget else math.floor(step))
    if it >= 8:  # far more steps than a near-linear count needs: bisect
      guess = (lo + hi) // 2
    n = min(max(guess, lo + 1), hi - 1)
  return lo
