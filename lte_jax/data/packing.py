"""Greedy packing of tokenized documents into fixed [B, T] batches, checkpointable.

A document arrives as ``inputs``, ``targets`` (both [n] int32; for text,
``[BOS] + ids`` and ``ids + [end]``, the shifted views of BOS..end, end being EOS
or, for BOS-only documents, BOS: ``boundaries.end_token``) and
``loss_mask`` [n] float32, plus ``atomic`` (bool). Every (input, target) pair
stays inside its own document, so no target ever crosses a document boundary
and no pair is lost at one.

Rows are filled in order. A document longer than the room left is split: the
rest continues at the start of the next row (no BOS there, a new segment id,
positions restarting at 0). An ``atomic`` document (a retrieval example, useless
when cut) that does not fit the room left starts a new row instead, the rest of
the row being padding. When the documents run out, the last rows and the last
batch are padded (segment id 0, loss mask 0), so every batch has the same shape.

Output batch (all [B, T]): ``inputs``, ``targets``, ``segment_ids`` (1, 2, ...
per document chunk in a row, 0 on padding), ``positions`` (equal to
``segments.positions_from_segment_ids(segment_ids)``) as int32, ``loss_mask``
float32. The pipeline may then merge each row into one sequence
(``boundaries.apply_document_masking``).

A document carrying ``bad`` (the 'file:line: reason' of a skipped record, no
tokens) is counted, not packed: the count and the first few messages are part
of the iterator state (``"bad_records"``). With a ``CorpusGuard`` the packer
stops with ``DataError`` when too many corpus records are bad or none holds text.
"""
from __future__ import annotations

from typing import Any

import grain
import numpy as np

from lte_jax.data.errors import MAX_EXAMPLES, BadRecords, CorpusGuard


class PackedBatchIterDataset(grain.IterDataset):
  """Packs a stream of documents into batches of ``batch_size`` rows of ``seq_len``."""

  def __init__(self, parent: grain.IterDataset, *, seq_len: int, batch_size: int, pad_id: int,
               guard: CorpusGuard | None = None):
    super().__init__(parent)
    self._seq_len, self._batch_size, self._pad_id = seq_len, batch_size, pad_id
    self._guard = guard

  def __iter__(self) -> _PackedBatchIterator:
    return _PackedBatchIterator(self._parent.__iter__(), self._seq_len, self._batch_size,
                                self._pad_id, self._guard)

  def __str__(self) -> str:
    return f"PackedBatchIterDataset(seq_len={self._seq_len}, batch_size={self._batch_size})"


class _PackedBatchIterator(grain.DatasetIterator):
  """State: the parent's state before the current document and the offset into it,
  plus the bad records skipped and the corpus records read so far."""

  def __init__(self, parent: grain.DatasetIterator, seq_len: int, batch_size: int, pad_id: int,
               guard: CorpusGuard | None = None):
    super().__init__(parent)
    self._seq_len, self._batch_size, self._pad_id = seq_len, batch_size, pad_id
    self._guard = guard
    self._doc: dict[str, Any] | None = None
    self._doc_state: Any = None
    self._offset = 0
    self._exhausted = False
    self._bad, self._read, self._text_seen = BadRecords(), 0, False

  def _count(self, doc: dict[str, Any]) -> None:
    """Bad records and corpus reads, checked against the guard."""
    bad = doc.get("bad")
    if bad is not None:
      self._bad = BadRecords(self._bad.count + 1, (self._bad.first + (str(bad),))[:MAX_EXAMPLES])
    guard = self._guard
    if guard is None or int(doc["kind"]) != guard.kind:
      return
    self._read += 1
    self._text_seen = self._text_seen or len(doc["inputs"]) > 1  # more than BOS -> EOS
    if bad is not None:
      guard.check_bad(self._bad, self._read)
    guard.check_text(self._read, self._text_seen, self._bad)

  def _next_doc(self) -> bool:
    while True:
      state = self._parent.get_state()
      try:
        doc = next(self._parent)
      except StopIteration:
        self._exhausted = True
        return False
      self._count(doc)
      if len(doc["inputs"]):
        self._doc, self._doc_state, self._offset = doc, state, 0
        return True

  def _fill_row(self, row: int, out: dict[str, np.ndarray]) -> int:
    col, seg = 0, 0
    while col < self._seq_len:
      if self._doc is None and (self._exhausted or not self._next_doc()):
        break
      doc, start = self._doc, self._offset
      rest, room = len(doc["inputs"]) - start, self._seq_len - col
      if rest > room and col > 0 and bool(doc["atomic"]):
        break
      take = min(rest, room)
      seg += 1
      dst, src = slice(col, col + take), slice(start, start + take)
      out["inputs"][row, dst] = doc["inputs"][src]
      out["targets"][row, dst] = doc["targets"][src]
      out["loss_mask"][row, dst] = doc["loss_mask"][src]
      out["segment_ids"][row, dst] = seg
      out["positions"][row, dst] = np.arange(take, dtype=np.int32)
      self._offset += take
      if self._offset == len(doc["inputs"]):
        self._doc = None
      col += take
    return col

  def __next__(self) -> dict[str, np.ndarray]:
    shape = (self._batch_size, self._seq_len)
    out = {
        "inputs": np.full(shape, self._pad_id, np.int32),
        "targets": np.full(shape, self._pad_id, np.int32),
        "segment_ids": np.zeros(shape, np.int32),
        "positions": np.zeros(shape, np.int32),
        "loss_mask": np.zeros(shape, np.float32),
    }
    rows = 0
    while rows < self._batch_size and self._fill_row(rows, out):
      rows += 1
    if rows == 0:
      raise StopIteration
    return out

  def get_state(self) -> dict[str, Any]:
    counts = {"bad_records": {"count": self._bad.count, "first": list(self._bad.first)},
              "corpus_read": self._read, "text_seen": self._text_seen}
    if self._doc is None:
      return {"parent": self._parent.get_state(), "pending": False, "offset": 0, **counts}
    return {"parent": self._doc_state, "pending": True, "offset": int(self._offset), **counts}

  def set_state(self, state: dict[str, Any]) -> None:
    self._parent.set_state(state["parent"])
    self._doc, self._exhausted = None, False
    if state["pending"]:
      if not self._next_doc():
        raise ValueError("iterator state points past the end of the documents")
      self._offset = int(state["offset"])
    # After the pending document's re-read, so it is not counted twice.
    bad = state.get("bad_records", {})
    self._bad = BadRecords(int(bad.get("count", 0)), tuple(bad.get("first", ())))
    self._read, self._text_seen = int(state.get("corpus_read", 0)), bool(state.get("text_seen"))

  def __str__(self) -> str:
    return f"PackedBatchIterator(seq_len={self._seq_len}, batch_size={self._batch_size})"
