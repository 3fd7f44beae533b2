"""EVAPORATE-style retrieval tasks (HazyResearch/based) from a local copy of the data.

The data lives only on the Hugging Face hub, so it is read from
``<data_dir>/<task>.parquet`` or ``<data_dir>/<task>.jsonl`` (one record per
document). Accepted record fields:

- SWDE / FDA: ``text`` (the document) and ``value`` (gold, a string or a list of
  aliases); with ``key`` the prompt is the document + " {key}:" (skipped when
  the text already ends with it).
- SQuAD / TriviaQA / NQ / DROP: ``context`` + ``question`` (prompt: context,
  a space, question) or a ready ``text`` prompt; gold under ``answers``,
  ``answer`` or ``value`` (a string, a list, or SQuAD's {"text": [...]}).

The document is cut to a window of (context_length - 50) tokens (prompt suffix
included) around the first occurrence of the answer; decoding is greedy until
"\\n" for at most 48 tokens; the score is ``contains_any``.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

from lte_jax.data.tokenizers import Tokenizer

EVAPORATE_TASKS = ("swde", "fda", "squad", "triviaqa", "nq", "drop")
MAX_NEW_TOKENS = 48
STOP = "\n"
WINDOW_MARGIN = 50


@dataclasses.dataclass(frozen=True)
class QAExample:
  document: str
  suffix: str                   # the key or question appended after the document
  answers: tuple[str, ...]


def data_file(data_dir: str | None, task: str) -> str:
  """The local copy of ``task``; ValueError naming the files looked for when absent."""
  if task not in EVAPORATE_TASKS:
    raise ValueError(f"task must be one of {EVAPORATE_TASKS}, got {task!r}")
  candidates = [os.path.join(data_dir or ".", f"{task}.{ext}") for ext in ("parquet", "jsonl")]
  for path in candidates:
    if os.path.isfile(path):
      return path
  raise ValueError(f"task {task!r} needs a local copy of its data (it is only on the Hugging "
                   f"Face hub): none of {candidates} exists; pass --data_dir=DIR holding "
                   f"{task}.parquet or {task}.jsonl")


def _records(path: str) -> list[dict]:
  if path.endswith(".jsonl"):
    with open(path) as f:
      return [json.loads(line) for line in f if line.strip()]
  import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
  return pq.read_table(path).to_pylist()


def _answers(value: Any) -> tuple[str, ...]:
  if isinstance(value, dict):
    value = value.get("text", [])
  if isinstance(value, str):
    value = [value]
  return tuple(str(v) for v in value if str(v))


def parse_record(task: str, record: dict, where: str) -> QAExample:
  gold = next((record[k] for k in ("value", "answers", "answer") if k in record), None)
  if gold is None or not _answers(gold):
    raise ValueError(f"{where}: a record needs a non-empty 'value', 'answers' or 'answer'")
  if task in ("swde", "fda") or "context" not in record:
    if "text" not in record:
      raise ValueError(f"{where}: a {task} record needs 'text' (or 'context' + 'question')")
    text, key = str(record["text"]), record.get("key")
    suffix = f" {key}:" if key and not text.rstrip().endswith(f"{key}:") else ""
    return QAExample(text, suffix, _answers(gold))
  if "question" not in record:
    raise ValueError(f"{where}: a {task} record with 'context' needs 'question'")
  return QAExample(str(record["context"]), " " + str(record["question"]), _answers(gold))


def load_examples(data_dir: str | None, task: str, limit: int) -> list[QAExample]:
  path = data_file(data_dir, task)
  return [parse_record(task, r, f"{path} record {i}")
          for i, r in enumerate(_records(path)[:limit])]


def windowed_prompt(ex: QAExample, tokenizer: Tokenizer, context_length: int) -> list[int]:
  """Token ids (no BOS) of the document window + suffix, at most context_length - 50."""
  budget = context_length - WINDOW_MARGIN
  suffix = tokenizer.encode(ex.suffix)
  room = budget - len(suffix)
  if room < 1:
    raise ValueError(f"context_length={context_length} leaves no room for the document "
                     f"(suffix of {len(suffix)} tokens, margin {WINDOW_MARGIN})")
  doc = tokenizer.encode(ex.document)
  if len(doc) <= room:
    return doc + suffix
  at = min((i for i in (ex.document.lower().find(a.lower()) for a in ex.answers) if i >= 0),
           default=0)
  centre = len(tokenizer.encode(ex.document[:at]))
  start = max(0, min(centre - room // 2, len(doc) - room))
  return doc[start:start + room] + suffix
