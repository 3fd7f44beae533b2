"""The training input pipeline: config, document mixture, packed batches, checkpoints.

``make_train_iterator(cfg)`` builds, with grain::

  corpus (shuffled per epoch, repeated) --\
  MQAR examples (generated per index)   ---> mix by weight -> this process's slice
  NIAH documents (generated per index)  --/    -> tokenize -> pack into [B, T] batches

Every random choice is a function of ``cfg.seed`` and an element index, so the
same config gives the same batches in every run, and the iterator's state
(``get_state()`` / ``set_state()``, a small JSON-able dict) resumes at the next
unseen batch. Mixture weights count documents, not tokens: an MQAR document is
``mqar_seq_len + 1`` tokens, a corpus document as long as it is.

Bad corpus records (``errors.py``) are skipped and counted or raise
``DataError``, per ``DataConfig.bad_records``; a corpus without text is a
``DataError`` naming its path, before the first batch where the source can tell.
"""
from __future__ import annotations

import dataclasses
import math
import sys
from typing import Any, Mapping, Sequence

import grain
import numpy as np
from absl import logging

from lte_jax.data.boundaries import apply_document_masking, end_token
from lte_jax.data.errors import (BAD_RECORD_POLICIES, BadRecords, CorpusGuard, DataError,
                                 count_in_state)
from lte_jax.data.holdout import Split
from lte_jax.data.packing import PackedBatchIterDataset
from lte_jax.data.retrieval import NIAH_TASKS, check_mqar_args, make_niah, mqar_batch
from lte_jax.data.sources import SOURCE_KINDS, make_source
from lte_jax.data.tokenizers import Tokenizer, encode_document, get_tokenizer

MIXTURE_NAMES = ("corpus", "mqar", "niah")
NIAH_LOSSES = ("all", "answer")
FILE_SOURCES = tuple(kind for kind in SOURCE_KINDS if kind != "embedded")
FIELD_SOURCES = ("jsonl", "parquet")  # the sources whose records DataConfig.text_field indexes
KIND_IDS = {"corpus": 0, "mqar": 1, "niah": 2}  # the 'kind' field of a document
_SALT_SHUFFLE, _SALT_MQAR, _SALT_NIAH = 1, 2, 3
BAD_RECORDS_HELP = (
    "Bad corpus records (bytes that are not UTF-8; a JSONL line that is not valid JSON, is null "
    "or has no string data.text_field; a null Parquet value): data.bad_records='skip' (default) "
    "drops and counts them (metrics.jsonl data/bad_records, the run summary with file:line of "
    "the first few) and stops once more than data.max_bad_fraction (default 0.01) of the records "
    "are bad; 'error' stops at the first with its file and line. data.validate=True (default) "
    "parses every JSONL line before the first step; a corpus with no text is an error.")


def _fail(field: str, allowed: str, value: Any) -> None:
  raise ValueError(f"config field DataConfig.{field} must be {allowed}, got {value!r}")


def _is_int(value: Any) -> bool:
  return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """What to read, how to tokenize, pack and mix it. Validated on construction.

  source: 'embedded' (Python's own documentation, no download), 'text' (each
    file one document), 'jsonl', 'parquet' or 'arrayrecord'; ``path`` is a glob
    (required unless 'embedded'); ``text_field`` names the JSONL field / Parquet
    column.
  tokenizer: 'byte' or a path to a local tokenizer.json / SentencePiece .model.
  seq_len, batch_size: batches are [batch_size // process_count, seq_len] per
    process; batch_size is global.
  mixture: document weights for 'corpus', 'mqar', 'niah' (missing = 0).
  mqar_*: MQAR vocab V, offset into the model vocab (ids used: offset ..
    offset + V - 1, filler = offset), length L (L + 1 <= seq_len with the BOS),
    number of pairs N and query-slot exponent alpha (EVALS.md).
  niah_tasks: RULER tasks drawn uniformly for NIAH documents; each fits one row
    with a haystack of uniformly random size (needs a seq_len that holds the
    empty-haystack prompt: ~400 byte-level tokens).
  niah_loss: what a NIAH document trains on: 'all' (default: every token, the
    prompt and haystack too) or 'answer' (the answer's tokens only, as an MQAR
    document trains on its queries: a few tokens of retrieval signal are not
    drowned by hundreds of easy haystack tokens). With 'answer' the prompt and
    the answer are tokenized apart, as the evaluation reads them.
  num_epochs: passes over the corpus (None: forever); synthetic data never ends.
  worker_count: processes for grain's mp_prefetch (0: in-process).
  read_threads: threads reading and tokenizing documents in each process.
  model_vocab_size: if set, the tokenizer and MQAR ids must fit below it.
  bad_records: what a bad corpus record does (bytes that are not UTF-8; a JSONL
    line that is not valid JSON, is ``null`` or lacks a string ``text_field``;
    a null Parquet value): 'skip' (default) drops it and counts it (in the
    iterator's ``bad_records()``, metrics.jsonl's ``data/bad_records`` and the
    run summary, with file:line of the first few); 'error' stops with
    ``DataError`` naming the file and line.
  max_bad_fraction: under 'skip', stop with ``DataError`` once more than this
    fraction of the corpus records are bad (0 <= f <= 1; default 0.01).
  validate: check a JSONL corpus before the first batch: every line is parsed
    once (tens to hundreds of MB/s), so bad lines are reported, or skipped and
    counted, up front and a corpus without text is an error at once. False: bad
    records are found when read, as for the other sources.
  document_masking: True (default): each document in a row has its own segment
    id and positions from 0, so no mixer reads across it. False: each row is one
    sequence (segment id 1 over its real tokens, positions 0..T-1), as the
    reference trainer (``boundaries.apply_document_masking``).
  append_eos: True (default): a document's last target is EOS. False: BOS only,
    its last target is the next document's BOS (``boundaries``).
  """
  source: str = "embedded"
  path: str | None = None
  text_field: str = "text"
  tokenizer: str = "byte"
  seq_len: int = 256
  batch_size: int = 8
  seed: int = 0
  mixture: Mapping[str, float] = dataclasses.field(default_factory=lambda: {"corpus": 1.0})
  mqar_vocab_size: int = 256
  mqar_vocab_offset: int = 3
  mqar_seq_len: int = 64
  mqar_num_pairs: int = 8
  mqar_alpha: float = 0.01
  niah_tasks: Sequence[str] = tuple(NIAH_TASKS)
  niah_loss: str = "all"
  shuffle: bool = True
  num_epochs: int | None = None
  worker_count: int = 0
  read_threads: int = 2
  model_vocab_size: int | None = None
  bad_records: str = "skip"
  max_bad_fraction: float = 0.01
  validate: bool = True
  document_masking: bool = True
  append_eos: bool = True

  def __post_init__(self):
    if self.source not in SOURCE_KINDS:
      _fail("source", f"one of {SOURCE_KINDS}", self.source)
    if self.source != "embedded" and not (isinstance(self.path, str) and self.path):
      _fail("path", f"a glob of files for source={self.source!r}", self.path)
    if not (isinstance(self.text_field, str) and self.text_field):
      _fail("text_field", "a non-empty string", self.text_field)
    # A path the source would ignore: refused, so a run never reads other data than asked.
    if self.source == "embedded" and self.path is not None:
      _fail("path", "None with source='embedded' (the embedded corpus reads no file; set "
            f"source to one of {FILE_SOURCES} to read the path)", self.path)
    if not (isinstance(self.tokenizer, str) and self.tokenizer):
      _fail("tokenizer", "'byte' or a path to tokenizer.json / a SentencePiece .model",
            self.tokenizer)
    for name in ("seq_len", "batch_size", "mqar_vocab_size", "mqar_seq_len", "mqar_num_pairs"):
      if not _is_int(getattr(self, name)) or getattr(self, name) < 1:
        _fail(name, "a positive integer", getattr(self, name))
    for name in ("seed", "mqar_vocab_offset", "worker_count", "read_threads"):
      if not _is_int(getattr(self, name)) or getattr(self, name) < 0:
        _fail(name, "an integer >= 0", getattr(self, name))
    if self.num_epochs is not None and (not _is_int(self.num_epochs) or self.num_epochs < 1):
      _fail("num_epochs", "None (repeat forever) or a positive integer", self.num_epochs)
    if self.model_vocab_size is not None and (
        not _is_int(self.model_vocab_size) or self.model_vocab_size < 1):
      _fail("model_vocab_size", "None or a positive integer", self.model_vocab_size)
    for name in ("shuffle", "validate", "document_masking", "append_eos"):
      if not isinstance(getattr(self, name), bool):
        _fail(name, "a bool", getattr(self, name))
    if self.bad_records not in BAD_RECORD_POLICIES:
      _fail("bad_records", f"one of {BAD_RECORD_POLICIES}", self.bad_records)
    frac = self.max_bad_fraction
    if isinstance(frac, bool) or not isinstance(frac, (int, float)) or not 0 <= frac <= 1:
      _fail("max_bad_fraction", "a number in [0, 1]", frac)
    self._check_mixture()
    weights = self.weights
    if weights.get("mqar", 0) > 0:
      check_mqar_args(self.mqar_vocab_size, self.mqar_seq_len, self.mqar_num_pairs,
                      self.mqar_alpha, self.mqar_vocab_offset, prefix="config field DataConfig.mqar_")
      if self.mqar_seq_len + 1 > self.seq_len:
        _fail("mqar_seq_len", f"<= seq_len - 1 = {self.seq_len - 1} (an MQAR example plus "
              "its BOS fills at most one row)", self.mqar_seq_len)
    if weights.get("niah", 0) > 0:
      tasks = self.niah_tasks
      if isinstance(tasks, str) or not tasks or any(t not in NIAH_TASKS for t in tasks):
        _fail("niah_tasks", f"a non-empty sequence of {tuple(NIAH_TASKS)}", tasks)
    if self.niah_loss not in NIAH_LOSSES:
      _fail("niah_loss", f"one of {NIAH_LOSSES}", self.niah_loss)

  def _check_mixture(self) -> None:
    mix = self.mixture
    if not isinstance(mix, Mapping) or not mix:
      _fail("mixture", f"a mapping from {MIXTURE_NAMES} to weights >= 0", mix)
    for name, w in mix.items():
      if name not in MIXTURE_NAMES:
        _fail("mixture", f"keyed by names in {MIXTURE_NAMES}", name)
      if isinstance(w, bool) or not isinstance(w, (int, float)) or not w >= 0:
        _fail("mixture", f"weights >= 0 (mixture[{name!r}])", w)
    if sum(mix.values()) <= 0:
      _fail("mixture", "weights with a positive sum", dict(mix))

  @property
  def weights(self) -> dict[str, float]:
    """The positive mixture weights, in MIXTURE_NAMES order."""
    return {n: float(self.mixture[n]) for n in MIXTURE_NAMES if self.mixture.get(n, 0) > 0}


def _subseed(seed: int, salt: int) -> int:
  """A 32-bit seed (grain's shuffle takes at most 2**32 - 1) from (seed, salt)."""
  return int(np.random.SeedSequence([seed, salt]).generate_state(1)[0])


def _split_seed(split: Split | None, seed: int, salt: int) -> int:
  """A synthetic generator's seed: ``_subseed(seed, salt)``, moved for a validation split."""
  seed = _subseed(seed, salt)
  return seed if split is None else split.synthetic_seed(seed)


def _doc(ids: Sequence[int] | np.ndarray, kind: str, atomic: bool) -> dict:
  """A text document [BOS, ..., EOS] as its len - 1 (input, next token) pairs.

  inputs / targets are views of ``ids`` and the mask a read-only broadcast one:
  a long document costs 4 bytes a token."""
  ids = np.asarray(ids, np.int32)
  return {"inputs": ids[:-1], "targets": ids[1:],
          "loss_mask": np.broadcast_to(np.float32(1), (len(ids) - 1,)),
          "atomic": np.bool_(atomic), "kind": np.int32(KIND_IDS[kind])}


class _Skipped:
  """A bad record under bad_records='skip': its 'file:line: reason'."""

  def __init__(self, message: str):
    self.message = message


class _Records(Sequence):
  """The corpus source with its DataErrors raised ('error') or turned into _Skipped."""

  def __init__(self, source: Sequence[str], policy: str):
    self.source, self.policy = source, policy

  def __len__(self) -> int:
    return len(self.source)

  def __getitem__(self, index: int) -> str | _Skipped:
    try:
      return self.source[index]
    except DataError as err:
      if self.policy == "error":
        raise DataError(err.path, err.line,
                        f"{err.reason} (data.bad_records='skip' skips bad records)") from None
      return _Skipped(str(err))


class _TokenizeText:
  """text -> document: [BOS] + ids + [end] as shifted inputs / targets (end: EOS, or
  BOS with append_eos=False); a skipped record -> an empty document carrying ``bad``."""

  def __init__(self, tokenizer: Tokenizer, append_eos: bool = True):
    self.tokenizer = tokenizer
    self.end_id = end_token(tokenizer.bos_id, tokenizer.eos_id, append_eos)

  def __call__(self, text: str | _Skipped) -> dict:
    if isinstance(text, _Skipped):
      doc = _doc(np.zeros(1, np.int32), "corpus", atomic=False)
      doc["bad"] = text.message
      return doc
    ids = encode_document(self.tokenizer, text)
    ids[-1] = self.end_id  # a fresh array: EOS, or BOS for BOS-only documents
    return _doc(ids, "corpus", atomic=False)


class _Synthetic(Sequence):
  """An endless random-access source: element i is ``make(rng(seed, i))``."""

  def __init__(self, seed: int, make):
    self.seed, self.make = seed, make

  def __len__(self) -> int:
    return sys.maxsize

  def __getitem__(self, index: int) -> dict:
    return self.make(np.random.default_rng([self.seed, int(index)]))


class _MQARDoc:
  """One MQAR example as a document of L + 1 (input, target) pairs: BOS, then the
  L tokens. Targets are the next tokens, except at the queries, whose target is
  the paired value; the loss mask keeps the queries only."""

  def __init__(self, cfg: DataConfig, bos_id: int):
    self.cfg, self.bos_id = cfg, bos_id

  def __call__(self, rng: np.random.Generator) -> dict:
    c = self.cfg
    ex = mqar_batch(rng, 1, vocab_size=c.mqar_vocab_size, seq_len=c.mqar_seq_len,
                    num_pairs=c.mqar_num_pairs, alpha=c.mqar_alpha, offset=c.mqar_vocab_offset)
    x, labels, query = ex.inputs[0], ex.labels[0], ex.label_mask[0]
    inputs = np.concatenate([[self.bos_id], x]).astype(np.int32)
    targets = np.concatenate([x, [c.mqar_vocab_offset]]).astype(np.int32)  # last: filler
    targets[1:][query] = labels[query]
    mask = np.concatenate([[False], query]).astype(np.float32)
    return {"inputs": inputs, "targets": targets, "loss_mask": mask, "atomic": np.bool_(True),
            "kind": np.int32(KIND_IDS["mqar"])}


class _NIAHDoc:
  """One needle document (prompt + answer) of random haystack size fitting one row; its
  loss on every token, or on the answer's only (DataConfig.niah_loss)."""

  def __init__(self, cfg: DataConfig, tokenizer: Tokenizer):
    self.cfg, self.tokenizer = cfg, tokenizer

  def __call__(self, rng: np.random.Generator) -> dict:
    tasks = tuple(self.cfg.niah_tasks)
    task = tasks[int(rng.integers(len(tasks)))]
    answer_only = self.cfg.niah_loss == "answer"
    # BOS + text + end = seq_len + 1 tokens at most: seq_len (input, target) pairs; one
    # more reserved when prompt and answer are tokenized apart (a BPE split may cost one).
    ex = make_niah(rng, self.tokenizer, self.cfg.seq_len + 1, task=task,
                   reserve_tokens=3 if answer_only else 2, include_answer=True, fill="random")
    tok = self.tokenizer
    end = end_token(tok.bos_id, tok.eos_id, self.cfg.append_eos)
    if not answer_only:
      return _doc([tok.bos_id, *tok.encode(ex.document), end], "niah", atomic=True)
    prompt = [tok.bos_id, *tok.encode(ex.prompt + " ")]
    answer = tok.encode(ex.answer)
    doc = _doc([*prompt, *answer, end], "niah", atomic=True)
    mask = np.zeros(len(doc["targets"]), np.float32)
    mask[len(prompt) - 1:len(prompt) - 1 + len(answer)] = 1  # targets that are the answer
    doc["loss_mask"] = mask
    return doc


def _check_vocab(cfg: DataConfig, tokenizer: Tokenizer) -> None:
  limit = cfg.model_vocab_size or tokenizer.vocab_size
  if cfg.model_vocab_size is not None and tokenizer.vocab_size > cfg.model_vocab_size:
    raise ValueError(
        f"config field DataConfig.model_vocab_size={cfg.model_vocab_size} (the model's "
        f"vocabulary) is smaller than the {tokenizer.vocab_size} ids of the tokenizer "
        f"{cfg.tokenizer!r}: give the model's own tokenizer with --config.data.tokenizer=PATH "
        "(its tokenizer.json or SentencePiece .model; DataConfig.tokenizer)")
  if "mqar" in cfg.weights and cfg.mqar_vocab_offset + cfg.mqar_vocab_size > limit:
    _fail("mqar_vocab_size", f"<= {limit - cfg.mqar_vocab_offset} (mqar_vocab_offset "
          f"{cfg.mqar_vocab_offset} + mqar_vocab_size must fit the vocab of {limit})",
          cfg.mqar_vocab_size)
  if "niah" in cfg.weights:
    for task in cfg.niah_tasks:
      try:
        make_niah(np.random.default_rng(0), tokenizer, cfg.seq_len + 1, task=task,
                  reserve_tokens=2, include_answer=True, fill="max")
      except ValueError:
        _fail("seq_len", f"large enough to hold a {task} document with an empty haystack "
              "(raise it or drop 'niah' from the mixture)", cfg.seq_len)


def _corpus(cfg: DataConfig, split: Split | None) -> tuple[Sequence[str], BadRecords]:
  """The split's view of the corpus, checked (records exist, some hold text, few enough
  are bad), and the bad records the source found up front."""
  source = make_source(cfg.source, cfg.path, cfg.text_field, validate=cfg.validate,
                       on_bad=cfg.bad_records)
  name = cfg.path or cfg.source
  bad = source.bad_records
  if len(source) == 0 or source.has_text is False:
    found = f"{len(source)} records"
    if bad.count:
      found += f", {bad.count} bad ({bad.describe()})"
    raise DataError(name, None, f"the corpus holds no document with text ({found})")
  if bad.count:
    total = len(source) + bad.count
    if bad.count > cfg.max_bad_fraction * total:
      raise DataError(name, None, f"{bad.count} of {total} records are bad, more than "
                      f"data.max_bad_fraction={cfg.max_bad_fraction} (raise it, or fix the "
                      f"data); first: " + "; ".join(bad.first))
    logging.warning("%s: skipping %d bad record(s); first: %s", name, bad.count,
                    "; ".join(bad.first))
  return (source if split is None else split.corpus(source)), bad


def _documents(cfg: DataConfig, tokenizer: Tokenizer, corpus: Sequence[str] | None,
               split: Split | None, process_index: int, process_count: int) -> grain.MapDataset:
  parts = []
  for name in cfg.weights:
    if name == "corpus":
      ds = grain.MapDataset.source(_Records(corpus, cfg.bad_records))
      if cfg.shuffle:
        ds = ds.shuffle(seed=_subseed(cfg.seed, _SALT_SHUFFLE))
      ds = ds.repeat(cfg.num_epochs).map(_TokenizeText(tokenizer, cfg.append_eos))
    elif name == "mqar":
      ds = grain.MapDataset.source(_Synthetic(_split_seed(split, cfg.seed, _SALT_MQAR),
                                              _MQARDoc(cfg, tokenizer.bos_id)))
    else:
      ds = grain.MapDataset.source(_Synthetic(_split_seed(split, cfg.seed, _SALT_NIAH),
                                              _NIAHDoc(cfg, tokenizer)))
    parts.append(ds)
  weights = list(cfg.weights.values())
  ds = parts[0] if len(parts) == 1 else grain.MapDataset.mix(parts, weights)
  return ds[process_index::process_count]


def _check_process(process_index: int | None, process_count: int) -> None:
  if not _is_int(process_count) or process_count < 1:
    raise ValueError(f"process_count must be a positive integer, got {process_count!r}")
  if process_index is not None and (
      not _is_int(process_index) or not 0 <= process_index < process_count):
    raise ValueError(f"process_index must be in [0, {process_count}), got {process_index!r}")


def make_document_dataset(cfg: DataConfig, tokenizer: Tokenizer | None = None, *,
                          process_index: int = 0, process_count: int = 1,
                          split: Split | None = None) -> grain.MapDataset:
  """This process's slice of the mixed, tokenized document stream (a grain MapDataset).

  Elements: dict(inputs [n] int32, targets [n] int32, loss_mask [n] float32,
  atomic bool, kind int32 (KIND_IDS)); a bad record skipped under
  bad_records='skip' is an empty corpus document with ``bad`` ('file:line:
  reason'). Element i of the global stream goes to process i % process_count.
  ``split`` (lte_jax.data.holdout): the corpus documents and synthetic seeds of
  a train / validation split; None: all of them.
  """
  _check_process(process_index, process_count)
  tokenizer = get_tokenizer(cfg.tokenizer) if tokenizer is None else tokenizer
  _check_vocab(cfg, tokenizer)
  corpus = _corpus(cfg, split)[0] if "corpus" in cfg.weights else None
  return _documents(cfg, tokenizer, corpus, split, process_index, process_count)


class TrainIterator(grain.DatasetIterator):
  """The packed-batch iterator of ``make_train_iterator``, plus its bad-record count.

  ``bad_records()``: the records skipped so far, those the source found before
  the first batch plus those the packers counted (saved in the iterator state,
  so the count goes on across a resume). ``document_masking=False`` turns each
  batch into one sequence a row (``boundaries.apply_document_masking``).
  """

  def __init__(self, parent: grain.DatasetIterator, found: BadRecords = BadRecords(),
               document_masking: bool = True):
    super().__init__(parent)
    self._found, self._document_masking = found, document_masking

  def __next__(self) -> dict[str, np.ndarray]:
    return apply_document_masking(next(self._parent), self._document_masking)

  def get_state(self) -> dict[str, Any]:
    return self._parent.get_state()

  def set_state(self, state: dict[str, Any]) -> None:
    self._parent.set_state(state)

  def bad_records(self) -> BadRecords:
    return self._found + count_in_state(self._parent.get_state())

  def __str__(self) -> str:
    return f"TrainIterator({self._parent})"


def make_train_iterator(cfg: DataConfig, *, process_index: int = 0, process_count: int = 1,
                        split: Split | None = None) -> TrainIterator:
  """A checkpointable iterator of this process's packed batches.

  Each batch is a dict of [batch_size // process_count, seq_len] arrays:
  inputs, targets (next token), segment_ids (1, 2, ... per document chunk, 0 on
  padding; with ``document_masking=False`` 1 on every real token), positions
  (inside the chunk; 0..T-1 without document masking) as int32, and loss_mask
  float32 (0 on padding and on MQAR non-query tokens). ``get_state()`` / ``set_state()``
  round-trip to the next unseen batch; see ``iterator_checkpoint_args`` for orbax.
  With ``num_epochs`` set, the last batch is padded and then StopIteration.
  ``split``: as for ``make_document_dataset``. ``bad_records()`` counts the
  corpus records skipped (``DataConfig.bad_records``); a bad record under
  'error', too many under 'skip' or a corpus without text raise ``DataError``
  (here, or from ``next`` when found while reading).
  """
  _check_process(None, process_count)
  if cfg.batch_size % process_count:
    _fail("batch_size", f"a multiple of process_count={process_count}", cfg.batch_size)
  _check_process(process_index, process_count)
  tokenizer = get_tokenizer(cfg.tokenizer)
  _check_vocab(cfg, tokenizer)
  corpus, found, guard = None, BadRecords(), None
  if "corpus" in cfg.weights:
    corpus, found = _corpus(cfg, split)
    guard = CorpusGuard(name=cfg.path or cfg.source, size=math.ceil(len(corpus) / process_count),
                        max_bad_fraction=float(cfg.max_bad_fraction), kind=KIND_IDS["corpus"])
  docs = _documents(cfg, tokenizer, corpus, split, process_index, process_count)
  stream = docs.to_iter_dataset(grain.ReadOptions(num_threads=cfg.read_threads,
                                                  prefetch_buffer_size=max(4, 8 * cfg.read_threads)))
  ds = PackedBatchIterDataset(stream, seq_len=cfg.seq_len,
                              batch_size=cfg.batch_size // process_count, pad_id=tokenizer.pad_id,
                              guard=guard)
  if cfg.worker_count > 0:
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=cfg.worker_count))
  return TrainIterator(iter(ds), found, cfg.document_masking)


def iterator_checkpoint_args(iterator: grain.DatasetIterator, *, restore: bool = False) -> Any:
  """Orbax args saving (or, with ``restore=True``, restoring into) ``iterator``.

  Use as one item of ``ocp.args.Composite``, e.g.
  ``mngr.save(step, args=ocp.args.Composite(state=..., data=iterator_checkpoint_args(it)))``
  and ``mngr.restore(step, args=ocp.args.Composite(state=...,
  data=iterator_checkpoint_args(it, restore=True)))``; restoring sets the state
  of ``it`` in place. Each process writes its own JSON file.
  """
  try:
    from grain.checkpoint import CheckpointRestore, CheckpointSave  # pylint: disable=g-import-not-at-top
  except ImportError:  # grain < 0.2.12 names them in grain.python
    from grain.python import PyGrainCheckpointRestore as CheckpointRestore  # pylint: disable=g-import-not-at-top
    from grain.python import PyGrainCheckpointSave as CheckpointSave  # pylint: disable=g-import-not-at-top
  return CheckpointRestore(iterator) if restore else CheckpointSave(iterator)
