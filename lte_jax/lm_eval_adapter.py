r"""The model type 'lte_jax' for EleutherAI's lm-evaluation-harness (lm_eval 0.4).

    pip install -e '.[lm-eval]'
    python -m lte_jax.lm_eval_adapter run --model lte_jax \
        --model_args workdir=/tmp/lte_run,batch_size=8 --tasks swde,fda,squad_completion

lm_eval 0.4 discovers no models outside its own tree (no plugin entry point), so
importing this module registers 'lte_jax' (a lazy entry naming ``LteJaxLM``), and
running it as a module runs lm_eval's own command line with the type registered: every
lm_eval flag works as documented there. From Python: ``import lte_jax.lm_eval_adapter``,
then ``lm_eval.simple_evaluate(model="lte_jax", model_args=...)``, or pass
``LteJaxLM.from_model(model, tokenizer)``.

model_args (``MODEL_ARGS``; anything else is a ValueError that lists them):
  workdir=DIR      a workdir of experiments.train or experiments.convert: its newest good
                   checkpoint (lte_jax.evals.loading.load_run)
  checkpoint=PATH  a step directory (DIR/checkpoints/<step>) or a checkpoints/ folder; the
                   config is read from workdir=, or from the folder above checkpoints/
  hf=DIR           a Hugging Face directory converted on load (lte_jax.convert.load_hf)
  tokenizer=SPEC   'byte', a tokenizer.json / .model or a folder holding one; default: the
                   run's config.data.tokenizer, or the one inside hf=DIR. RULER tasks read
                   this key too, to size their prompts.
  batch_size=N     rows per compiled call (default 1; wins over lm_eval's --batch_size)
  max_length=N     tokens a sequence may hold (default: the model's max_position)
  max_gen_toks=N   new tokens when a task sets none (default 256, as lm_eval's HF model)
  dtype=NAME       compute dtype, 'float32' or 'bfloat16' (default: the checkpoint's)
lm_eval's own --device and --max_batch_size are accepted and unused: JAX places the model
on its default device (JAX_PLATFORMS picks the platform).

Every sequence starts with the tokenizer's BOS token, as training documents do; BOS is
context, never scored. Sequences longer than max_length lose tokens from the left, BOS
first, as lm_eval's Hugging Face model truncates. Log-likelihoods come from one forward
pass over context + continuation; requests are sorted by length, batched, right-padded to
a power-of-two width (>= 32, <= max_length) so few programs compile, and returned in the
order asked. Generation is greedy, through lte_jax.evals.tasks.generate_texts (one
compiled prefill + decode loop per batch), ending at EOS, a stop string of ``until`` or
``max_gen_toks``; the context keeps its last max_length - max_gen_toks tokens.
"""
from __future__ import annotations

import functools
import sys
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

try:
  from lm_eval import utils as lm_utils
  from lm_eval.api.model import TemplateLM
  from lm_eval.api.registry import model_registry
  from lm_eval.models.utils import normalize_gen_kwargs
except ImportError as err:
  raise ImportError("lte_jax.lm_eval_adapter needs lm-evaluation-harness 0.4: "
                    "pip install 'lte_jax[lm-eval]'") from err
from tqdm import tqdm

from lte_jax import configs as configs_lib
from lte_jax._checks import check_choice, check_positive_int
from lte_jax.data.tokenizers import Tokenizer, get_tokenizer
from lte_jax.evals.tasks import generate_texts

MODEL_TYPE = "lte_jax"
MODEL_ARGS = ("workdir", "checkpoint", "hf", "tokenizer", "batch_size", "max_length",
              "max_gen_toks", "dtype")
HARNESS_ARGS = ("device", "max_batch_size")   # lm_eval passes these to every model
# Generation settings a task may give; top_k / top_p do nothing under greedy decoding.
GEN_KWARGS = ("until", "max_gen_toks", "do_sample", "temperature", "top_k", "top_p")
MIN_WIDTH = 32
DEFAULT_MAX_GEN_TOKS = 256


def bucket_width(length: int, max_length: int) -> int:
  """Padded width of a batch whose longest row is ``length`` tokens: the next power of
  two, at least MIN_WIDTH, at most ``max_length``."""
  return min(max_length, max(MIN_WIDTH, 1 << (length - 1).bit_length()))


def with_dtype(model: nnx.Module, dtype: str) -> nnx.Module:
  """``model`` computing in ``dtype`` (same parameters, master dtype unchanged)."""
  if model.config.dtype == dtype:
    return model
  from lte_jax.training import train_state  # pylint: disable=g-import-not-at-top
  model_def = train_state.make_model_def(configs_lib.replace(model.config, dtype=dtype),
                                         train=False)
  out = model_def.bind(nnx.to_pure_dict(nnx.state(model, nnx.Param)), jax.random.key(0))
  out.eval()
  out.set_attributes(enforce_budget=True, raise_if_not_found=False)
  return out


def load_model(*, workdir: str | None = None, checkpoint: str | None = None,
               hf: str | None = None, tokenizer: str | None = None,
               dtype: str | None = None) -> tuple[nnx.Module, Tokenizer]:
  """(model in eval mode with the LTE budget enforced, tokenizer) from model_args."""
  if hf is not None and (workdir is not None or checkpoint is not None):
    raise ValueError("model_args: give hf=DIR alone, or workdir=DIR and / or "
                     "checkpoint=PATH, not both kinds")
  if hf is None and workdir is None and checkpoint is None:
    raise ValueError("model_args: one of workdir=DIR, checkpoint=PATH or hf=DIR is required")
  if dtype is not None:
    check_choice("model_args dtype", dtype, configs_lib.DTYPES)
  if hf is not None:
    from lte_jax.convert import load_hf_with_tokenizer  # pylint: disable=g-import-not-at-top
    return load_hf_with_tokenizer(hf, tokenizer, dtype=dtype or "float32",
                                  path_name="model_args hf", tokenizer_name="tokenizer=SPEC")
  from lte_jax.evals import loading  # pylint: disable=g-import-not-at-top
  run = loading.load_run(None if workdir is None else str(workdir),
                         None if checkpoint is None else str(checkpoint))
  model = run.model if dtype is None else with_dtype(run.model, dtype)
  return model, get_tokenizer(str(tokenizer) if tokenizer is not None else run.data.tokenizer)


def _as_int(name: str, value: Any) -> int:
  """An int model_arg (lm_eval hands over ints, or strings from its own flags)."""
  if isinstance(value, str) and value.strip().isdigit():
    value = int(value)
  if isinstance(value, (int, np.integer)) and not isinstance(value, bool) and value >= 1:
    return int(value)
  raise ValueError(f"model_args {name} must be an integer >= 1, got {value!r}"
                   + (" ('auto' is not supported)" if str(value).startswith("auto") else ""))


@functools.lru_cache(maxsize=8)
def _scorer(graphdef):
  """jit(state, inputs [B, W], targets [B, W]) -> (log p(target) f32 [B, W],
  target is the argmax [B, W]) for one model structure."""

  @jax.jit
  def score(state, inputs, targets):
    logits, _ = nnx.merge(graphdef, state)(inputs)
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    picked = jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    return picked, jnp.argmax(logits, axis=-1) == targets

  return score


class LteJaxLM(TemplateLM):
  """lm_eval's LM over an lte_jax HybridLM (see the module docstring for model_args)."""

  def __init__(self, workdir: str | None = None, checkpoint: str | None = None,
               hf: str | None = None, tokenizer: str | None = None, batch_size: Any = 1,
               max_length: Any = None, max_gen_toks: Any = DEFAULT_MAX_GEN_TOKS,
               dtype: str | None = None, device: Any = None, max_batch_size: Any = None,
               **unknown):
    del device, max_batch_size  # lm_eval's torch settings; JAX picks its own device
    if unknown:
      raise ValueError(f"unknown model_args {sorted(unknown)}; the {MODEL_TYPE} model type "
                       f"takes {', '.join(MODEL_ARGS)}")
    super().__init__()
    for name, value in (("batch_size", batch_size), ("max_length", max_length),
                        ("max_gen_toks", max_gen_toks)):
      if value is not None:   # before the model loads
        _as_int(name, value)
    model, tok = load_model(workdir=workdir, checkpoint=checkpoint, hf=hf,
                            tokenizer=tokenizer, dtype=dtype)
    self._setup(model, tok, batch_size=batch_size, max_length=max_length,
                max_gen_toks=max_gen_toks)

  @classmethod
  def from_model(cls, model: nnx.Module, tokenizer: Tokenizer | str, *, batch_size: Any = 1,
                 max_length: Any = None, max_gen_toks: Any = DEFAULT_MAX_GEN_TOKS) -> LteJaxLM:
    """Wrap a loaded model (eval mode; LTE layers with ``enforce_budget=True``)."""
    lm = cls.__new__(cls)
    TemplateLM.__init__(lm)
    lm._setup(model, get_tokenizer(tokenizer), batch_size=batch_size, max_length=max_length,
              max_gen_toks=max_gen_toks)
    return lm

  def _setup(self, model, tokenizer, *, batch_size, max_length, max_gen_toks) -> None:
    self.model, self.tokenizer = model, tokenizer
    self.batch_size = _as_int("batch_size", batch_size)
    self._max_length = (model.config.max_position if max_length is None
                        else _as_int("max_length", max_length))
    if self._max_length < 2:
      raise ValueError(f"model_args max_length must be >= 2, got {self._max_length}")
    self.max_gen_toks = _as_int("max_gen_toks", max_gen_toks)
    self._graphdef, self._state = nnx.split(model)

  @classmethod
  def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None):
    return cls.create_from_arg_obj(lm_utils.simple_parse_args_string(arg_string),
                                   additional_config)

  @classmethod
  def create_from_arg_obj(cls, arg_dict: dict, additional_config: dict | None = None):
    # model_args win over the harness's settings: its --batch_size defaults to 1, and
    # lm_eval's own merge would pass batch_size twice.
    extra = {k: v for k, v in (additional_config or {}).items()
             if v is not None and k not in arg_dict}
    return cls(**arg_dict, **extra)

  @property
  def eot_token_id(self) -> int:
    return self.tokenizer.eos_id

  @property
  def prefix_token_id(self) -> int:
    return self.tokenizer.bos_id

  @property
  def max_length(self) -> int:
    return self._max_length

  @property
  def tokenizer_name(self) -> str:
    return repr(self.tokenizer)

  def tok_encode(self, string: str, add_special_tokens: bool | None = None,
                 **kwargs) -> list[int]:
    """Ids of ``string``, BOS first unless ``add_special_tokens`` is False."""
    ids = list(self.tokenizer.encode(string))
    if ids and max(ids) >= self.model.config.vocab_size:
      raise ValueError(f"the tokenizer gives id {max(ids)} but the model has only "
                       f"{self.model.config.vocab_size} tokens; give model_args tokenizer= "
                       "the model's tokenizer")
    return ids if add_special_tokens is False else [self.tokenizer.bos_id] + ids

  def tok_decode(self, ids: Sequence[int], **kwargs) -> str:
    return self.tokenizer.decode(ids)

  # -- log-likelihoods -----------------------------------------------------------------

  def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False,
                            **kwargs) -> list[tuple[float, bool]]:
    """requests: (cache key or None, context ids, continuation ids) ->
    [(sum of log p(continuation token), every continuation token is the argmax)]."""
    seqs, counts = [], []
    for _, context, continuation in requests:
      n = len(continuation)
      if n > self.max_length:
        raise ValueError(f"a continuation of {n} tokens does not fit max_length="
                         f"{self.max_length}; raise model_args max_length")
      if n and not context:
        raise ValueError("a continuation needs at least one context token (BOS)")
      seqs.append((list(context) + list(continuation))[-(self.max_length + 1):])
      counts.append(n)
    results = self._score(seqs, counts, disable_tqdm)
    for (key, _, _), result in zip(requests, results):
      if key is not None:
        self.cache_hook.add_partial("loglikelihood", key, result)
    return results

  def _score(self, seqs: list[list[int]], counts: list[int],
             disable_tqdm: bool) -> list[tuple[float, bool]]:
    """Score the last ``counts[i]`` tokens of each ``seqs[i]`` given the tokens before."""
    results: list[tuple[float, bool]] = [(0.0, True)] * len(seqs)
    todo = sorted((i for i in range(len(seqs)) if counts[i]), key=lambda i: -len(seqs[i]))
    score = _scorer(self._graphdef)
    b = self.batch_size
    for start in tqdm(range(0, len(todo), b), disable=disable_tqdm or not todo,
                      desc="lte_jax loglikelihood"):
      rows = todo[start:start + b]
      width = bucket_width(len(seqs[rows[0]]) - 1, self.max_length)
      inputs = np.full((b, width), self.tokenizer.pad_id, np.int32)
      targets = np.zeros((b, width), np.int32)
      for r, i in enumerate(rows):
        # Right padding: a causal model's real positions never see it.
        inputs[r, :len(seqs[i]) - 1] = seqs[i][:-1]
        targets[r, :len(seqs[i]) - 1] = seqs[i][1:]
      logp, greedy = (np.asarray(x) for x in score(self._state, inputs, targets))
      for r, i in enumerate(rows):
        end = len(seqs[i]) - 1
        picked = slice(end - counts[i], end)
        results[i] = (float(logp[r, picked].astype(np.float64).sum()),
                      bool(greedy[r, picked].all()))
    return results

  def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
    """Log-likelihood of each whole text: lm_eval's disjoint rolling windows of
    max_length tokens, the first after BOS."""
    windows, owner = [], []
    for n, (text,) in enumerate(req.args for req in requests):
      for context, continuation in map(lm_utils.make_disjoint_window,
                                       lm_utils.get_rolling_token_windows(
                                           token_list=self.tok_encode(text,
                                                                      add_special_tokens=False),
                                           prefix_token=self.prefix_token_id,
                                           max_seq_len=self.max_length, context_len=1)):
        windows.append((None, context, continuation))
        owner.append(n)
    totals = [0.0] * len(requests)
    for n, (logp, _) in zip(owner, self._loglikelihood_tokens(windows, disable_tqdm)):
      totals[n] += logp
    for req, total in zip(requests, totals):
      self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
    return totals

  # -- generation ----------------------------------------------------------------------

  def _generation_settings(self, gen_kwargs: dict) -> tuple[tuple[str, ...], int]:
    """(stop strings, max new tokens) of a request's generation kwargs."""
    if not isinstance(gen_kwargs, dict):
      raise ValueError(f"generation kwargs must be a dict, got {gen_kwargs!r}")
    kwargs = normalize_gen_kwargs(gen_kwargs, self.max_gen_toks)
    unknown = sorted(set(kwargs) - set(GEN_KWARGS))
    if unknown:
      raise ValueError(f"generation kwarg {unknown[0]}={kwargs[unknown[0]]!r} is not "
                       f"supported by the {MODEL_TYPE} model type; allowed: "
                       f"{', '.join(GEN_KWARGS)}")
    if kwargs["do_sample"]:
      raise ValueError(f"generation kwargs do_sample=True (temperature="
                       f"{kwargs.get('temperature')}): the {MODEL_TYPE} model type decodes "
                       "greedily; use do_sample=False")
    until = kwargs["until"]
    if any(not isinstance(s, str) for s in until):
      raise ValueError(f"generation kwarg until must be strings, got {until!r}")
    max_new = kwargs["max_gen_toks"]
    check_positive_int("generation kwarg max_gen_toks", max_new)
    if max_new >= self.max_length:
      raise ValueError(f"generation kwarg max_gen_toks={max_new} leaves no room for a "
                       f"context in max_length={self.max_length}; lower it or raise "
                       "model_args max_length")
    # '' (what an end token decodes to) stops nothing; EOS ends a row by its id.
    return tuple(s for s in until if s), max_new

  def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
    """Greedy continuations, cut before the first stop string, in the order asked."""
    groups: dict[tuple, list[int]] = {}
    for i, req in enumerate(requests):
      groups.setdefault(self._generation_settings(req.args[1]), []).append(i)
    out = [""] * len(requests)
    for (until, max_new), rows in tqdm(groups.items(), disable=disable_tqdm,
                                       desc="lte_jax generate_until"):
      keep = self.max_length - max_new
      prompts = [self.tok_encode(requests[i].args[0])[-keep:] for i in rows]
      texts = generate_texts(self.model, self.tokenizer, prompts, max_new_tokens=max_new,
                             stop_strings=until, batch_size=self.batch_size)
      for i, text in zip(rows, texts):
        out[i] = text
        self.cache_hook.add_partial("generate_until", requests[i].args, text)
    return out


if MODEL_TYPE not in model_registry:
  # A lazy entry, by module path: run as __main__ this file defines a second class, and
  # lm_eval resolves the name to the importable one.
  model_registry.register(MODEL_TYPE, target="lte_jax.lm_eval_adapter:LteJaxLM")


def main(argv: Sequence[str] | None = None) -> None:
  """lm_eval's command line (``argv``: its arguments; default sys.argv[1:]) with the
  'lte_jax' model type registered."""
  from lm_eval.__main__ import cli_evaluate  # pylint: disable=g-import-not-at-top
  if argv is not None:
    sys.argv = [sys.argv[0], *argv]
  cli_evaluate()


if __name__ == "__main__":
  main()
