"""The data pipeline: tokenizers, sources, packing, mixtures, retrieval data, resumption."""
from __future__ import annotations

import collections
import dataclasses
import json
import re
import sys

import numpy as np
import pytest

from lte_jax import data
from lte_jax.data import DataConfig, make_train_iterator

BYTE = data.ByteTokenizer()

DOCS = [
    "short one",
    "",
    "A document long enough to be split over two or three rows of sixteen tokens.",
    "héllo wörld ✓",
    "x",
    "Another medium sized document, still longer than a row.",
    "tail",
]


def take(it, n):
  return [next(it) for _ in range(n)]


def batches_equal(a, b):
  return len(a) == len(b) and all(
      set(x) == set(y) and all(np.array_equal(x[k], y[k]) for k in x) for x, y in zip(a, b))


@pytest.fixture
def text_corpus(tmp_path):
  for i, doc in enumerate(DOCS):
    (tmp_path / f"doc{i}.txt").write_text(doc, encoding="utf-8")
  return str(tmp_path / "*.txt")


# ----------------------------------------------------------------------------- tokenizers


def test_byte_tokenizer_round_trip():
  text = "Plain ASCII, ünïcödé, emoji 🙂 and\nnewlines\t."
  ids = BYTE.encode(text)
  assert len(ids) == len(text.encode("utf-8"))
  assert min(ids) >= 3 and max(ids) < BYTE.vocab_size == 259
  assert BYTE.decode(ids) == text
  assert BYTE.decode([BYTE.bos_id, *ids, BYTE.eos_id, BYTE.pad_id]) == text
  assert (BYTE.pad_id, BYTE.bos_id, BYTE.eos_id) == (0, 1, 2)
  assert isinstance(BYTE, data.Tokenizer)
  assert isinstance(data.get_tokenizer("byte"), data.ByteTokenizer)


@pytest.mark.parametrize("spec", ["bytes", "/no/such/tokenizer.json", "vocab.txt", 3])
def test_unknown_tokenizer_spec_lists_accepted_forms(spec):
  with pytest.raises(ValueError, match="tokenizer must be one of 'byte'.*tokenizer.json"):
    data.get_tokenizer(spec)


def test_missing_optional_package_names_pip_package(tmp_path, monkeypatch):
  (tmp_path / "tokenizer.json").write_text("{}")
  (tmp_path / "sp.model").write_bytes(b"")
  monkeypatch.setitem(sys.modules, "tokenizers", None)
  monkeypatch.setitem(sys.modules, "sentencepiece", None)
  with pytest.raises(ImportError, match="pip install tokenizers"):
    data.get_tokenizer(str(tmp_path / "tokenizer.json"))
  with pytest.raises(ImportError, match="pip install sentencepiece"):
    data.get_tokenizer(str(tmp_path / "sp.model"))


def test_hf_tokenizer_round_trip(tmp_path):
  tokenizers = pytest.importorskip("tokenizers", reason="HF tokenizer path needs `tokenizers`")
  tok = tokenizers.Tokenizer(tokenizers.models.BPE(unk_token="<unk>"))
  tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = tokenizers.decoders.ByteLevel()
  trainer = tokenizers.trainers.BpeTrainer(
      vocab_size=300, special_tokens=["<pad>", "<s>", "</s>", "<unk>"],
      initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator(data.prose_sentences()[:300], trainer)
  tok.save(str(tmp_path / "tokenizer.json"))
  for spec in (str(tmp_path / "tokenizer.json"), str(tmp_path)):
    hf = data.get_tokenizer(spec)
    assert isinstance(hf, data.HFTokenizer)
    assert (hf.pad_id, hf.bos_id, hf.eos_id) == (0, 1, 2)
    text = "The class suite is executed in a new frame."
    ids = hf.encode(text)
    assert ids and hf.decode(ids) == text and max(ids) < hf.vocab_size
    assert hf.decode([hf.bos_id, *ids, hf.eos_id]) == text


def test_sentencepiece_round_trip(tmp_path):
  spm = pytest.importorskip("sentencepiece", reason="SentencePiece path needs `sentencepiece`")
  corpus = tmp_path / "corpus.txt"
  corpus.write_text("\n".join(data.prose_sentences()[:400]))
  spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(tmp_path / "sp"),
                                 vocab_size=200, model_type="bpe", pad_id=3)
  sp = data.get_tokenizer(str(tmp_path / "sp.model"))
  assert isinstance(sp, data.SentencePieceTokenizer)
  assert (sp.bos_id, sp.eos_id, sp.pad_id, sp.vocab_size) == (1, 2, 3, 200)
  text = "The class suite is executed in a new frame."
  assert sp.decode(sp.encode(text)) == text


# ----------------------------------------------------------------------------- sources


def test_embedded_source_is_python_docs():
  src = data.EmbeddedSource()
  from pydoc_data import topics
  assert len(src) == len(topics.topics) > 10
  assert [src[i] for i in range(len(src))] == [topics.topics[k] for k in sorted(topics.topics)]
  assert sum(len(src[i]) for i in range(len(src))) > 100_000
  assert len(data.prose_sentences()) > 500


def test_text_and_jsonl_sources(tmp_path, text_corpus):
  src = data.make_source("text", text_corpus)
  assert [src[i] for i in range(len(src))] == DOCS
  for i, part in enumerate((DOCS[:4], DOCS[4:])):
    lines = [json.dumps({"body": d, "id": j}) for j, d in enumerate(part)]
    (tmp_path / f"part{i}.jsonl").write_text("\n".join(lines) + "\n\n")
  src = data.make_source("jsonl", str(tmp_path / "*.jsonl"), text_field="body")
  assert len(src) == len(DOCS) and [src[i] for i in range(len(src))] == DOCS
  with pytest.raises(ValueError, match="no field 'text'"):
    data.make_source("jsonl", str(tmp_path / "*.jsonl"))[0]
  with pytest.raises(ValueError, match=r"path glob '.*nothing\*.jsonl' matches no file"):
    data.make_source("jsonl", str(tmp_path / "nothing*.jsonl"))


def test_arrayrecord_source(tmp_path):
  from array_record.python.array_record_module import ArrayRecordWriter
  writer = ArrayRecordWriter(str(tmp_path / "docs.array_record"), "group_size:1")
  for doc in DOCS:
    writer.write(doc.encode("utf-8"))
  writer.close()
  src = data.make_source("arrayrecord", str(tmp_path / "*.array_record"))
  assert [src[i] for i in range(len(src))] == DOCS


def test_parquet_source(tmp_path):
  pa = pytest.importorskip("pyarrow", reason="Parquet source needs `pyarrow`")
  import pyarrow.parquet as pq
  pq.write_table(pa.table({"text": DOCS[:3]}), str(tmp_path / "a.parquet"))
  pq.write_table(pa.table({"text": DOCS[3:]}), str(tmp_path / "b.parquet"), row_group_size=2)
  src = data.make_source("parquet", str(tmp_path / "*.parquet"))
  assert [src[i] for i in range(len(src))] == DOCS
  with pytest.raises(ValueError, match="no column 'body'"):
    data.make_source("parquet", str(tmp_path / "*.parquet"), text_field="body")


# ----------------------------------------------------------------------------- packing


def check_batch_invariants(batch, seq_len, bos_id, queries=False):
  """queries: MQAR batches, whose query targets (loss mask 1) are values, not next tokens."""
  seg, pos, inp, tgt, mask = (batch[k] for k in
                              ("segment_ids", "positions", "inputs", "targets", "loss_mask"))
  assert all(batch[k].dtype == np.int32 for k in ("inputs", "targets", "segment_ids", "positions"))
  assert mask.dtype == np.float32 and seg.shape[1] == seq_len
  for b in range(seg.shape[0]):
    used = int((seg[b] > 0).sum())
    assert (seg[b, used:] == 0).all(), "padding only at the end of a row"
    ids = seg[b, :used]
    assert used == 0 or (ids[0] == 1 and (np.diff(ids) >= 0).all() and (np.diff(ids) <= 1).all())
    starts = np.concatenate([[True], ids[1:] != ids[:-1]]) if used else np.zeros(0, bool)
    for t in range(used):
      assert pos[b, t] == (0 if starts[t] else pos[b, t - 1] + 1)
      if t + 1 < used and seg[b, t + 1] == seg[b, t] and not (queries and mask[b, t]):
        assert tgt[b, t] == inp[b, t + 1], "targets are the next inputs inside a document"
    assert (mask[b, used:] == 0).all()
  # positions are what the model would derive from the segment ids
  from lte_jax.segments import positions_from_segment_ids
  np.testing.assert_array_equal(np.asarray(positions_from_segment_ids(seg)) * (seg > 0), pos)


def chunks_of(batches):
  """Every (segment) chunk of every row, in stream order: (inputs, targets, mask)."""
  for batch in batches:
    for b in range(batch["inputs"].shape[0]):
      seg = batch["segment_ids"][b]
      for s in range(1, int(seg.max()) + 1 if seg.any() else 1):
        sel = seg == s
        yield batch["inputs"][b, sel], batch["targets"][b, sel], batch["loss_mask"][b, sel]


def test_packing_one_epoch_loses_and_duplicates_nothing(text_corpus):
  cfg = DataConfig(source="text", path=text_corpus, seq_len=16, batch_size=3, num_epochs=1,
                   seed=5)
  batches = list(make_train_iterator(cfg))
  for batch in batches:
    check_batch_invariants(batch, 16, BYTE.bos_id)
    assert batch["inputs"].shape == (3, 16)
  docs, carry = [], None  # carry: last target of a chunk whose document goes on
  for inputs, targets, mask in chunks_of(batches):
    assert (mask == 1).all()  # text documents: every pair is a real next-token pair
    assert (inputs[1:] != BYTE.bos_id).all()
    if carry is None:
      assert inputs[0] == BYTE.bos_id
      docs.append([])
    else:  # a continuation: no BOS, starting where the previous row stopped
      assert inputs[0] == carry
    docs[-1].extend(int(x) for x in inputs)
    carry = None if targets[-1] == BYTE.eos_id else int(targets[-1])
    if carry is None:
      docs[-1].append(BYTE.eos_id)
  assert carry is None
  expected = sorted([BYTE.bos_id, *BYTE.encode(d), BYTE.eos_id] for d in DOCS)
  assert sorted(docs) == expected
  # the epoch is shuffled: documents do not come in file order
  assert [d for d in docs] != [[BYTE.bos_id, *BYTE.encode(d), BYTE.eos_id] for d in DOCS]


def test_packing_splits_long_documents_without_bos():
  cfg = DataConfig(seq_len=32, batch_size=4)
  batch = next(make_train_iterator(cfg))
  check_batch_invariants(batch, 32, BYTE.bos_id)
  # the embedded documents are longer than a row: later rows continue without BOS
  assert batch["inputs"][0, 0] == BYTE.bos_id and (batch["inputs"][1:, 0] != BYTE.bos_id).all()
  assert (batch["segment_ids"] == 1).all() and (batch["loss_mask"] == 1).all()
  np.testing.assert_array_equal(batch["targets"][:-1, -1], batch["inputs"][1:, 0])


# ----------------------------------------------------------------------------- determinism, resume


def test_same_seed_same_batches_other_seed_differs():
  cfg = DataConfig(seq_len=64, batch_size=2, mixture={"corpus": 3, "mqar": 1},
                   mqar_seq_len=32, mqar_num_pairs=4)
  first = take(make_train_iterator(cfg), 6)
  assert batches_equal(first, take(make_train_iterator(cfg), 6))
  other = take(make_train_iterator(dataclasses.replace(cfg, seed=1)), 6)
  assert not batches_equal(first, other)


def test_checkpoint_resumes_at_next_unseen_batch():
  cfg = DataConfig(seq_len=512, batch_size=2, seed=3,
                   mixture={"corpus": 2, "mqar": 1, "niah": 1})
  it = make_train_iterator(cfg)
  take(it, 5)
  state = json.loads(json.dumps(it.get_state()))  # what an orbax JSON checkpoint stores
  expected = take(it, 3)
  fresh = make_train_iterator(cfg)
  fresh.set_state(state)
  assert batches_equal(take(fresh, 3), expected)


def test_orbax_checkpoint_of_the_iterator(tmp_path):
  ocp = pytest.importorskip("orbax.checkpoint")
  cfg = DataConfig(seq_len=48, batch_size=2, mixture={"corpus": 1, "mqar": 1},
                   mqar_seq_len=32, mqar_num_pairs=4)
  it = make_train_iterator(cfg)
  take(it, 4)
  with ocp.CheckpointManager(tmp_path / "ckpt") as mngr:
    mngr.save(4, args=ocp.args.Composite(data=data.iterator_checkpoint_args(it)))
    mngr.wait_until_finished()
  expected = take(it, 2)
  fresh = make_train_iterator(cfg)
  with ocp.CheckpointManager(tmp_path / "ckpt") as mngr:
    mngr.restore(4, args=ocp.args.Composite(
        data=data.iterator_checkpoint_args(fresh, restore=True)))
  assert batches_equal(take(fresh, 2), expected)


def test_processes_get_disjoint_slices_of_the_global_batch():
  cfg = DataConfig(seq_len=32, batch_size=4, mixture={"corpus": 1, "mqar": 1},
                   mqar_seq_len=16, mqar_num_pairs=2)
  full = data.make_document_dataset(cfg)
  parts = [data.make_document_dataset(cfg, process_index=p, process_count=2) for p in (0, 1)]
  for i in range(20):
    np.testing.assert_array_equal(parts[i % 2][i // 2]["inputs"], full[i]["inputs"])
  batch = next(make_train_iterator(cfg, process_index=1, process_count=2))
  assert batch["inputs"].shape == (2, 32)
  with pytest.raises(ValueError, match="DataConfig.batch_size"):
    make_train_iterator(cfg, process_count=3)
  with pytest.raises(ValueError, match="process_index"):
    make_train_iterator(cfg, process_index=2, process_count=2)


# ----------------------------------------------------------------------------- mixtures


def test_mixture_weights_are_respected():
  cfg = DataConfig(seq_len=512, mixture={"corpus": 0.5, "mqar": 0.3, "niah": 0.2})
  docs = data.make_document_dataset(cfg)
  kinds = collections.Counter(int(docs[i]["kind"]) for i in range(500))
  for name, w in cfg.weights.items():
    assert abs(kinds[data.KIND_IDS[name]] / 500 - w) < 0.03, (name, kinds)


def test_mqar_documents_in_batches_train_only_on_queries():
  cfg = DataConfig(seq_len=80, batch_size=3, mixture={"mqar": 1.0}, mqar_seq_len=32,
                   mqar_num_pairs=4, mqar_vocab_size=64, mqar_vocab_offset=100,
                   model_vocab_size=512)
  for batch in take(make_train_iterator(cfg), 2):
    check_batch_invariants(batch, 80, BYTE.bos_id, queries=True)
    for inputs, targets, mask in chunks_of([batch]):
      assert len(inputs) == 33 and inputs[0] == BYTE.bos_id  # whole examples, never split
      assert mask.sum() == 4 and mask[0] == 0
      q = mask == 1
      assert ((inputs[q] >= 101) & (inputs[q] < 132)).all()  # keys
      assert ((targets[q] >= 132) & (targets[q] < 164)).all()  # values
      ctx = inputs[1:9]
      pairs = dict(zip(ctx[0::2].tolist(), ctx[1::2].tolist()))
      assert [pairs[k] for k in inputs[q].tolist()] == targets[q].tolist()


def test_niah_documents_fit_one_row():
  cfg = DataConfig(seq_len=600, batch_size=2, mixture={"niah": 1.0})
  for batch in take(make_train_iterator(cfg), 3):
    check_batch_invariants(batch, 600, BYTE.bos_id)
    for inputs, targets, _ in chunks_of([batch]):
      text = BYTE.decode(np.concatenate([inputs, targets[-1:]]))
      assert inputs[0] == BYTE.bos_id and targets[-1] == BYTE.eos_id
      key = re.search(r"special magic \w+ for (\S+) mentioned", text).group(1)
      value = re.search(rf"for {key} is: (\S+)\.", text).group(1)
      assert text.endswith(f"mentioned in the provided text is {value}")


def test_niah_answer_loss_trains_on_the_answer_tokens_only():
  cfg = DataConfig(seq_len=600, batch_size=2, mixture={"niah": 1.0}, niah_loss="answer")
  for batch in take(make_train_iterator(cfg), 3):
    check_batch_invariants(batch, 600, BYTE.bos_id)
    for inputs, targets, mask in chunks_of([batch]):
      text = BYTE.decode(np.concatenate([inputs, targets[-1:]]))
      key = re.search(r"special magic \w+ for (\S+) mentioned", text).group(1)
      value = re.search(rf"for {key} is: (\S+)\.", text).group(1)
      on = np.flatnonzero(mask)
      assert BYTE.decode(targets[on]) == value          # exactly the answer, nothing else
      assert np.array_equal(on, np.arange(on[0], on[0] + len(value)))
      assert BYTE.decode(inputs[:on[0] + 1]).endswith("provided text is ")


# ----------------------------------------------------------------------------- retrieval


@pytest.mark.parametrize("vocab,length,pairs,alpha", [(8192, 64, 4, 0.01), (40, 30, 7, 1.0)])
def test_mqar_structure(vocab, length, pairs, alpha):
  rng = np.random.default_rng(0)
  ex = data.mqar_batch(rng, 16, vocab_size=vocab, seq_len=length, num_pairs=pairs, alpha=alpha,
                       offset=10)
  half = vocab // 2
  assert ex.inputs.shape == ex.labels.shape == ex.label_mask.shape == (16, length)
  assert ex.inputs.dtype == np.int32 and ex.label_mask.dtype == bool
  for x, y, m in zip(ex.inputs, ex.labels, ex.label_mask):
    keys, values = x[0:2 * pairs:2] - 10, x[1:2 * pairs:2] - 10
    assert ((keys >= 1) & (keys < half)).all() and len(set(keys)) == pairs
    assert ((values >= half) & (values < vocab)).all() and len(set(values)) == pairs
    assert m.sum() == pairs and not m[:2 * pairs].any()
    where = np.flatnonzero(m)
    assert ((where - 2 * pairs) % 2 == 0).all()
    assert sorted(x[where]) == sorted(x[0:2 * pairs:2])  # every key queried once
    pair = dict(zip(x[0:2 * pairs:2].tolist(), x[1:2 * pairs:2].tolist()))
    assert [pair[k] for k in x[where].tolist()] == y[where].tolist()
    query = np.ones(length, bool)
    query[:2 * pairs] = False
    query[where] = False
    assert (x[query] == 10).all() and (y[~m] == 10).all()  # filler -> offset


def test_mqar_alpha_front_loads_queries():
  kw = dict(vocab_size=512, seq_len=256, num_pairs=8)
  early = data.mqar_batch(np.random.default_rng(1), 64, alpha=0.01, **kw).label_mask
  flat = data.mqar_batch(np.random.default_rng(1), 64, alpha=1.0, **kw).label_mask
  t = np.arange(256)
  assert (early * t).sum() / early.sum() < 0.8 * (flat * t).sum() / flat.sum()


@pytest.mark.parametrize("kw,match", [
    (dict(seq_len=64, num_pairs=17), "num_pairs.*4N <= L"),
    (dict(seq_len=63, num_pairs=4), "seq_len must be even"),
    (dict(seq_len=64, num_pairs=4, vocab_size=8), "num_pairs.*distinct keys"),
    (dict(seq_len=64, num_pairs=4, alpha=0.0), "alpha"),
])
def test_mqar_bad_arguments(kw, match):
  kw = {"vocab_size": 8192, **kw}
  with pytest.raises(ValueError, match=match):
    data.mqar_batch(np.random.default_rng(0), 1, **kw)


@pytest.mark.parametrize("task", list(data.NIAH_TASKS))
def test_niah_needle_question_and_answer(task):
  ex = data.make_niah(np.random.default_rng(7), BYTE, 2048, task=task)
  haystack, kind = data.NIAH_TASKS[task]
  assert len(BYTE.encode(ex.prompt)) + 128 <= 2048
  assert len(BYTE.encode(ex.prompt)) + 128 > 2048 - 250  # filled to (nearly) the limit
  assert re.fullmatch(r"[a-z]+-[a-z]+", ex.key)
  assert data.needle_sentence(ex.key, ex.answer, kind) in ex.prompt
  assert ex.prompt.startswith(f"A special magic {kind} is hidden within the following text.")
  assert ex.prompt.endswith(f"What is the special magic {kind} for {ex.key} mentioned in the "
                            f"provided text? The special magic {kind} for {ex.key} mentioned "
                            "in the provided text is")
  found = re.search(rf"special magic {kind}s for {ex.key} is: (\S+)\.", ex.prompt).group(1)
  assert found == ex.answer and ex.document == f"{ex.prompt} {ex.answer}"
  if kind == "number":
    assert re.fullmatch(r"[1-9]\d{6}", ex.answer)
  else:
    assert re.fullmatch(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}",
                        ex.answer)
  if haystack == "noise":
    assert ex.prompt.count(data.retrieval.NOISE_LINE) > 10
  else:
    assert data.retrieval.NOISE_LINE not in ex.prompt and ex.depth in data.retrieval.ESSAY_DEPTHS
  again = data.make_niah(np.random.default_rng(7), BYTE, 2048, task=task)
  assert again == ex
  with pytest.raises(ValueError, match="max_tokens=300 is too small"):
    data.make_niah(np.random.default_rng(7), BYTE, 300, task=task)


def test_haystack_search_finds_the_largest_fit():
  rng = np.random.default_rng(0)
  for _ in range(300):
    n = int(rng.integers(1, 200))
    steps = rng.integers(1, rng.integers(2, 200), size=n + 1)
    steps[0] = rng.integers(0, 300)
    counts = np.cumsum(steps)  # tokens of a prompt with k haystack units
    budget = int(rng.integers(0, counts[-1] + 20))
    want = int(np.searchsorted(counts, budget, side="right")) - 1
    assert data.retrieval._largest_fitting(lambda k: int(counts[k]), budget, n) == want


# ----------------------------------------------------------------------------- config errors


@pytest.mark.parametrize("kw,field", [
    (dict(source="csv"), "DataConfig.source"),
    (dict(source="jsonl"), "DataConfig.path"),
    (dict(seq_len=0), "DataConfig.seq_len"),
    (dict(batch_size=2.0), "DataConfig.batch_size"),
    (dict(seed=-1), "DataConfig.seed"),
    (dict(num_epochs=0), "DataConfig.num_epochs"),
    (dict(mixture={"books": 1.0}), "DataConfig.mixture"),
    (dict(mixture={"corpus": -1.0}), "DataConfig.mixture"),
    (dict(mixture={"corpus": 0.0}), "DataConfig.mixture"),
    (dict(mixture={"mqar": 1.0}, mqar_num_pairs=40), "DataConfig.mqar_num_pairs"),
    (dict(mixture={"mqar": 1.0}, mqar_seq_len=256), "DataConfig.mqar_seq_len"),
    (dict(mixture={"niah": 1.0}, niah_tasks=("niah_multikey",)), "DataConfig.niah_tasks"),
    (dict(mixture={"niah": 1.0}, niah_loss="prompt"), "DataConfig.niah_loss"),
    (dict(worker_count=-1), "DataConfig.worker_count"),
])
def test_bad_config_names_the_field(kw, field):
  with pytest.raises(ValueError, match=field):
    DataConfig(**kw)


@pytest.mark.parametrize("kw,field", [
    (dict(mixture={"niah": 1.0}, seq_len=128), "DataConfig.seq_len"),
    (dict(mixture={"mqar": 1.0}, mqar_vocab_size=512), "DataConfig.mqar_vocab_size"),
    (dict(model_vocab_size=100), "DataConfig.model_vocab_size"),
    (dict(source="text", path="/no/such/dir/*.txt"), "matches no file"),
    (dict(tokenizer="gpt2"), "tokenizer must be one of"),
])
def test_bad_config_found_when_building(kw, field):
  with pytest.raises(ValueError, match=field):
    make_train_iterator(DataConfig(**kw))
