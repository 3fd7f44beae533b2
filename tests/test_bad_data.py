"""Bad training data: bad records skipped and counted or reported by file and line, empty
corpora, long documents tokenized in pieces, a training run over a corpus with a bad record."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tracemalloc

import numpy as np
import pytest

from lte_jax import data
from lte_jax.data import DataConfig, DataError, make_train_iterator

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GOOD = [json.dumps({"text": f"document {i} holds a few words of text.", "id": i})
        for i in range(40)]
BAD_LINES = {  # one bad JSONL line each, and what the message must say
    "non_utf8": (b'{"text": "caf\xe9 latin-1"}', "not UTF-8: byte 0xe9"),
    "missing_field": (b'{"body": "no text here"}', "no field 'text'"),
    "non_string": (b'{"text": ["a", "list"]}', "field 'text' is a JSON array"),
    "bad_json": (b'{"text": "unterminated', "not valid JSON"),
    "null": (b"null", "a JSON null"),
    "surrogate": (b'{"text": "lone \\ud800 half"}', "field 'text' holds an unpaired surrogate"),
}
BAD_AT = 7  # 1-based line of the bad record (after a blank line, which is not a record)


def jsonl(tmp_path, bad: bytes | None, name="corpus.jsonl", good=GOOD):
  lines = [g.encode() for g in good[:3]] + [b""] + [g.encode() for g in good[3:5]]
  lines += [bad] if bad is not None else []
  lines += [g.encode() for g in good[5:]]
  path = tmp_path / name
  path.write_bytes(b"\n".join(lines) + b"\n")
  return str(path)


def config(path, **kw):
  kw = {"source": "jsonl", "path": path, "seq_len": 32, "batch_size": 2, "num_epochs": 1,
        "read_threads": 1, "max_bad_fraction": 0.1, **kw}
  return DataConfig(**kw)


def tokens_of(batches):
  """The multiset of target tokens of every batch (loss mask 1)."""
  return np.sort(np.concatenate([b["targets"][b["loss_mask"] > 0] for b in batches]))


@pytest.mark.parametrize("kind", sorted(BAD_LINES))
def test_bad_jsonl_record_is_skipped_and_counted_or_named(tmp_path, kind):
  line, reason = BAD_LINES[kind]
  path = jsonl(tmp_path, line)
  clean = tokens_of(list(make_train_iterator(config(jsonl(tmp_path, None, "clean.jsonl")))))
  for validate in (True, False):  # found before the first batch / when read
    it = make_train_iterator(config(path, validate=validate))
    batches = list(it)
    bad = it.bad_records()
    assert bad.count == 1 and bad.first[0].startswith(f"{path}:{BAD_AT}: "), bad
    assert reason in bad.first[0]
    np.testing.assert_array_equal(tokens_of(batches), clean)  # every good record, once
    with pytest.raises(DataError, match=f"{BAD_AT}: {reason}") as err:
      list(make_train_iterator(config(path, validate=validate, bad_records="error")))
    assert (err.value.path, err.value.line) == (path, BAD_AT)


@pytest.mark.parametrize("kw,field", [
    (dict(bad_records="drop"), "DataConfig.bad_records must be one of \\('skip', 'error'\\)"),
    (dict(max_bad_fraction=1.5), "DataConfig.max_bad_fraction must be a number in \\[0, 1\\]"),
    (dict(max_bad_fraction=True), "DataConfig.max_bad_fraction"),
    (dict(validate="yes"), "DataConfig.validate must be a bool"),
])
def test_bad_record_settings_are_validated(kw, field):
  with pytest.raises(ValueError, match=field):
    DataConfig(**kw)


def test_bad_record_count_survives_a_resume(tmp_path):
  cfg = config(jsonl(tmp_path, BAD_LINES["null"][0]), validate=False, num_epochs=None)
  it = make_train_iterator(cfg)
  for _ in range(12):  # past the bad record
    next(it)
  assert it.bad_records().count == 1
  state = json.loads(json.dumps(it.get_state()))
  fresh = make_train_iterator(cfg)
  fresh.set_state(state)
  assert fresh.bad_records() == it.bad_records()


def test_too_many_bad_records_stop_with_the_first_named(tmp_path):
  path = jsonl(tmp_path, BAD_LINES["null"][0])
  for validate in (True, False):
    with pytest.raises(DataError, match=rf"max_bad_fraction=0.01.*{BAD_AT}: a JSON null"):
      list(make_train_iterator(config(path, validate=validate, max_bad_fraction=0.01)))


def test_text_parquet_and_arrayrecord_bad_records(tmp_path):
  (tmp_path / "a.txt").write_bytes(b"fine text\nmore")
  (tmp_path / "b.txt").write_bytes(b"line one\nline \xff two")
  cfg = config(str(tmp_path / "*.txt"), source="text", max_bad_fraction=0.5)
  it = make_train_iterator(cfg)
  list(it)
  assert it.bad_records().first == (f"{tmp_path / 'b.txt'}:2: not UTF-8: byte 0xff at column 6",)
  with pytest.raises(DataError, match=r"b.txt:2: not UTF-8"):
    list(make_train_iterator(config(cfg.path, source="text", bad_records="error")))

  pa = pytest.importorskip("pyarrow")
  import pyarrow.parquet as pq
  values = pa.array([b"good one", None, b"bad \xff", b"good two"], pa.binary())
  pq.write_table(pa.table({"text": values}), str(tmp_path / "t.parquet"))
  it = make_train_iterator(config(str(tmp_path / "t.parquet"), source="parquet",
                                  max_bad_fraction=0.5))
  list(it)
  assert sorted(it.bad_records().first) == sorted([
      f"{tmp_path / 't.parquet'}: row 1: 'text' is null",
      f"{tmp_path / 't.parquet'}: row 2: not UTF-8: byte 0xff at offset 4"])
  pq.write_table(pa.table({"text": [1, 2]}), str(tmp_path / "n.parquet"))
  with pytest.raises(ValueError, match="column 'text' holds int64, not text"):
    make_train_iterator(config(str(tmp_path / "n.parquet"), source="parquet"))

  from array_record.python.array_record_module import ArrayRecordWriter
  writer = ArrayRecordWriter(str(tmp_path / "d.array_record"), "group_size:1")
  for record in (b"good", b"\xc3(", b"also good"):
    writer.write(record)
  writer.close()
  with pytest.raises(DataError, match=r"d.array_record: record 1: not UTF-8: byte 0xc3"):
    list(make_train_iterator(config(str(tmp_path / "d.array_record"), source="arrayrecord",
                                    bad_records="error", shuffle=False)))


@pytest.mark.parametrize("case", ["blank_lines", "all_bad", "all_empty_text", "empty_files"])
def test_a_corpus_without_text_is_an_error_naming_it(tmp_path, case):
  if case == "blank_lines":
    path, source = tmp_path / "c.jsonl", "jsonl"
    path.write_text("\n  \n\n")
  elif case == "all_bad":
    path, source = tmp_path / "c.jsonl", "jsonl"
    path.write_text('{"body": "x"}\nnull\n')
  elif case == "all_empty_text":
    path, source = tmp_path / "c.jsonl", "jsonl"
    path.write_text('{"text": ""}\n{"text": ""}\n')
  else:
    path, source = tmp_path / "*.txt", "text"
    (tmp_path / "a.txt").write_text("")
    (tmp_path / "b.txt").write_text("")
  with pytest.raises(DataError, match="no document with text") as err:
    make_train_iterator(config(str(path), source=source, max_bad_fraction=1.0))
  assert err.value.path == str(path)


def test_a_corpus_found_empty_while_reading_is_an_error(tmp_path):
  # Nothing up front can tell: every record is bad (read lazily) or holds no text.
  path = tmp_path / "c.jsonl"
  path.write_text('{"body": "x"}\nnull\n')
  cfg = config(str(path), validate=False, max_bad_fraction=1.0, num_epochs=None)
  with pytest.raises(DataError, match=r"c.jsonl: no document holds any text \(4 records read, "
                     r"4 of them bad\)"):
    next(make_train_iterator(cfg))
  from array_record.python.array_record_module import ArrayRecordWriter
  writer = ArrayRecordWriter(str(tmp_path / "e.array_record"), "group_size:1")
  for _ in range(3):
    writer.write(b"")
  writer.close()
  cfg = config(str(tmp_path / "e.array_record"), source="arrayrecord", num_epochs=None)
  with pytest.raises(DataError, match="e.array_record: no document holds any text"):
    next(make_train_iterator(cfg))


# ----------------------------------------------------------------------------- long documents


def test_text_pieces_cut_before_a_word_and_rejoin():
  text = "word " * 300 + "x" * 700 + "  two  spaces\n\nlines " * 50
  pieces = list(data.text_pieces(text, 256))
  assert "".join(pieces) == text and all(0 < len(p) <= 256 for p in pieces)
  hard = 0
  for before, piece in zip(pieces, pieces[1:]):
    if len(before) == 256:  # no word boundary in reach: cut inside the run of x
      hard += 1
      assert before[-1] == piece[0] == "x"
    else:  # before the whitespace character that starts a word
      assert piece[0].isspace() and not piece[1].isspace() and len(before) >= 128
  assert 1 <= hard < len(pieces) - 5


def test_long_document_tokenizes_in_pieces_to_the_same_ids(tmp_path):
  text = "".join(data.EmbeddedSource()[i] for i in range(12))[:60_000]
  byte = data.ByteTokenizer()
  np.testing.assert_array_equal(data.encode_document(byte, text),
                                [byte.bos_id, *byte.encode(text), byte.eos_id])
  tokenizers = pytest.importorskip("tokenizers")
  tok = tokenizers.Tokenizer(tokenizers.models.BPE(unk_token="<unk>"))
  tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
  trainer = tokenizers.trainers.BpeTrainer(
      vocab_size=300, special_tokens=["<pad>", "<s>", "</s>", "<unk>"], show_progress=False,
      initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator(data.prose_sentences()[:300], trainer)
  tok.save(str(tmp_path / "tokenizer.json"))
  spm = pytest.importorskip("sentencepiece")
  (tmp_path / "corpus.txt").write_text("\n".join(data.prose_sentences()[:400]))
  spm.SentencePieceTrainer.train(input=str(tmp_path / "corpus.txt"), vocab_size=200,
                                 model_prefix=str(tmp_path / "sp"), model_type="bpe",
                                 minloglevel=2)
  for spec in ("tokenizer.json", "sp.model"):
    sub = data.get_tokenizer(str(tmp_path / spec))
    whole = [sub.bos_id, *sub.encode(text), sub.eos_id]
    np.testing.assert_array_equal(data.encode_document(sub, text, piece_chars=1000), whole)


def test_a_5mb_document_costs_bytes_per_character_not_python_objects():
  from lte_jax.data import pipeline
  text = ("A long single-line document, " * 200_000)[:5_000_000]
  tracemalloc.start()
  try:
    doc = pipeline._TokenizeText(data.ByteTokenizer())(text)  # pylint: disable=protected-access
    _, peak = tracemalloc.get_traced_memory()
  finally:
    tracemalloc.stop()
  assert len(doc["inputs"]) == len(text) + 1
  # int32 ids + the UTF-8 bytes: ~5 bytes a character (a list of ints was ~17)
  assert peak < 8 * len(text), peak / len(text)


# ----------------------------------------------------------------------------- training


def test_training_over_a_corpus_with_a_bad_record_reports_it(tmp_path):
  good = [json.dumps({"text": f"Document {i}: " + "some words of text " * 20}) for i in range(200)]
  path = jsonl(tmp_path, BAD_LINES["bad_json"][0], good=good)
  workdir = tmp_path / "run"
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_backend_optimization_level=0 "
             "--xla_llvm_disable_expensive_passes=true")
  proc = subprocess.run(
      [sys.executable, "-m", "experiments.train", "--config=transformer", f"--workdir={workdir}",
       "--config.steps=2", "--config.log.every=1", "--config.model.num_layers=1",
       "--config.data.seq_len=16", "--config.data.batch_size=2", "--config.optim.warmup_steps=1",
       "--config.log.progress=False", "--config.log.tensorboard=False",
       "--config.eval.every=0", "--config.data.source=jsonl", f"--config.data.path={path}"],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
  assert proc.returncode == 0, proc.stderr[-3000:]
  records = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]
  assert [r["data/bad_records"] for r in records] == [1, 1]
  assert f"bad records  1 skipped; first: {path}:{BAD_AT}: not valid JSON" in proc.stdout


def test_train_help_documents_bad_records():
  from experiments import train  # pylint: disable=g-import-not-at-top
  text = train.flags.FLAGS["config"].help
  assert data.BAD_RECORDS_HELP in text
  for field in ("data.bad_records='skip'", "data.max_bad_fraction=0.01", "data.validate=True"):
    assert field in text
