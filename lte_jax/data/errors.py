"""Bad corpus records: the ``DataError`` exception, skip counts and the corpus guard.

A record is bad when its bytes are not UTF-8, a JSONL line is not a JSON object
holding a string under ``text_field`` (bad JSON, ``null``, a missing or
non-string field, an unpaired surrogate escape), or a Parquet value is null.
``DataConfig.bad_records`` picks what happens: 'error' raises ``DataError``
naming the file and line; 'skip' drops the record and counts it. Counts found
while reading live in the packer's iterator state (``"bad_records"``), so they
are checkpointed with it and survive a resume; ``count_in_state`` sums them over
every packer in a state (one per grain worker).
"""
from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

BAD_RECORD_POLICIES = ("skip", "error")
MAX_EXAMPLES = 5  # bad records whose file and line are kept for the report


class DataError(ValueError):
  """A corpus record that cannot be trained on, or a corpus holding no usable text.

  path: the file (or the source's glob); line: 1-based line of a JSONL or text
  file, None where ``reason`` gives the position (a Parquet row, an ArrayRecord
  record) or none applies; reason: what is wrong.
  """

  def __init__(self, path: str, line: int | None, reason: str):
    super().__init__(path, line, reason)  # args pickle back into the same fields
    self.path, self.line, self.reason = path, line, reason

  def __str__(self) -> str:
    where = self.path if self.line is None else f"{self.path}:{self.line}"
    return f"{where}: {self.reason}"


class BadRecords(NamedTuple):
  """Bad records skipped: how many, and 'file:line: reason' of the first few."""
  count: int = 0
  first: tuple[str, ...] = ()

  def __add__(self, other: BadRecords) -> BadRecords:  # type: ignore[override]
    return BadRecords(self.count + other.count, (self.first + other.first)[:MAX_EXAMPLES])

  def describe(self) -> str:
    """One line for logs and the run summary."""
    if not self.count:
      return "none"
    return f"{self.count} skipped; first: " + "; ".join(self.first)


def count_in_state(state: Any) -> BadRecords:
  """The bad records of every packer state nested in an iterator ``state``."""
  total = BadRecords()
  stack = [state]
  while stack:
    node = stack.pop()
    if isinstance(node, dict):
      bad = node.get("bad_records")
      if isinstance(bad, dict) and "count" in bad:
        total = total + BadRecords(int(bad["count"]), tuple(bad.get("first", ())))
      stack.extend(v for k, v in node.items() if k != "bad_records")
    elif isinstance(node, (list, tuple)):
      stack.extend(node)
  return total


@dataclasses.dataclass(frozen=True)
class CorpusGuard:
  """What the packer checks of the corpus documents (``kind``) it reads.

  name: the corpus (its path glob) for messages. size: the records one packer
  reads per pass (the corpus over the processes). Stops with ``DataError`` when
  more than ``max_bad_fraction`` of max(records read, size) were bad, or when
  ``2 * size`` records were read and none held any text.
  """
  name: str
  size: int
  max_bad_fraction: float
  kind: int = 0

  def check_bad(self, bad: BadRecords, read: int) -> None:
    base = max(read, self.size)
    if bad.count > self.max_bad_fraction * base:
      raise DataError(self.name, None, f"{bad.count} bad record(s) in {read} read, more than "
                      f"data.max_bad_fraction={self.max_bad_fraction} of {base} (raise it, or "
                      "fix the data); first: " + "; ".join(bad.first))

  def check_text(self, read: int, text_seen: bool, bad: BadRecords) -> None:
    if not text_seen and read >= 2 * max(self.size, 1):
      raise DataError(self.name, None, f"no document holds any text ({read} records read, "
                      f"{bad.count} of them bad): the corpus is empty")
