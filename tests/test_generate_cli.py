"""experiments/generate.py: text from a workdir or a Hugging Face directory, streamed token by
token with the same ids as lte_jax.generate.generate, and flag errors that name the flag."""
from __future__ import annotations

import io

import jax
import numpy as np
import pytest
from absl import flags
from absl.testing import flagsaver
from flax import nnx

from experiments import generate as gen
from lte_jax.data.tokenizers import ByteTokenizer
from lte_jax.generate import generate
from lte_jax.sampling import GREEDY
from tests import helpers

PROMPT = "The cat sat on the"
NEW = 12


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
  """(Hugging Face directory, workdir converted from it): tests.helpers'
  attention_hf_and_workdir."""
  return helpers.attention_hf_and_workdir(tmp_path_factory.mktemp("gen"))


@pytest.fixture(scope="module")
def loaded(dirs):
  model, tokenizer = gen.load_model(workdir=dirs[1])
  ids = gen.encode_prompt(tokenizer, PROMPT, model, NEW)
  return model, tokenizer, ids


@pytest.fixture(scope="module")
def streamed(loaded):
  model, tokenizer, ids = loaded
  return list(gen.stream_ids(model, ids, max_new_tokens=NEW, sampling=GREEDY,
                             rng=jax.random.key(0), end_ids=[tokenizer.eos_id]))


def test_streamed_ids_equal_generate_under_greedy(loaded, streamed):
  model, tokenizer, ids = loaded
  assert isinstance(tokenizer, ByteTokenizer) and ids == [1] + [b + 3 for b in PROMPT.encode()]
  out = generate(model, [ids], max_new_tokens=NEW, eos_ids=[tokenizer.eos_id])
  assert streamed == out.rows()[0] and 1 <= len(streamed) <= NEW
  # A stop id ends the stream after yielding it, as generate keeps its stop token.
  cut = list(gen.stream_ids(model, ids, max_new_tokens=NEW, sampling=GREEDY,
                            rng=jax.random.key(0), end_ids=[streamed[2]]))
  assert cut == streamed[:streamed.index(streamed[2]) + 1]


def run_main(*argv):
  """main as the command line runs it, flags parsed from ``argv`` (in this process: the
  jitted steps compiled for the model are reused)."""
  was_parsed = flags.FLAGS.is_parsed()
  with flagsaver.flagsaver():
    try:
      flags.FLAGS(["generate", *argv])
      gen.main(["generate"])
    finally:
      flags.FLAGS.unparse_flags()
      if was_parsed:
        flags.FLAGS.mark_as_parsed()


@pytest.mark.parametrize("stream", ["--stream", "--nostream"])
def test_cli_prints_the_generated_text(dirs, streamed, capsys, stream):
  run_main(f"--workdir={dirs[1]}", f"--prompt={PROMPT}", f"--max_new_tokens={NEW}",
           "--temperature=0", stream)
  assert capsys.readouterr().out == ByteTokenizer().decode(streamed) + "\n"


def test_hf_dir_loads_the_same_parameters_and_needs_a_tokenizer(dirs, loaded):
  hf_dir, _ = dirs
  model, tokenizer = gen.load_model(hf_dir=hf_dir, tokenizer="byte")
  assert isinstance(tokenizer, ByteTokenizer)
  a = jax.tree.leaves(nnx.state(model, nnx.Param))
  b = jax.tree.leaves(nnx.state(loaded[0], nnx.Param))
  assert len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b))
  with pytest.raises(ValueError, match=r"--hf_dir=.* holds no tokenizer.json or "
                                       r"tokenizer.model; name one with --tokenizer"):
    gen.load_model(hf_dir=hf_dir)


GOOD = dict(workdir="/w", checkpoint=None, hf_dir=None, prompt="hi", prompt_file=None,
            max_new_tokens=4, temperature=0.7, top_p=0.9, top_k=0)


@pytest.mark.parametrize("change, message", [
    (dict(prompt=None), r"--prompt \(text\) or --prompt_file \(a UTF-8 file\) is required"),
    (dict(prompt_file="/p"), r"give --prompt or --prompt_file, not both"),
    (dict(prompt=""), r"--prompt is empty"),
    (dict(prompt=None, prompt_file="/no/such/file"), r"--prompt_file=/no/such/file cannot be read"),
    (dict(temperature=-0.1), r"--temperature must be >= 0 \(0: greedy\), got -0.1"),
    (dict(top_p=0.0), r"--top_p must be in \(0, 1\] \(1: no cut\), got 0.0"),
    (dict(top_p=1.5), r"--top_p must be in \(0, 1\]"),
    (dict(top_k=-1), r"--top_k must be >= 0"),
    (dict(max_new_tokens=0), r"--max_new_tokens must be an integer >= 1, got 0"),
    (dict(workdir=None), r"one of --workdir, --checkpoint or --hf_dir is required"),
    (dict(hf_dir="/h"), r"give --hf_dir alone"),
    (dict(stop=["\n", ""]), r"--stop must be non-empty strings"),
])
def test_bad_flags_name_the_flag(change, message):
  with pytest.raises(ValueError, match=message):
    gen.check_flags(**{**GOOD, **change})


def test_good_flags_and_prompt_file(tmp_path):
  path = tmp_path / "p.txt"
  path.write_text("über\n", encoding="utf-8")
  text, sampling = gen.check_flags(**{**GOOD, "prompt": None, "prompt_file": str(path)})
  assert text == "über\n" and (sampling.temperature, sampling.top_p) == (0.7, 0.9)
  assert gen.unescape(r"a\nb\tc\\n") == "a\nb\tc\\n"


def test_prompt_longer_than_the_model_takes(loaded):
  model, tokenizer, _ = loaded   # max_position 256
  assert len(gen.encode_prompt(tokenizer, "x" * 200, model, 55)) == 201
  with pytest.raises(ValueError, match=r"--prompt is 201 tokens and --max_new_tokens=56: 257 "
                                       r"positions, more than the model takes \(max_position=256\)"):
    gen.encode_prompt(tokenizer, "x" * 200, model, 56)


def test_a_tokenizer_with_more_ids_than_the_model_is_refused(loaded):
  class Wide(ByteTokenizer):
    def encode(self, text):
      return [400]

  with pytest.raises(ValueError, match=r"the tokenizer gives id 400 but the model has only 300 "
                                       r"tokens; give --tokenizer the model's tokenizer"):
    gen.encode_prompt(Wide(), "hi", loaded[0], 4)


def test_main_exits_with_the_flag_error_before_loading():
  with pytest.raises(SystemExit, match=r"generate: --top_p must be in \(0, 1\]"):
    run_main("--workdir=/no/such/workdir", "--prompt=hi", "--top_p=2")


class Chars:
  """Ids are UTF-8 bytes: a partial character decodes to U+FFFD."""
  eos_id = 0

  def decode(self, ids):
    return ByteTokenizer().decode([i + 3 for i in ids])


def test_text_stream_holds_back_partial_characters_and_stop_strings():
  stream = gen.TextStream(Chars(), stops=["END"])
  pieces = [stream.push(b) for b in "ab".encode()]
  pieces += [stream.push(b) for b in "é".encode()]   # two bytes: nothing until both came
  assert pieces == ["a", "b", "", "é"]
  assert [stream.push(b) for b in b"xEN"] == ["x", "", ""]   # "EN" may start "END"
  assert stream.push(ord("D")) == "" and stream.stopped
  assert stream.finish() == ""
  stream = gen.TextStream(Chars(), stops=["END"])
  assert [stream.push(b) for b in b"xEN"] == ["x", "", ""] and stream.finish() == "EN"


def test_run_streams_pieces_and_cuts_at_a_stop_string(loaded, streamed):
  model, tokenizer, ids = loaded
  text = tokenizer.decode(streamed)
  stop = chr([i for i in streamed if 35 <= i < 130][-1] - 3)   # the last ASCII character
  writes = []
  out = io.StringIO()
  out.write = writes.append
  got = gen.run(model, tokenizer, ids, max_new_tokens=NEW, sampling=GREEDY, seed=0,
                stops=[stop], out=out)
  assert got == text[:text.index(stop)] and "".join(writes) == got + "\n"
  assert len([w for w in writes if w.strip()]) >= 2   # printed as it came, not at the end
