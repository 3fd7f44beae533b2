r"""Generate text from a trained or converted model.

    python -m experiments.generate --workdir=/tmp/lte_run --prompt="The module" \
        --max_new_tokens=64 --temperature=0.8 --top_p=0.95 --stop='\n\n'

The model is the newest good checkpoint of a workdir written by experiments.train or
experiments.convert (--workdir), a checkpoint step directory (--checkpoint), or a Hugging
Face directory converted on load (--hf_dir, lte_jax.convert.load_hf). The tokenizer is
the training run's (config.data.tokenizer), the tokenizer.json / tokenizer.model inside
--hf_dir, or --tokenizer. The prompt is encoded after a BOS token, as training documents
begin.

Text is printed as it is produced: one compiled prefill over the prompt, then one compiled
decode step per token through the model's caches (``stream_ids``). With --nostream the
whole generation runs as lte_jax.generate.generate's one compiled program and the text is
printed at the end. Both draw token i with the key fold_in(key(--seed), i), so they choose
the same tokens. Generation ends at the tokenizer's EOS, at --max_new_tokens, or where a
--stop string appears (the text is cut before it).
"""
from __future__ import annotations

import functools
import sys
from typing import Iterable, Iterator, Sequence

import jax
import jax.numpy as jnp
from absl import app, flags, logging
from flax import nnx

from experiments import cli
from lte_jax.data.tokenizers import Tokenizer, get_tokenizer
from lte_jax.generate import cut_at_stop, generate, stop_token_ids
from lte_jax.sampling import SamplingConfig, sample

_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Workdir of experiments.train or experiments.convert: config.json and "
    "checkpoints/ (its newest good checkpoint unless --checkpoint names one).")
_CHECKPOINT = flags.DEFINE_string(
    "checkpoint", None, "A checkpoint step directory (WORKDIR/checkpoints/<step>) or a "
    "checkpoints/ folder (its newest step). Its config is read from --workdir, or from the "
    "folder above checkpoints/.")
_HF_DIR = flags.DEFINE_string(
    "hf_dir", None, "A Hugging Face model directory (config.json + safetensors) of FLA's "
    "gated_deltanet or the reference's hybrid_gated_deltanet, converted on load.")
_TOKENIZER = flags.DEFINE_string(
    "tokenizer", None, "Tokenizer spec ('byte', a local tokenizer.json / .model or a folder "
    "holding one); default: the training run's, or the one inside --hf_dir.")
_PROMPT = flags.DEFINE_string("prompt", None, "Prompt text.")
_PROMPT_FILE = flags.DEFINE_string("prompt_file", None, "A UTF-8 file holding the prompt.")
_MAX_NEW_TOKENS = flags.DEFINE_integer("max_new_tokens", 128, "Tokens to generate at most.")
_TEMPERATURE = flags.DEFINE_float("temperature", 0.0, "Sampling temperature; 0 is greedy.")
_TOP_P = flags.DEFINE_float("top_p", 1.0, "Nucleus sampling: the smallest set of tokens "
                            "whose probability reaches top_p, in (0, 1] (1: no cut).")
_TOP_K = flags.DEFINE_integer("top_k", 0, "Sample among the top_k most likely tokens "
                              "(0: no cut).")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the sampling key.")
_STOP = flags.DEFINE_multi_string(
    "stop", [], r"Stop string (repeatable); the text is cut before the first one. '\n', "
    r"'\t' and '\\' are read as newline, tab and backslash.")
_STREAM = flags.DEFINE_boolean(
    "stream", True, "Print text as each token is produced (one decode step per token); "
    "--nostream runs the one-program lte_jax.generate.generate and prints at the end.")
_BOS = flags.DEFINE_boolean("bos", True, "Put the tokenizer's BOS token before the prompt.")


def unescape(text: str) -> str:
  r"""'\n', '\t' and '\\' in a flag value as newline, tab and backslash."""
  out, i = [], 0
  while i < len(text):
    pair = text[i:i + 2]
    if pair in ("\\n", "\\t", "\\\\"):
      out.append({"\\n": "\n", "\\t": "\t", "\\\\": "\\"}[pair])
      i += 2
    else:
      out.append(text[i])
      i += 1
  return "".join(out)


def check_flags(*, workdir: str | None, checkpoint: str | None, hf_dir: str | None,
                prompt: str | None, prompt_file: str | None, max_new_tokens: int,
                temperature: float, top_p: float, top_k: int = 0,
                stop: Sequence[str] = ()) -> tuple[str, SamplingConfig]:
  """(prompt text, sampling) from the flags; ValueError naming the flag and what it
  allows, before anything is loaded."""
  if hf_dir and (workdir or checkpoint):
    raise ValueError("give --hf_dir alone, or --workdir / --checkpoint, not both kinds")
  if not (hf_dir or workdir or checkpoint):
    raise ValueError("one of --workdir, --checkpoint or --hf_dir is required")
  if prompt is not None and prompt_file is not None:
    raise ValueError("give --prompt or --prompt_file, not both")
  if prompt is None and prompt_file is None:
    raise ValueError("--prompt (text) or --prompt_file (a UTF-8 file) is required")
  if prompt_file is not None:
    try:
      with open(prompt_file, encoding="utf-8") as f:
        prompt = f.read()
    except (OSError, UnicodeDecodeError) as err:
      raise ValueError(f"--prompt_file={prompt_file} cannot be read as UTF-8 text: {err}") from None
  if not prompt:
    flag = "--prompt_file" if prompt_file is not None else "--prompt"
    raise ValueError(f"{flag} is empty; give the text to continue")
  if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
    raise ValueError(f"--max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
  if not temperature >= 0:
    raise ValueError(f"--temperature must be >= 0 (0: greedy), got {temperature!r}")
  if not 0 < top_p <= 1:
    raise ValueError(f"--top_p must be in (0, 1] (1: no cut), got {top_p!r}")
  if top_k < 0:
    raise ValueError(f"--top_k must be >= 0 (0: no cut), got {top_k!r}")
  if any(not s for s in stop):
    raise ValueError(f"--stop must be non-empty strings, got {list(stop)!r}")
  return prompt, SamplingConfig(temperature=float(temperature), top_k=int(top_k),
                                top_p=float(top_p))


def load_model(*, workdir: str | None = None, checkpoint: str | None = None,
               hf_dir: str | None = None, tokenizer: str | None = None
               ) -> tuple[nnx.Module, Tokenizer]:
  """(model in eval mode with the LTE budget enforced, tokenizer)."""
  if hf_dir:
    from lte_jax.convert import load_hf_with_tokenizer  # pylint: disable=g-import-not-at-top
    return load_hf_with_tokenizer(hf_dir, tokenizer, path_name="--hf_dir",
                                  tokenizer_name="--tokenizer")
  from lte_jax.evals import loading  # pylint: disable=g-import-not-at-top
  run = loading.load_run(workdir, checkpoint)
  logging.info("loaded %s (step %d)", run.checkpoint, run.step)
  return run.model, get_tokenizer(tokenizer or run.data.tokenizer)


def encode_prompt(tokenizer: Tokenizer, text: str, model: nnx.Module, max_new_tokens: int, *,
                  bos: bool = True) -> list[int]:
  """Prompt ids (BOS first with ``bos``); ValueError when they do not fit the model."""
  ids = ([tokenizer.bos_id] if bos else []) + list(tokenizer.encode(text))
  if not ids:
    raise ValueError("--prompt encodes to no tokens; give more text or --bos")
  cfg = model.config
  if max(ids) >= cfg.vocab_size:
    raise ValueError(f"the tokenizer gives id {max(ids)} but the model has only "
                     f"{cfg.vocab_size} tokens; give --tokenizer the model's tokenizer")
  if len(ids) + max_new_tokens > cfg.max_position:
    raise ValueError(
        f"--prompt is {len(ids)} tokens and --max_new_tokens={max_new_tokens}: "
        f"{len(ids) + max_new_tokens} positions, more than the model takes "
        f"(max_position={cfg.max_position}); shorten the prompt or lower --max_new_tokens")
  return ids


def stream_ids(model: nnx.Module, prompt: Sequence[int], *, max_new_tokens: int,
               sampling: SamplingConfig, rng: jax.Array, end_ids: Iterable[int] = ()
               ) -> Iterator[int]:
  """Token ids after ``prompt``, one at a time: prefill, then one jitted decode step each.

  Token i is drawn from the last logits with key fold_in(rng, i), as
  lte_jax.generate.generate draws it; an id in ``end_ids`` is yielded, then ends it.
  """
  end = {int(i) for i in end_ids}
  prefill, step = _compiled(nnx.graphdef(model), sampling)
  state = nnx.state(model)
  cache = model.init_cache(1, len(prompt) + max_new_tokens)
  last, cache = prefill(state, jnp.asarray([prompt], jnp.int32), cache)
  for i in range(max_new_tokens):
    token, last, cache = step(state, cache, last, jax.random.fold_in(rng, i))
    token = int(token)
    yield token
    if token in end:
      return


@functools.lru_cache(maxsize=8)
def _compiled(graphdef, sampling: SamplingConfig):
  """(prefill, step) jitted for one model structure and sampling setting."""

  @jax.jit
  def prefill(state, tokens, cache):
    logits, cache = nnx.merge(graphdef, state).prefill(tokens, cache)
    return logits[:, -1], cache

  @jax.jit
  def step(state, cache, last, key):
    token = sample(key, last, sampling)
    logits, cache = nnx.merge(graphdef, state).decode(token[:, None], cache)
    return token[0], logits[:, 0], cache

  return prefill, step


class TextStream:
  """Turns ids into printable text pieces as they come.

  The tail of the text is held back while it may still change: an incomplete
  UTF-8 character (decoded as U+FFFD) or the start of a stop string.
  """

  def __init__(self, tokenizer: Tokenizer, stops: Sequence[str] = ()):
    self.tokenizer, self.stops = tokenizer, tuple(stops)
    self.ids: list[int] = []
    self.shown = 0        # characters of the text already returned
    self.stopped = False  # a stop string appeared

  def push(self, token: int) -> str:
    self.ids.append(int(token))
    text = self.tokenizer.decode(self.ids)
    cut = cut_at_stop(text, self.stops)
    if len(cut) < len(text):
      self.stopped = True
      return self._show(cut, len(cut))
    return self._show(text, len(text) - self._held(text))

  def finish(self) -> str:
    """The rest of the text (held-back characters included), up to any stop string."""
    text = cut_at_stop(self.tokenizer.decode(self.ids), self.stops)
    return self._show(text, len(text))

  def _show(self, text: str, upto: int) -> str:
    piece = text[self.shown:max(upto, self.shown)]
    self.shown = max(upto, self.shown)
    return piece

  def _held(self, text: str) -> int:
    held = len(text) - len(text.rstrip("\ufffd"))
    for s in self.stops:
      for k in range(min(len(s) - 1, len(text)), 0, -1):
        if text.endswith(s[:k]):
          held = max(held, k)
          break
    return held


def run(model: nnx.Module, tokenizer: Tokenizer, prompt_ids: Sequence[int], *,
        max_new_tokens: int, sampling: SamplingConfig, seed: int, stops: Sequence[str] = (),
        stream: bool = True, out=None) -> str:
  """Generate after ``prompt_ids``, writing the text to ``out`` (default stdout); returns it."""
  out = sys.stdout if out is None else out
  rng = jax.random.key(seed)
  end = [tokenizer.eos_id]
  if not stream:
    result = generate(model, [list(prompt_ids)], max_new_tokens=max_new_tokens,
                      sampling=sampling, rng=rng, eos_ids=end,
                      stop_ids=stop_token_ids(tokenizer, stops) if stops else ())
    text = cut_at_stop(tokenizer.decode(result.rows()[0]), stops)
    out.write(text + "\n")
    out.flush()
    return text
  text = TextStream(tokenizer, stops)
  pieces = []
  for token in stream_ids(model, prompt_ids, max_new_tokens=max_new_tokens, sampling=sampling,
                          rng=rng, end_ids=end):
    pieces.append(text.push(token))
    out.write(pieces[-1])
    out.flush()
    if text.stopped:
      break
  pieces.append(text.finish())
  out.write(pieces[-1] + "\n")
  out.flush()
  return "".join(pieces)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  stops = [unescape(s) for s in _STOP.value]
  try:
    text, sampling = check_flags(
        workdir=_WORKDIR.value, checkpoint=_CHECKPOINT.value, hf_dir=_HF_DIR.value,
        prompt=_PROMPT.value, prompt_file=_PROMPT_FILE.value,
        max_new_tokens=_MAX_NEW_TOKENS.value, temperature=_TEMPERATURE.value,
        top_p=_TOP_P.value, top_k=_TOP_K.value, stop=stops)
    from lte_jax.training import checkpoint  # pylint: disable=g-import-not-at-top
    checkpoint.quiet_orbax_logs()
    model, tokenizer = load_model(workdir=_WORKDIR.value, checkpoint=_CHECKPOINT.value,
                                  hf_dir=_HF_DIR.value, tokenizer=_TOKENIZER.value)
    ids = encode_prompt(tokenizer, text, model, _MAX_NEW_TOKENS.value, bos=_BOS.value)
  except ValueError as err:
    sys.exit(f"generate: {err}")
  run(model, tokenizer, ids, max_new_tokens=_MAX_NEW_TOKENS.value, sampling=sampling,
      seed=_SEED.value, stops=stops, stream=_STREAM.value)


def parse_flags(argv: list[str]) -> list[str]:
  cli.exit_on_help(argv, __doc__, __name__)
  return app.parse_flags_with_usage(argv)


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
