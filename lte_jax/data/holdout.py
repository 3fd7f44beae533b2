"""Validation documents kept out of training, chosen deterministically from the seed.

A corpus source of N documents splits by document index (sources have a fixed
order: files sorted by path, records in file order). Index i gets a 64-bit hash
of (seed, i); the n indices with the smallest hashes are held out, where
``holdout`` < 1 is a fraction (n = round(holdout x N), at least 1) and
``holdout`` >= 1 a number of documents. Training reads the other N - n
documents, validation the held-out ones in index order. Both sets are functions
of (seed, N, holdout) alone, so they are disjoint by construction and the same
in every run and process; changing the corpus (N) or ``holdout`` changes them.

Synthetic documents (MQAR examples, NIAH needles) come from endless generators:
validation draws them from the same generators under another seed
(``Split.synthetic_seed``), so no validation example is a training draw. NIAH
haystacks are sentences of Python's documentation, the text of the embedded
corpus: with both in the mixture, held-out topics' sentences also appear in
training haystacks (as shuffled filler, never as a document).

``make_validation_iterator`` packs the validation documents into the training
batch shape, in a fixed order (no shuffle, one pass).
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Iterator, Sequence

import numpy as np

SPLITS = ("train", "validation", "separate")
_SALT_HOLDOUT, _SALT_VALIDATION = 11, 12
_CHUNK = 1 << 20  # indices hashed at a time: memory stays O(held out + chunk)


def _is_number(value) -> bool:
  return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


def check_holdout(holdout, name: str = "holdout") -> None:
  """ValueError unless ``holdout`` is 0, a fraction in (0, 1) or a whole number >= 1."""
  ok = _is_number(holdout) and math.isfinite(holdout) and holdout >= 0 and (
      holdout < 1 or float(holdout).is_integer())
  if not ok:
    raise ValueError(f"{name} must be 0 (no held-out documents), a fraction in (0, 1) of the "
                     f"corpus documents, or a whole number >= 1 of documents; got {holdout!r}")


def held_out_count(num_docs: int, holdout: float | int, name: str = "holdout") -> int:
  """How many of ``num_docs`` documents ``holdout`` keeps out of training."""
  check_holdout(holdout, name)
  if holdout == 0:
    return 0
  count = int(holdout) if holdout >= 1 else max(1, round(holdout * num_docs))
  if count >= num_docs:
    raise ValueError(f"{name}={holdout!r} holds out {count} of the corpus's {num_docs} "
                     "documents, leaving none to train on; lower it (experiments.train: "
                     "config.eval.holdout)")
  return count


def _mix64(x: np.ndarray) -> np.ndarray:
  """splitmix64's finalizer on uint64 [n] (wrapping arithmetic): a well-spread hash."""
  x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
  x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
  return x ^ (x >> np.uint64(31))


@functools.lru_cache(maxsize=8)  # training and validation both split the same corpus
def held_out_indices(num_docs: int, holdout: float | int, seed: int) -> np.ndarray:
  """Sorted int64 [n], read-only: the indices in [0, num_docs) with the n smallest hashes
  of (seed, i)."""
  count = held_out_count(num_docs, holdout)
  if count == 0:
    return np.zeros(0, np.int64)
  key = np.uint64(np.random.SeedSequence([seed, _SALT_HOLDOUT]).generate_state(1, np.uint64)[0])
  best_hash, best_index = np.zeros(0, np.uint64), np.zeros(0, np.int64)
  for start in range(0, num_docs, _CHUNK):
    index = np.arange(start, min(start + _CHUNK, num_docs), dtype=np.int64)
    hashes = np.concatenate([best_hash, _mix64(index.astype(np.uint64) ^ key)])
    index = np.concatenate([best_index, index])
    if len(hashes) > count:
      keep = np.argpartition(hashes, count - 1)[:count]
      hashes, index = hashes[keep], index[keep]
    best_hash, best_index = hashes, index
  held = np.sort(best_index)
  held.flags.writeable = False
  return held


class HeldOut(Sequence[str]):
  """The documents of ``source`` at the sorted indices ``held`` [n]."""

  def __init__(self, source: Sequence[str], held: np.ndarray):
    self.source, self.held = source, held

  def __len__(self) -> int:
    return len(self.held)

  def __getitem__(self, index: int) -> str:
    if not 0 <= index < len(self):
      raise IndexError(f"document index {index} out of range [0, {len(self)})")
    return self.source[int(self.held[index])]

  def source_index(self, index: int) -> int:
    return int(self.held[index])

  def __repr__(self) -> str:
    return f"HeldOut({len(self)} documents of {self.source!r})"


class Remaining(Sequence[str]):
  """The documents of ``source`` NOT at the sorted indices ``held`` [n], in order.

  Element i is source[i + j], j = the number of held indices below it: with
  d[m] = held[m] - m (non-held indices below held[m]), j = #{m: d[m] <= i}.
  O(n) memory and a binary search per access, whatever the corpus size.
  """

  def __init__(self, source: Sequence[str], held: np.ndarray):
    self.source, self.held = source, held
    self._below = held - np.arange(len(held), dtype=np.int64)
    self._len = len(source) - len(held)

  def __len__(self) -> int:
    return self._len

  def source_index(self, index: int) -> int:
    if not 0 <= index < self._len:
      raise IndexError(f"document index {index} out of range [0, {self._len})")
    return int(index) + int(np.searchsorted(self._below, index, side="right"))

  def __getitem__(self, index: int) -> str:
    return self.source[self.source_index(index)]

  def __repr__(self) -> str:
    return f"Remaining({len(self)} documents of {self.source!r})"


@dataclasses.dataclass(frozen=True)
class Split:
  """Which documents a dataset reads.

  name: 'train' (corpus documents not held out, synthetic data as always),
    'validation' (the held-out corpus documents, synthetic data under a
    validation seed) or 'separate' (every document of a source meant for
    validation only, synthetic data under the validation seed).
  holdout: 0, a fraction in (0, 1) or a number of documents (module docstring).
  seed: the data seed; the held-out set is a function of it.
  """
  name: str
  holdout: float | int = 0
  seed: int = 0

  def __post_init__(self):
    if self.name not in SPLITS:
      raise ValueError(f"Split.name must be one of {SPLITS}, got {self.name!r}")
    check_holdout(self.holdout, "Split.holdout")
    if self.name == "validation" and self.holdout == 0:
      raise ValueError("a 'validation' split needs held-out documents: holdout > 0")

  def corpus(self, source: Sequence[str]) -> Sequence[str]:
    """This split's view of a corpus ``source``."""
    if self.name == "separate" or (self.name == "train" and self.holdout == 0):
      return source
    held = held_out_indices(len(source), self.holdout, self.seed)
    return Remaining(source, held) if self.name == "train" else HeldOut(source, held)

  def synthetic_seed(self, seed: int) -> int:
    """The seed of a synthetic generator in this split (training keeps ``seed``)."""
    if self.name == "train":
      return seed
    return int(np.random.SeedSequence([seed, _SALT_VALIDATION]).generate_state(1)[0])


def make_validation_iterator(cfg, split: Split, *, process_index: int = 0,
                             process_count: int = 1) -> Iterator[dict]:
  """This process's packed validation batches ([batch_size // process_count, seq_len] each,
  the training batch layout) in a fixed order: one pass, no shuffle, in-process reading."""
  from lte_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  cfg = dataclasses.replace(cfg, shuffle=False, num_epochs=1, worker_count=0)
  return pipeline.make_train_iterator(cfg, process_index=process_index,
                                      process_count=process_count, split=split)
