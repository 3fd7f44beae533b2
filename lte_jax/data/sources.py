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
  Construction reads every file once to index its lines and, with
  ``validate=True``, parses each line, so bad lines are known (and left out of
  the index) before the first step.
- ``ParquetSource``: column ``text_field`` of every file (needs ``pyarrow``);
  each file's column is read into memory on first access, so convert corpora
  larger than memory to ArrayRecord.
- ``ArrayRecordSource``: each record is one UTF-8 document.

A record that cannot be read as text raises ``DataError`` naming its file and
line (row, record) when it is read; ``bad_records`` holds those a source found
up front, ``has_text`` whether any record holds text (None: not known before
reading).
"""
from __future__ import annotations

import array
import bisect
import codecs
import functools
import glob as glob_lib
import json
import os
import re
import threading
from typing import Sequence

import numpy as np

from lte_jax.data.errors import MAX_EXAMPLES, BadRecords, DataError

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

  bad_records = BadRecords()
  has_text = True

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


def _decode(data: bytes, path: str, *, line: bool = True, where: str = "") -> str:
  """UTF-8 ``data``, or DataError at the first undecodable byte (its line if ``line``)."""
  try:
    return data.decode("utf-8")
  except UnicodeDecodeError as err:
    bad = data[err.start]
    if line:
      row = data.count(b"\n", 0, err.start)
      column = err.start - (data.rfind(b"\n", 0, err.start) + 1) + 1
      raise DataError(path, row + 1, f"not UTF-8: byte 0x{bad:02x} at column {column}") from None
    raise DataError(path, None,
                    f"{where}not UTF-8: byte 0x{bad:02x} at offset {err.start}") from None


class TextFileSource(Sequence[str]):
  """Each file matched by ``pattern`` is one UTF-8 document; empty when every file is empty."""

  bad_records = BadRecords()

  def __init__(self, pattern: str):
    self.paths = expand_glob(pattern)
    self.has_text = any(os.path.getsize(p) > 0 for p in self.paths)

  def __len__(self) -> int:
    return len(self.paths)

  def __getitem__(self, index: int) -> str:
    with open(self.paths[index], "rb") as f:
      return _decode(f.read(), self.paths[index])

  def __repr__(self) -> str:
    return f"TextFileSource({len(self.paths)} files)"


class JsonlSource(Sequence[str]):
  """One document per non-empty JSONL line, its text under ``text_field``.

  The byte offset of every line is indexed once at construction (8 bytes per
  document), so access is random and cheap. With ``validate`` every line is
  parsed then too: bad lines are left out of the index and kept in
  ``bad_records`` (or, with ``on_bad='error'``, the first raises ``DataError``).
  """

  def __init__(self, pattern: str, text_field: str = "text", *, validate: bool = False,
               on_bad: str = "skip"):
    self.paths = expand_glob(pattern)
    self.text_field = text_field
    self.bad_records, self.has_text = BadRecords(), False if validate else None
    self._offsets, self._jumps = [], []
    for path in self.paths:
      stat = os.stat(path)
      index = _index_jsonl(path, text_field, validate, on_bad, stat.st_size, stat.st_mtime_ns)
      self._offsets.append(index.offsets)
      self._jumps.append(index.jumps)
      self.bad_records = self.bad_records + index.bad
      if validate:
        self.has_text = self.has_text or index.has_text
    self._starts = np.cumsum([0] + [len(o) for o in self._offsets]).tolist()

  def __len__(self) -> int:
    return self._starts[-1]

  def line_number(self, index: int) -> tuple[str, int]:
    """(file, 1-based line) of document ``index``."""
    f = bisect.bisect_right(self._starts, index) - 1
    row = index - self._starts[f]
    rows, extra = self._jumps[f]
    k = bisect.bisect_right(rows, row) - 1
    return self.paths[f], row + 1 + (int(extra[k]) if k >= 0 else 0)

  def __getitem__(self, index: int) -> str:
    if not 0 <= index < len(self):
      raise IndexError(f"document index {index} out of range [0, {len(self)})")
    f = bisect.bisect_right(self._starts, index) - 1
    with open(self.paths[f], "rb") as fh:
      fh.seek(int(self._offsets[f][index - self._starts[f]]))
      line = fh.readline()
    try:
      return _jsonl_text(line, self.text_field)
    except _BadLine as err:
      raise DataError(*self.line_number(index), str(err)) from None

  def __repr__(self) -> str:
    return f"JsonlSource({len(self.paths)} files, {len(self)} documents)"


class _BadLine(Exception):
  """Why a JSONL line holds no usable text."""


def _jsonl_text(line: bytes, field: str) -> str:
  """The text of one JSONL line, or _BadLine with the reason."""
  if line.startswith(codecs.BOM_UTF8):
    line = line[len(codecs.BOM_UTF8):]
  try:
    decoded = line.decode("utf-8")
  except UnicodeDecodeError as err:
    raise _BadLine(f"not UTF-8: byte 0x{line[err.start]:02x} at column {err.start + 1}") from None
  try:
    record = json.loads(decoded.rstrip("\r\n"))
  except json.JSONDecodeError as err:
    msg = err.msg[:-3] if err.msg.endswith(" at") else err.msg
    raise _BadLine(f"not valid JSON: {msg} at column {err.colno}") from None
  if not isinstance(record, dict):
    raise _BadLine(f"a JSON {_json_type(record)}, not an object with field {field!r}")
  if field not in record:
    names = sorted(record)
    raise _BadLine(f"no field {field!r} (fields: {names[:8]}{' ...' if len(names) > 8 else ''}; "
                   "set data.text_field)")
  text = record[field]
  if not isinstance(text, str):
    raise _BadLine(f"field {field!r} is a JSON {_json_type(text)}, not a string")
  if "\\u" in decoded:  # only a \uXXXX escape can make an unpaired surrogate
    try:
      text.encode("utf-8")
    except UnicodeEncodeError:
      raise _BadLine(f"field {field!r} holds an unpaired surrogate escape "
                     "(not UTF-8 text)") from None
  return text


def _json_type(value) -> str:
  if value is None:
    return "null"
  return {bool: "boolean", int: "number", float: "number", str: "string", list: "array",
          dict: "object"}.get(type(value), type(value).__name__)


class _JsonlIndex:
  """offsets [n] int64 of the indexed lines; jumps: (rows, extra), the lines left out
  before each row from rows[k] on; bad: bad lines; has_text: a line with text."""

  def __init__(self, offsets, jumps, bad, has_text):
    self.offsets, self.jumps, self.bad, self.has_text = offsets, jumps, bad, has_text


@functools.lru_cache(maxsize=1024)
def _index_jsonl(path: str, field: str, validate: bool, on_bad: str, size: int,
                 mtime_ns: int) -> _JsonlIndex:
  """One streaming pass over ``path``: offsets of the lines to read (blank ones and,
  with ``validate``, bad ones left out). Cached while the file's size and mtime stay:
  the training and validation iterators share one pass."""
  del size, mtime_ns  # cache key only
  offsets, rows, extra = array.array("q"), array.array("q"), array.array("q")
  bad, first, has_text, pos, skipped = 0, [], False, 0, 0
  with open(path, "rb") as f:
    for lineno, line in enumerate(f, 1):
      start, pos = pos, pos + len(line)
      if line.isspace():
        skipped += 1
        continue
      if validate:
        try:
          has_text = bool(_jsonl_text(line, field)) or has_text
        except _BadLine as err:
          if on_bad == "error":
            raise DataError(path, lineno, f"{err} (data.bad_records='skip' skips bad records)")
          bad += 1
          if len(first) < MAX_EXAMPLES:
            first.append(f"{path}:{lineno}: {err}")
          skipped += 1
          continue
      if skipped and (not extra or extra[-1] != skipped):
        rows.append(len(offsets))
        extra.append(skipped)
      offsets.append(start)
  jumps = (np.frombuffer(rows, np.int64), np.frombuffer(extra, np.int64))
  return _JsonlIndex(np.frombuffer(offsets, np.int64), jumps, BadRecords(bad, tuple(first)),
                     has_text)


_TEXT_TYPES = ("string", "large_string", "binary", "large_binary")


class ParquetSource(Sequence[str]):
  """Column ``text_field`` (string or binary) of Parquet files; row counts come from the
  file footers. A null or undecodable value is a bad record (DataError naming the row)."""

  bad_records = BadRecords()
  has_text = None

  def __init__(self, pattern: str, text_field: str = "text"):
    from lte_jax.data.tokenizers import _import_optional  # pylint: disable=g-import-not-at-top
    self._pq = _import_optional("pyarrow.parquet", "pyarrow", "the Parquet source")
    self.paths = expand_glob(pattern)
    self.text_field = text_field
    counts = []
    for p in self.paths:
      meta = self._pq.ParquetFile(p)
      schema = meta.schema_arrow
      if text_field not in schema.names:
        raise ValueError(f"{p}: no column {text_field!r} (columns: {schema.names}); "
                         "set text_field")
      kind = str(schema.field(text_field).type)
      if kind not in _TEXT_TYPES:
        raise ValueError(f"{p}: column {text_field!r} holds {kind}, not text (one of "
                         f"{_TEXT_TYPES}); set text_field")
      counts.append(meta.metadata.num_rows)
    self._starts = np.cumsum([0] + counts).tolist()
    self._columns: dict[int, object] = {}
    self._lock = threading.Lock()

  def __len__(self) -> int:
    return self._starts[-1]

  def _column(self, f: int):
    """File ``f``'s column as one Arrow large_binary array (no Python object per row)."""
    with self._lock:
      if f not in self._columns:
        import pyarrow as pa  # pylint: disable=g-import-not-at-top
        table = self._pq.read_table(self.paths[f], columns=[self.text_field])
        column = table.column(self.text_field).cast(pa.large_binary())
        self._columns[f] = column.combine_chunks()
      return self._columns[f]

  def __getitem__(self, index: int) -> str:
    if not 0 <= index < len(self):
      raise IndexError(f"document index {index} out of range [0, {len(self)})")
    f = bisect.bisect_right(self._starts, index) - 1
    row = index - self._starts[f]
    value = self._column(f)[row].as_py()
    if value is None:
      raise DataError(self.paths[f], None, f"row {row}: {self.text_field!r} is null")
    return _decode(value, self.paths[f], line=False, where=f"row {row}: ")

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

  bad_records = BadRecords()
  has_text = None

  def __init__(self, pattern: str):
    import grain  # pylint: disable=g-import-not-at-top
    self.paths = expand_glob(pattern)
    self._source = grain.sources.ArrayRecordDataSource(self.paths)

  def __len__(self) -> int:
    return len(self._source)

  def _where(self, index: int) -> tuple[str, int]:
    """(file, record in that file) of record ``index``."""
    try:  # array_record's own key -> (reader, position) map
      # pylint: disable-next=protected-access
      reader, position = self._source._reader_idx_and_position(index)
      return self._source.paths[reader], int(position)
    except (AttributeError, IndexError, TypeError):
      return ",".join(self.paths), index

  def __getitem__(self, index: int) -> str:
    data = self._source[index]
    try:
      return data.decode("utf-8")
    except UnicodeDecodeError:
      path, record = self._where(index)
      return _decode(data, path, line=False, where=f"record {record}: ")

  def __repr__(self) -> str:
    return f"ArrayRecordSource({len(self.paths)} files, {len(self)} documents)"


def make_source(kind: str, path: str | None = None, text_field: str = "text", *,
                validate: bool = False, on_bad: str = "skip") -> Sequence[str]:
  """The document source of ``kind`` (one of SOURCE_KINDS) reading ``path`` (a glob).

  validate, on_bad: a JSONL source's up-front check (``JsonlSource``).
  """
  if kind not in SOURCE_KINDS:
    raise ValueError(f"source must be one of {SOURCE_KINDS}, got {kind!r}")
  if kind == "embedded":
    return EmbeddedSource()
  if kind == "text":
    return TextFileSource(path)
  if kind == "jsonl":
    return JsonlSource(path, text_field, validate=validate, on_bad=on_bad)
  if kind == "parquet":
    return ParquetSource(path, text_field)
  return ArrayRecordSource(path)
