"""Retrieval evaluations: task generators against EVALS.md, scorers, memory, reports."""
from __future__ import annotations

import json
import re
import uuid

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lte_jax import configs
from lte_jax.data import retrieval
from lte_jax.data.tokenizers import ByteTokenizer
from lte_jax.evals import evaporate, report, tasks
from lte_jax.evals.memory import cache_bytes_per_sequence
from lte_jax.evals.metrics import contains_any, mqar_accuracy, substring_match
from lte_jax.models import HybridLM

BYTE = ByteTokenizer()
KIND = {"niah_single_1": "number", "niah_single_2": "number", "niah_single_3": "uuid"}


def split_prompt(prompt: str, kind: str):
  """(context, key) of a prompt written with EVALS.md's template, else AssertionError."""
  head = (f"A special magic {kind} is hidden within the following text. Make sure to memorize "
          f"it. I will quiz you about the {kind} afterwards.\n")
  m = re.fullmatch(re.escape(head) + r"(?P<context>.*)\nWhat is the special magic "
                   + kind + r" for (?P<key>\S+) mentioned in the provided text\? The special "
                   r"magic " + kind + r" for (?P=key) mentioned in the provided text is",
                   prompt, flags=re.S)
  assert m, prompt[:200]
  return m.group("context"), m.group("key")


@pytest.mark.parametrize("task", list(retrieval.NIAH_TASKS))
def test_niah_template_needle_and_value_format(task):
  kind = KIND[task]
  for seed in range(4):
    ex = retrieval.make_niah(np.random.default_rng(seed), BYTE, 1024, task=task)
    context, key = split_prompt(ex.prompt, kind)
    assert key == ex.key and re.fullmatch(r"[a-z]+-[a-z]+", key)
    # RULER's needle names the plural type ("numbers", "uuids"); the question the singular.
    needle = f"One of the special magic {kind}s for {key} is: {ex.answer}."
    assert context.count(needle) == 1 and context.count("special magic") == 1
    if kind == "number":
      assert re.fullmatch(r"\d{7}", ex.answer) and 1_000_000 <= int(ex.answer) <= 9_999_999
    else:
      assert str(uuid.UUID(ex.answer)) == ex.answer and uuid.UUID(ex.answer).version == 4


def test_niah_noise_haystack_puts_the_needle_on_its_own_line_before_the_last():
  depths = []
  for seed in range(30):
    ex = retrieval.make_niah(np.random.default_rng(seed), BYTE, 2048, task="niah_single_1")
    lines = split_prompt(ex.prompt, "number")[0].split("\n")
    needle_at = [i for i, line in enumerate(lines) if line != retrieval.NOISE_LINE]
    assert len(needle_at) == 1 and lines[needle_at[0]].startswith("One of the special magic")
    n = len(lines) - 1
    assert n >= 10 and needle_at[0] < n   # RULER: index drawn from range(n)
    assert ex.depth == pytest.approx(100 * needle_at[0] / n)
    depths.append(ex.depth)
  assert min(depths) < 20 and max(depths) > 80   # spread over the haystack


@pytest.mark.parametrize("task", ["niah_single_2", "niah_single_3"])
def test_niah_essay_needle_sits_at_a_sentence_boundary_at_one_of_40_depths(task):
  assert retrieval.ESSAY_DEPTHS.tolist() == [round(100 * i / 39 + 1e-9) for i in range(40)]
  seen = set()
  for seed in range(12):
    ex = retrieval.make_niah(np.random.default_rng(seed), BYTE, 3000, task=task)
    context, key = split_prompt(ex.prompt, KIND[task])
    needle = f"One of the special magic {KIND[task]}s for {key} is: {ex.answer}."
    before, after = context.split(needle)
    assert ex.depth in retrieval.ESSAY_DEPTHS
    # A boundary: after a full sentence, or at either end (the first n words may end
    # mid-sentence, which is then the last sentence, as RULER's sentence splitter sees it).
    assert before == "" or after == "" or (before.endswith(" ") and before.rstrip()[-1] in ".!?")
    assert after == "" or after.startswith(" ")
    sents = lambda text: [s for s in re.split(r"(?<=[.!?])\s+(?=[A-Z])", text.strip()) if s]
    total = len(sents(before)) + len(sents(after))
    assert len(sents(before)) == int(total * ex.depth / 100)
    assert retrieval.NOISE_LINE not in context
    seen.add(ex.depth)
  assert len(seen) >= 6


@pytest.mark.parametrize("task,max_unit", [("niah_single_1", len(retrieval.NOISE_LINE) + 1),
                                           ("niah_single_2", None), ("niah_single_3", None)])
@pytest.mark.parametrize("max_tokens", [700, 1500])
def test_niah_fills_the_largest_haystack_that_fits(task, max_unit, max_tokens):
  # One more haystack unit (a noise line, or an essay word and its space) must not fit.
  if max_unit is None:
    max_unit = max(len(w.encode()) for w in retrieval._essay_words()) + 1
  for seed in range(3):
    ex = retrieval.make_niah(np.random.default_rng(seed), BYTE, max_tokens, task=task,
                             reserve_tokens=128)
    used = len(BYTE.encode(ex.prompt)) + 128
    assert max_tokens - max_unit < used <= max_tokens


def test_mqar_ranges_labels_and_power_law_query_slots():
  v, length, offset = 64, 40, 5
  slots = (length - 2) // 2
  for alpha in (0.01, 1.0):
    ex = retrieval.mqar_batch(np.random.default_rng(0), 6000, vocab_size=v, seq_len=length,
                              num_pairs=1, alpha=alpha, offset=offset)
    raw = ex.inputs - offset
    assert ((raw[:, 0] >= 1) & (raw[:, 0] < v // 2)).all()
    assert ((raw[:, 1] >= v // 2) & (raw[:, 1] < v)).all()
    where = np.argmax(ex.label_mask, axis=1)
    assert (ex.label_mask.sum(1) == 1).all() and ((where - 2) % 2 == 0).all()
    assert (ex.inputs[np.arange(6000), where] == ex.inputs[:, 0]).all()   # the key again
    assert (ex.labels[np.arange(6000), where] == ex.inputs[:, 1]).all()   # labelled by its value
    freq = np.bincount((where - 2) // 2, minlength=slots) / 6000
    p = (np.arange(slots) + 1.0) ** (alpha - 1)
    np.testing.assert_allclose(freq, p / p.sum(), atol=0.02)


class MQAROracle(nnx.Module):
  """Predicts, at each position, the token that followed the same token's first occurrence."""

  def __init__(self, vocab_size: int, shift: int = 0):
    self.vocab_size, self.shift = vocab_size, shift

  def __call__(self, tokens):
    t = tokens.shape[1]
    same = (tokens[:, :, None] == tokens[:, None, :]) & (jnp.arange(t)[None, :] < jnp.arange(t)[:, None])
    first = jnp.argmax(same, axis=-1)
    nxt = jnp.take_along_axis(tokens, jnp.minimum(first + 1, t - 1), axis=1)
    nxt = jnp.roll(nxt, self.shift, axis=1)
    return jax_one_hot(nxt, self.vocab_size), {}


def jax_one_hot(x, n):
  return (x[..., None] == jnp.arange(n)).astype(jnp.float32)


def test_run_mqar_scores_the_logit_at_each_query():
  kw = dict(length=129, vocab_size=64, offset=3, bos_id=1, num_samples=5, seed=0, batch_size=2)
  perfect = tasks.run_mqar(MQAROracle(67), **kw)
  assert perfect["score"] == 100.0 and perfect["seq_len"] == 128
  assert perfect["num_pairs"] == 8     # L / 16
  off_by_one = tasks.run_mqar(MQAROracle(67, shift=1), **kw)
  assert off_by_one["score"] < 20.0


def test_scorers_on_hand_made_predictions():
  assert substring_match(" 1234567 is the number", "1234567") == 1.0
  assert substring_match("the uuid is ABCDEF12-aaaa", "abcdef12-AAAA") == 1.0
  assert substring_match("123456", "1234567") == 0.0
  assert contains_any("Paris, France", ["paris", "Lyon"]) == 1.0
  assert contains_any("London", ("paris", "lyon")) == 0.0
  assert contains_any("anything", ["", "x"]) == 0.0   # an empty alias never matches
  assert contains_any("New York City", "new york") == 1.0
  preds = np.array([[5, 7, 9], [1, 2, 3]])
  labels = np.array([[5, 0, 8], [1, 2, 0]])
  mask = np.array([[True, False, True], [True, True, False]])
  assert mqar_accuracy(preds, labels, mask) == 0.75
  with pytest.raises(ValueError, match="label_mask must mark"):
    mqar_accuracy(preds, labels, np.zeros_like(mask))


def test_evaporate_missing_file_names_it_and_records_parse(tmp_path):
  with pytest.raises(ValueError, match=r"swde.parquet.*swde.jsonl.*--data_dir"):
    evaporate.data_file(str(tmp_path), "swde")
  with pytest.raises(ValueError, match="task must be one of"):
    evaporate.data_file(str(tmp_path), "wikitext")
  rows = [{"text": "Name: Ann. Born 1990.", "key": "Born", "value": "1990"},
          {"text": "Title: Dune Year:", "key": "Year", "value": ["1965", "MCMLXV"]}]
  (tmp_path / "swde.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
  a, b = evaporate.load_examples(str(tmp_path), "swde", 10)
  assert (a.suffix, a.answers) == (" Born:", ("1990",))
  assert (b.suffix, b.answers) == ("", ("1965", "MCMLXV"))   # text already ends with "Year:"
  squad = {"context": "The Nile is long.", "question": "Which river is long?",
           "answers": {"text": ["Nile", "the Nile"]}}
  ex = evaporate.parse_record("squad", squad, "row 0")
  assert ex.suffix == " Which river is long?" and ex.answers == ("Nile", "the Nile")
  with pytest.raises(ValueError, match="row 1: a record needs"):
    evaporate.parse_record("nq", {"context": "x", "question": "y"}, "row 1")


def test_evaporate_window_keeps_the_answer_within_context_length_minus_50():
  doc = " ".join(f"w{i}" for i in range(2000)) + " GOLD " + " ".join(f"z{i}" for i in range(9))
  ex = evaporate.QAExample(doc, " Key:", ("gold",))
  ids = evaporate.windowed_prompt(ex, BYTE, 300)
  text = BYTE.decode(ids)
  assert len(ids) == 250 and text.endswith(" Key:") and "GOLD" in text
  short = evaporate.QAExample("tiny doc", " Key:", ("x",))
  assert BYTE.decode(evaporate.windowed_prompt(short, BYTE, 300)) == "tiny doc Key:"


@pytest.mark.parametrize("arch", configs.ARCHITECTURES)
def test_cache_bytes_constant_for_bounded_mixers_and_growing_for_full_attention(arch):
  cfg = configs.get_config(arch, "tiny", num_layers=2)
  model = nnx.eval_shape(lambda: HybridLM(cfg, rngs=nnx.Rngs(0)))
  sizes = [cache_bytes_per_sequence(model, n, jnp.float32) for n in (1024, 2048, 4096)]
  if arch in ("GDN", "GDN_SWA", "laLTE"):
    assert sizes[0] == sizes[1] == sizes[2] > 0
  else:
    assert sizes[0] < sizes[1] < sizes[2]
  if arch == "GDN_Attn":  # one attention layer: k and v grow by H_kv * D f32 per token
    a = cfg.attn
    assert sizes[1] - sizes[0] == 1024 * 2 * a.num_kv_heads * a.head_dim * 4


def test_report_table_and_heatmap(tmp_path):
  results = {
      "run": {"arch": "laLTE", "step": 7}, "lengths": [512, 1024],
      "tasks": {"niah_single_1": {
          "512": {"score": 50.0, "num_samples": 2,
                  "samples": [{"depth": 0.0, "hit": 1.0}, {"depth": 95.0, "hit": 0.0}]},
          "1024": {"score": 100.0, "num_samples": 1, "samples": [{"depth": 100.0, "hit": 1.0}]}},
          "mqar": {"512": {"score": 12.5, "num_samples": 2}}},
      "memory": {"cache_bytes_per_sequence": {"512": 2**20, "1024": 2**21}}}
  grid = report.depth_grid(results["tasks"]["niah_single_1"], ["512", "1024"], 4)
  np.testing.assert_array_equal(grid[0], [100.0, np.nan, np.nan, 0.0])
  np.testing.assert_array_equal(grid[1], [np.nan, np.nan, np.nan, 100.0])
  table = report.markdown_table(results)
  assert "| niah_single_1 | 50.0 | 100.0 |" in table and "| mqar | 12.5 | - |" in table
  assert "| decode cache per sequence (MiB) | 1.000 | 2.000 |" in table
  paths = report.write_all(results, str(tmp_path))
  assert json.loads((tmp_path / "results.json").read_text()) == results
  with open(paths["heatmap"], "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"


class NextByteLM(nnx.Module):
  """A stand-in LM with the decode protocol: after byte token t it predicts t + 1."""

  def __init__(self, vocab_size: int):
    self.vocab_size = vocab_size

  def init_cache(self, batch_size, max_len, dtype=None):
    return jnp.zeros((batch_size,), jnp.int32)

  def prefill(self, tokens, cache):
    return jax_one_hot(tokens + 1, self.vocab_size), cache

  def decode(self, tokens, cache):
    return jax_one_hot(tokens + 1, self.vocab_size), cache + 1


def test_generate_texts_keeps_prompt_order_and_cuts_at_the_stop_string():
  prompts = ["xyz abc", "k", "hello\t", "0123456"]   # "\t" + 1 is "\n": a stop right away
  ids = [[BYTE.bos_id, *BYTE.encode(p)] for p in prompts]
  texts = tasks.generate_texts(NextByteLM(BYTE.vocab_size), BYTE, ids, max_new_tokens=4,
                               stop_strings=["\n"], batch_size=3, prefill_bucket=2)
  assert texts == ["defg", "lmno", "", "789:"]
