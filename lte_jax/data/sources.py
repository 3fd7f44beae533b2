"""Random-access document sources: ``len(src)`` documents, ``src[i]`` -> str.

Every source is a plain sequence that ``grain.MapDataset.source`` accepts, with
a deterministic order (files sorted by path, records in file order):

- ``EmbeddedSource``: the documentation topics that ship with Python
  (``pydoc_data.topics``), one topic per document, sorted by name. Real English
  prose (~465k characters) that needs no download and no file in the repo.
- ``TextFileSource``: each file matched by the glob is ONE document (long files
  are split across rows by the packer; for many small documents in one file use
  JSONL).
- ``JsonlSource``: one JSON object per non-empty line, text under ``text_field``.
- ``ParquetSource``: column ``text_field`` of every file (needs ``pyarrow``);
  each file's column is read into memory on first access, so convert corpora
  larger than memory to ArrayRecord.
- ``ArrayRecordSource``: each record is one UTF-8 document.
"""
from __future__ import annotations

import bisect
import functools
import glob as glob_lib
import json
import os
import re
import threading
from typing import Sequence

import numpy as np

SOURCE_KINDS = ("embedded", "text", "jsonl", "parquet", "arrayrecord")


def expand_glob(pattern: str) -> list[str]:
  """Sorted files matching ``pattern`` (``**`` recurses); ValueError if none."""
  if not isinstance(pattern, str) or not pattern:
    raise ValueError(f"path must be a non-empty glob string, got {pattern!r}")
  paths = sorted(p for p in glob_lib.glob(os.path.expanduser(pattern), recursive=True)
                 if os.path.isfile(p))
  if not paths:
    raise ValueError(f"path glob {pattern!r} matches no file")
  return paths


class EmbeddedSource(Sequence[str]):
  """Python's own documentation topics (``pydoc_data.topics``), one per document."""

  def __init__(self):
    topics = _pydoc_topics()
    self._names = sorted(topics)
    self._topics = topics

  def __len__(self) -> int:
    return len(self._names)

  def __getitem__(self, index: int) -> str:
    return self._topics[self._names[index]]

  def __repr__(self) -> str:
    return f"EmbeddedSource({len(self)} pydoc topics)"


def _pydoc_topics() -> dict[str, str]:
  try:
    from pydoc_data import topics  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError("the embedded corpus needs the standard library's pydoc_data "
                      "(some minimal Python builds drop it); use source='text' instead") from e
  return dict(topics.topics)


@functools.lru_cache(maxsize=1)
def prose_sentences() -> tuple[str, ...]:
  """Sentences of the prose paragraphs of ``pydoc_data`` (no grammar or code blocks).

  Used as the essay haystack of NIAH documents; deterministic for a Python version.
  """
  sentences = []
  for name in sorted(_pydoc_topics()):
    for para in re.split(r"\n\s*\n", _pydoc_topics()[name]):
      # Indented blocks are code, grammar or tables; keep plain paragraphs.
      if not para or para[0].isspace() or "::=" in para or para.startswith((">>>", "*", "=")):
        continue
      text = " ".join(para.split())
      if len(text) < 40 or not text.endswith((".", "!", "?", ":")):
        continue
      sentences.extend(s for s in re.split(r"(?<=[.!?])\s+(?=[A-Z])", text) if len(s) > 1)
  return tuple(sentences)


class TextFileSource(Sequence[str]):
  """Each file matched by ``pattern`` is one document (UTF-8, undecodable bytes replaced)."""

  def __init__(self, pattern: str):
    self.paths = expand_glob(pattern)

  def __len__(self) -> int:
    return len(self.paths)

  def __getitem__(self, index: int) -> str:
    with open(self.paths[index], encoding="utf-8", errors="replace") as f:
      return f.read()

  def __repr__(self) -> str:
    return f"TextFileSource({len(self.paths)} files)"


class JsonlSource(Sequence[str]):
  """One document per non-empty JSONL line, its text under ``text_field``.

  The byte offset of every line is indexed once at construction (8 bytes per
  document), so access is random and cheap.
  """

  def __init__(self, pattern: str, text_field: str = "text"):
    self.paths = expand_glob(pattern)
    self.text_field = text_field
    self._offsets = [_line_offsets(p) for p in self.paths]
    self._starts = np.cumsum([0] + [len(o) for o in self._offsets]).tolist()

  def __len__(self) -> int:
    return self._starts[-1]

  def __getitem__(self, index: int) -> str:
    if not 0 <= index < len(self):
      raise IndexError(f"document index {index} out of range [0, {len(self)})")
    f = bisect.bisect_right(self._starts, index) - 1
    row = index - self._starts[f]
    with open(self.paths[f], "rb") as fh:
      fh.seek(int(self._offsets[f][row]))
      line = fh.readline()
    record = json.loads(line)
    if not isinstance(record, dict) or self.text_field not in record:
      raise ValueError(f"{self.paths[f]}: record {row} has no field {self.text_field!r} "
                       f"(set text_field)")
    text = record[self.text_field]
    if not isinstance(text, str):
      raise ValueError(f"{self.paths[f]}: record {row} field {self.text_field!r} is not a string")
    return text

  def __repr__(self) -> str:
    return f"JsonlSource({len(self.paths)} files, {len(self)} documents)"


def _line_offsets(path: str) -> np.ndarray:
  offsets, pos = [], 0
  with open(path, "rb") as f:
    for line in f:
      if line.strip():
        offsets.append(pos)
      pos += len(line)
  return np.asarray(offsets, np.int64)


class ParquetSource(Sequence[str]):
  """Column ``text_field`` of Parquet files; row counts come from the file footers."""

  def __init__(self, pattern: str, text_field: str = "text"):
    from lte_jax.data.tokenizers import _import_optional  # pylint: disable=g-import-not-at-top
    self._pq = _import_optional("pyarrow.parquet", "pyarrow", "the Parquet source")
    self.paths = expand_glob(pattern)
    self.text_field = text_field
    counts = []
    for p in self.paths:
      meta = self._pq.ParquetFile(p)
      if text_field not in meta.schema_arrow.names:
        raise ValueError(f"{p}: no column {text_field!r} (columns: {meta.schema_arrow.names}); "
                         "set text_field")
      counts.append(meta.metadata.num_rows)
    self._starts = np.cumsum([0] + counts).tolist()
    self._columns: dict[int, list] = {}
    self._lock = threading.Lock()

  def __len__(self) -> int:
    return self._starts[-1]

  def _column(self, f: int) -> list:
    with self._lock:
      if f not in self._columns:
        table = self._pq.read_table(self.paths[f], columns=[self.text_field])
        self._columns[f] = table.column(self.text_field).to_pylist()
      return self._columns[f]

  def __getitem__(self, index: int) -> str:
    if not 0 <= index < len(self):
      raise IndexError(f"document index {index} out of range [0, {len(self)})")
    f = bisect.bisect_right(self._starts, index) - 1
    return self._column(f)[index - self._starts[f]] or ""

  def __getstate__(self):
    return {"paths": self.paths, "text_field": self.text_field, "starts": self._starts}

  def __setstate__(self, state):
    from lte_jax.data.tokenizers import _import_optional  # pylint: disable=g-import-not-at-top
    self._pq = _import_optional("pyarrow.parquet", "pyarrow", "the Parquet source")
    self.paths, self.text_field, self._starts = state["paths"], state["text_field"], state["starts"]
    self._columns, self._lock = {}, threading.Lock()

  def __repr__(self) -> str:
    return f"ParquetSource({len(self.paths)} files, {len(self)} documents)"


class ArrayRecordSource(Sequence[str]):
  """ArrayRecord files whose records are UTF-8 documents."""

  def __init__(self, pattern: str):
    import grain  # pylint: disable=g-import-not-at-top
    self.paths = expand_glob(pattern)
    self._source = grain.sources.ArrayRecordDataSource(self.paths)

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index: int) -> str:
    return self._source[index].decode("utf-8", errors="replace")

  def __repr__(self) -> str:
    return f"ArrayRecordSource({len(self.paths)} files, {len(self)} documents)"


def make_source(kind: str, path: str | None = None, text_field: str = "text") -> Sequence[str]:
  """The document source of ``kind`` (one of SOURCE_KINDS) reading ``path`` (a glob)."""
  if kind not in SOURCE_KINDS:
    raise ValueError(f"source must be one of {SOURCE_KINDS}, got {kind!r}")
  if kind == "embedded":
    return EmbeddedSource()
  if kind == "text":
    return TextFileSource(path)
  if kind == "jsonl":
    return JsonlSource(path, text_field)
  if kind == "parquet":
    return ParquetSource(path, text_field)
  return ArrayRecordSource(path)
