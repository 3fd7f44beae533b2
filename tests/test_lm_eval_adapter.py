"""lte_jax.lm_eval_adapter: lm-evaluation-harness runs the 'lte_jax' model type on local tasks
(tests/data/lm_eval) and its scores equal lte_jax's own log-likelihoods and greedy text.

The reference runs one sequence at a time through one jitted forward of fixed width
(right-padded), builds every sequence itself as BOS + encode(text), and generates by
argmax over that forward: nothing of the adapter's batching, bucketing or decode loop.
"""
from __future__ import annotations

import glob
import json
import os
import runpy
import socket
import sys

import jax
import numpy as np
import pytest
from flax import nnx

from lte_jax.data.tokenizers import ByteTokenizer
from lte_jax.generate import cut_at_stop
from tests import helpers
from tests.helpers import REPO

# Before lm_eval imports `datasets`: nothing is fetched, the tasks' data is a local file.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

# One worker runs the module: its fixtures load the harness and compile the programs once.
pytestmark = pytest.mark.xdist_group("lm_eval_adapter")

TASKS_DIR = os.path.join(REPO, "tests", "data", "lm_eval")
TASKS = ("lte_jax_tiny_mc", "lte_jax_tiny_gen", "lte_jax_tiny_rolling")
MAX_LENGTH, BATCH = 64, 4   # every LM here runs at these, so the programs compile once
TOK = ByteTokenizer()


@pytest.fixture(scope="module")
def harness(tmp_path_factory):
  """lm_eval, the adapter (which registers 'lte_jax') and the local tasks; sockets refused
  while the module runs, the datasets cache in a temporary folder."""
  from lm_eval.tasks import TaskManager  # pylint: disable=g-import-not-at-top
  import datasets  # pylint: disable=g-import-not-at-top
  import lm_eval  # pylint: disable=g-import-not-at-top
  from lte_jax import lm_eval_adapter  # pylint: disable=g-import-not-at-top
  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(datasets.config, "HF_DATASETS_CACHE",
                  str(tmp_path_factory.mktemp("hf_datasets")))

    def refuse(*args, **kwargs):
      raise OSError(f"network access in an offline test: {args!r}")
    patch.setattr(socket.socket, "connect", refuse)
    patch.chdir(REPO)  # the task YAMLs name their data relative to the repository root
    yield lm_eval, lm_eval_adapter, TaskManager(include_path=TASKS_DIR, include_defaults=False)


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
  """(Hugging Face directory, workdir converted from it): tests.helpers'
  attention_hf_and_workdir."""
  return helpers.attention_hf_and_workdir(tmp_path_factory.mktemp("lm_eval"))


@pytest.fixture(scope="module")
def evaluated(harness, dirs):
  """simple_evaluate of the three local tasks on the workdir, with per-sample logs."""
  lm_eval, _, tasks = harness
  return lm_eval.simple_evaluate(
      model="lte_jax", model_args=f"workdir={dirs[1]},batch_size={BATCH},max_length={MAX_LENGTH}",
      tasks=list(TASKS), task_manager=tasks, log_samples=True)


@pytest.fixture(scope="module")
def lm(harness, dirs):
  """An LteJaxLM over the workdir's model, loaded apart from the harness run."""
  _, adapter, _ = harness
  model, tokenizer = adapter.load_model(workdir=dirs[1])
  return adapter.LteJaxLM.from_model(model, tokenizer, batch_size=BATCH, max_length=MAX_LENGTH)


@pytest.fixture(scope="module")
def logprobs(lm):
  """ids (<= MAX_LENGTH) -> log p [len(ids), vocab] float64 of the tokens after each."""
  graphdef, state = nnx.split(lm.model)
  forward = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x)[0])

  def run(ids):
    x = np.zeros((1, MAX_LENGTH), np.int32)
    x[0, :len(ids)] = ids
    logits = np.asarray(forward(state, x))[0, :len(ids)].astype(np.float64)
    top = logits.max(-1, keepdims=True)
    return logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))
  return run


def ref_loglikelihood(logprobs, context: str, continuation: str) -> tuple[float, bool]:
  """BOS + context + continuation, its last MAX_LENGTH + 1 tokens: one forward."""
  cont = TOK.encode(continuation)
  seq = ([TOK.bos_id] + TOK.encode(context) + cont)[-(MAX_LENGTH + 1):]
  lp = logprobs(seq[:-1])
  rows = range(len(seq) - 1 - len(cont), len(seq) - 1)
  return (sum(lp[p, seq[p + 1]] for p in rows),
          all(int(np.argmax(lp[p])) == seq[p + 1] for p in rows))


def ref_rolling(logprobs, text: str) -> float:
  """Each token predicted once, in windows of MAX_LENGTH inputs (the first after BOS), every
  window as long as the text allows."""
  ids = TOK.encode(text)
  seq, total, done = [TOK.bos_id] + ids, 0.0, 0
  while done < len(ids):
    stop = min(done + MAX_LENGTH, len(ids))   # predict ids[done:stop]
    lo = max(0, stop - MAX_LENGTH)            # from the inputs seq[lo:stop]
    lp = logprobs(seq[lo:stop])
    total += sum(lp[j - lo, seq[j + 1]] for j in range(done, stop))
    done = stop
  return total


def ref_generate(logprobs, context: str, max_new: int, until=()) -> tuple[str, list[int]]:
  """(text cut before a stop string, the greedy ids); the context keeps its last
  MAX_LENGTH - max_new tokens (BOS included)."""
  seq = ([TOK.bos_id] + TOK.encode(context))[-(MAX_LENGTH - max_new):]
  out = []
  for _ in range(max_new):
    token = int(np.argmax(logprobs(seq)[-1]))
    out.append(token)
    if token == TOK.eos_id:
      break
    seq.append(token)
  return cut_at_stop(TOK.decode(out), until), out


def instances(kind: str, args: list[tuple]):
  from lm_eval.api.instance import Instance  # pylint: disable=g-import-not-at-top
  return [Instance(request_type=kind, doc={}, arguments=a, idx=0) for a in args]


def test_harness_scores_equal_lte_jax_log_likelihoods_and_text(evaluated, logprobs):
  samples = evaluated["samples"]
  hits = []
  for s in samples["lte_jax_tiny_mc"]:
    assert s["arguments"][0][0] == f"Q: {s['doc']['question']}\nA:"
    ref = [ref_loglikelihood(logprobs, ctx, cont) for ctx, cont in s["arguments"]]
    got = [r[0] for r in s["resps"]]
    np.testing.assert_allclose([g[0] for g in got], [r[0] for r in ref], rtol=1e-5, atol=1e-4)
    assert [g[1] for g in got] == [r[1] for r in ref]
    hits.append(int(np.argmax([r[0] for r in ref])) == s["doc"]["answer"])
  assert evaluated["results"]["lte_jax_tiny_mc"]["acc,none"] == pytest.approx(np.mean(hits))

  texts = []
  for s in samples["lte_jax_tiny_gen"]:
    (context, kwargs), = s["arguments"]
    texts.append(ref_generate(logprobs, context, kwargs["max_gen_toks"], kwargs["until"])[0])
    assert s["filtered_resps"][0] == texts[-1]
  assert any(texts)   # the comparison saw generated text, not only empty strings

  for s in samples["lte_jax_tiny_rolling"]:
    assert len(TOK.encode(s["doc"]["text"])) > MAX_LENGTH   # several windows
    assert s["resps"][0][0] == pytest.approx(ref_rolling(logprobs, s["doc"]["text"]), abs=1e-3)


def test_module_runs_lm_eval_command_line_with_model_args(harness, dirs, evaluated, tmp_path):
  """python -m lte_jax.lm_eval_adapter: lm_eval's CLI, 'lte_jax' resolved from the registry,
  model_args' batch_size over the CLI's default, its --device default left unused."""
  lm_eval, _, _ = harness
  from lm_eval import tasks as lm_tasks  # pylint: disable=g-import-not-at-top

  class LocalTasks(lm_tasks.TaskManager):
    def __init__(self, *args, **kwargs):   # the built-in index of ~15K tasks takes ~25 s
      super().__init__(*args, include_defaults=False, **kwargs)

  argv = ["lte_jax.lm_eval_adapter", "run", "--model", "lte_jax", "--model_args",
          f"workdir={dirs[1]},batch_size={BATCH},max_length={MAX_LENGTH}",
          "--tasks", "lte_jax_tiny_mc", "--include_path", TASKS_DIR, "--limit", "2",
          "--output_path", str(tmp_path), "--log_samples"]
  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(lm_tasks, "TaskManager", LocalTasks)
    patch.setattr(sys, "argv", argv)
    patch.delitem(sys.modules, "lte_jax.lm_eval_adapter")   # as a fresh `python -m` finds it
    runpy.run_module("lte_jax.lm_eval_adapter", run_name="__main__")
  results, = glob.glob(str(tmp_path / "*" / "results_*.json"))
  samples, = glob.glob(str(tmp_path / "*" / "samples_lte_jax_tiny_mc_*.jsonl"))
  with open(samples) as f:
    got = sorted(map(json.loads, f), key=lambda s: s["doc_id"])
  want = evaluated["samples"]["lte_jax_tiny_mc"][:2]
  assert [s["doc_id"] for s in got] == [s["doc_id"] for s in want] == [0, 1]
  # The file holds each (log-likelihood, is_greedy) as strings.
  flat = lambda samples: [(float(r[0][0]), str(r[0][1])) for s in samples for r in s["resps"]]
  np.testing.assert_allclose([r[0] for r in flat(got)], [r[0] for r in flat(want)], atol=1e-4)
  assert [r[1] for r in flat(got)] == [r[1] for r in flat(want)]
  with open(results) as f:
    acc = json.load(f)["results"]["lte_jax_tiny_mc"]["acc,none"]
  assert acc == pytest.approx(np.mean([s["acc"] for s in want]))


def test_loglikelihood_batches_in_order_with_bos_and_left_truncation(lm, logprobs):
  # > MAX_LENGTH tokens; no trailing space, which lm_eval moves into the continuation
  long_context = ("The quick brown fox jumps over the lazy dog. " * 3).strip()
  pairs = [("Q: What do bees make?\nA:", " honey"), ("", "Hello there"),
           ("Hi", " x"), (long_context, " again"), ("A cat", " sat on the mat, and purred.")]
  # A continuation that is the model's own argmax (a printable byte, so text holds it).
  greedy = [(c, chr(ids[0] - TOK.OFFSET)) for c in ("Hi", "A", "Q:", "The", "x", "7", "bees")
            for ids in [ref_generate(logprobs, c, 1)[1]] if 32 <= ids[0] - TOK.OFFSET < 127]
  pairs.append(greedy[0])
  got = lm.loglikelihood(instances("loglikelihood", pairs))
  want = [ref_loglikelihood(logprobs, c, x) for c, x in pairs]
  np.testing.assert_allclose([g[0] for g in got], [w[0] for w in want], rtol=1e-5, atol=1e-4)
  assert [g[1] for g in got] == [w[1] for w in want]
  assert got[-1][1] is True


def test_loglikelihood_rolling_windows(lm, logprobs):
  texts = ["", "Short text.", "A rather longer text that needs more than two windows of "
           "sixty-four tokens, and then some more, to be scored in full: three windows."]
  got = lm.loglikelihood_rolling(instances("loglikelihood_rolling", [(t,) for t in texts]))
  assert got[0] == 0.0
  np.testing.assert_allclose(got, [ref_rolling(logprobs, t) for t in texts], atol=1e-3)
  assert len(TOK.encode(texts[2])) > 2 * MAX_LENGTH


def test_generate_until_groups_settings_stops_and_truncates(lm, logprobs, evaluated):
  """The harness task's prompts (programs already compiled), shuffled, with a second group:
  3 new tokens, a stop string seen in the greedy text, a context cut from the left."""
  prompts = [s["arguments"][0][0] for s in evaluated["samples"]["lte_jax_tiny_gen"]]
  first = {"until": ["\n"], "max_gen_toks": 8, "do_sample": False}
  # A stop string the greedy text of some prompt holds: the first ASCII letter it makes.
  stop = None
  for p in prompts:
    _, ids = ref_generate(logprobs, p, 3)
    letters = [chr(t - TOK.OFFSET) for t in ids[1:] if chr(t - TOK.OFFSET).isalpha()
               and t - TOK.OFFSET < 128]
    if letters:
      stop = letters[0]
      break
  assert stop is not None
  second = {"until": [stop], "max_gen_toks": 3}
  long_prompt = "Tell me: " + "and then what happened? " * 4 + prompts[0]
  args = [(prompts[2], first), (long_prompt, second), (prompts[0], first), (p, second),
          (prompts[3], first), (prompts[1], first)]
  got = lm.generate_until(instances("generate_until", args))
  want = [ref_generate(logprobs, c, k["max_gen_toks"], k["until"])[0] for c, k in args]
  assert got == want
  uncut = ref_generate(logprobs, p, 3)[0]
  assert got[3] == uncut[:uncut.index(stop)]


def test_bucket_widths():
  from lte_jax.lm_eval_adapter import bucket_width  # pylint: disable=g-import-not-at-top
  assert [bucket_width(n, 100) for n in (1, 32, 33, 64, 65, 100)] == [32, 32, 64, 64, 100, 100]
  assert bucket_width(5, 16) == 16


def test_hf_directory_model_args_and_dtype(harness, dirs, lm):
  _, adapter, _ = harness
  hf_dir, _ = dirs
  # model_args' batch_size wins over lm_eval's; its device and max_batch_size are unused.
  hf = adapter.LteJaxLM.create_from_arg_string(
      f"hf={hf_dir},tokenizer=byte,batch_size={BATCH},max_length={MAX_LENGTH}",
      {"batch_size": 1, "device": "cuda:0", "max_batch_size": 64})
  assert (hf.batch_size, hf.max_length) == (BATCH, MAX_LENGTH)
  pairs = instances("loglikelihood", [("Q: Which is a fruit?\nA:", " apple")])
  np.testing.assert_allclose(hf.loglikelihood(pairs)[0][0], lm.loglikelihood(pairs)[0][0],
                             rtol=1e-6)
  assert adapter.LteJaxLM.from_model(lm.model, "byte").max_length == 256   # max_position
  bf16 = adapter.LteJaxLM.create_from_arg_string(
      f"hf={hf_dir},tokenizer=byte,batch_size={BATCH},max_length={MAX_LENGTH},dtype=bfloat16")
  assert bf16.model.config.dtype == "bfloat16"
  (got, _), = bf16.loglikelihood(pairs)
  (want, _), = lm.loglikelihood(pairs)
  assert got != want and got == pytest.approx(want, rel=0.05)
  with pytest.raises(ValueError, match=r"model_args hf=.* holds no tokenizer.json or "
                                       r"tokenizer.model; name one with tokenizer=SPEC"):
    adapter.LteJaxLM(hf=hf_dir)


@pytest.mark.parametrize("args, message", [
    (dict(workdir="/w", temperature=1), r"unknown model_args \['temperature'\]; the lte_jax "
     r"model type takes workdir, checkpoint, hf, tokenizer, batch_size, max_length"),
    (dict(), r"one of workdir=DIR, checkpoint=PATH or hf=DIR is required"),
    (dict(hf="/h", workdir="/w"), r"give hf=DIR alone"),
    (dict(workdir="/w", batch_size="auto"), r"batch_size must be an integer >= 1, got "
     r"'auto' \('auto' is not supported\)"),
    (dict(workdir="/w", max_length=0), r"max_length must be an integer >= 1, got 0"),
    (dict(workdir="/w", max_gen_toks=-1), r"max_gen_toks must be an integer >= 1"),
    (dict(workdir="/w", dtype="float16"), r"model_args dtype must be one of \('float32', "
     r"'bfloat16'\), got 'float16'"),
    (dict(hf="/no/such/dir"), r"model_args hf must be a Hugging Face model directory"),
])
def test_bad_model_args_name_the_argument(harness, args, message):
  _, adapter, _ = harness
  with pytest.raises(ValueError, match=message):
    adapter.LteJaxLM(**args)


@pytest.mark.parametrize("kwargs, message", [
    ({"until": ["\n"], "do_sample": True, "temperature": 0.7},
     r"do_sample=True \(temperature=0.7\): the lte_jax model type decodes greedily"),
    ({"until": ["\n"], "repetition_penalty": 1.2},
     r"generation kwarg repetition_penalty=1.2 is not supported by the lte_jax model type; "
     r"allowed: until, max_gen_toks"),
    ({"max_gen_toks": MAX_LENGTH}, r"max_gen_toks=64 leaves no room for a context in "
     r"max_length=64"),
    ({"until": [3]}, r"until must be strings"),
])
def test_bad_generation_kwargs_name_the_setting(lm, kwargs, message):
  with pytest.raises(ValueError, match=message):
    lm.generate_until(instances("generate_until", [("Q:", kwargs)]))
