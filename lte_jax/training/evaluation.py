"""Validation loss and perplexity during training: config, data, a jitted eval step.

``config.eval`` (experiments/configs/base.py) becomes an ``EvalConfig``. The
validation documents are the corpus documents ``holdout`` keeps out of
training (lte_jax.data.holdout), or every document of a separate source
(``path`` / ``source``); synthetic data (MQAR, NIAH) comes from validation
seeds. ``Evaluator`` packs them once into ``batches`` batches of the training
shape and, every ``every`` steps and after the last one, runs the model in
eval mode (no dropout; the training forward otherwise, so LTE keeps no budget)
over those same batches:

  val/loss = sum of -log p(target) over loss_mask tokens / their count
  val/ppl  = exp(val/loss)

so successive values form one comparable curve.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from lte_jax import data as data_lib
from lte_jax.data import holdout as holdout_lib
from lte_jax.training import mesh as mesh_lib
from lte_jax.training.metrics import perplexity
from lte_jax.training import train_state
from lte_jax.training.step import BATCH_KEYS, cross_entropy_sum


def _is_int(value: Any) -> bool:
  return isinstance(value, int) and not isinstance(value, bool)


@dataclasses.dataclass(frozen=True)
class EvalConfig:
  """Validation during training. The defaults (no evaluation, nothing held out) are what a
  config without an ``eval`` section means; experiments/configs/base.py sets the defaults
  of new runs.

  every: steps between evaluations, also run after the last step (0: none).
  batches: validation batches of the training shape, the same ones every time.
  holdout: corpus documents kept out of training: 0, a fraction in (0, 1) or a
    whole number >= 1 of documents (lte_jax.data.holdout). It applies to the
    training corpus whether or not validation reads them.
  path, source: a separate validation source (a glob and one of
    lte_jax.data.SOURCE_KINDS, default: data.source); when either is set,
    validation reads it instead of the held-out documents.
  """
  every: int = 0
  batches: int = 2
  holdout: float = 0.0
  path: str | None = None
  source: str | None = None

  def __post_init__(self):
    for name, low in (("every", 0), ("batches", 1)):
      value = getattr(self, name)
      if not _is_int(value) or value < low:
        raise ValueError(f"config.eval.{name} must be an integer >= {low}, got {value!r}")
    holdout_lib.check_holdout(self.holdout, "config.eval.holdout")
    if self.path is not None and not (isinstance(self.path, str) and self.path):
      raise ValueError(f"config.eval.path must be None or a non-empty glob, got {self.path!r}")
    if self.source is not None and self.source not in data_lib.SOURCE_KINDS:
      raise ValueError(f"config.eval.source must be None (data.source) or one of "
                       f"{data_lib.SOURCE_KINDS}, got {self.source!r}")

  @property
  def separate(self) -> bool:
    """Whether validation reads its own source rather than held-out documents."""
    return self.path is not None or self.source is not None


def train_split(eval_cfg: EvalConfig, data_cfg: data_lib.DataConfig) -> holdout_lib.Split:
  """The training side of the split: every corpus document not held out."""
  return holdout_lib.Split("train", eval_cfg.holdout, data_cfg.seed)


def validation_data(eval_cfg: EvalConfig, data_cfg: data_lib.DataConfig,
                    ) -> tuple[data_lib.DataConfig, holdout_lib.Split]:
  """(data config, split) of the validation documents; ValueError when there are none."""
  if eval_cfg.separate:
    source = eval_cfg.source or data_cfg.source
    if source != "embedded" and eval_cfg.path is None:
      raise ValueError(f"config.eval.path must be a glob of files for the validation source "
                       f"{source!r} (config.eval.source, default data.source)")
    path = eval_cfg.path if source != "embedded" else None
    cfg = dataclasses.replace(data_cfg, source=source, path=path)
    return cfg, holdout_lib.Split("separate", 0, data_cfg.seed)
  if eval_cfg.holdout:
    return data_cfg, holdout_lib.Split("validation", eval_cfg.holdout, data_cfg.seed)
  if "corpus" not in data_cfg.weights:  # synthetic only: validation seeds suffice
    return data_cfg, holdout_lib.Split("separate", 0, data_cfg.seed)
  raise ValueError("validation needs documents kept out of training: set config.eval.holdout "
                   "> 0 (held-out corpus documents), config.eval.path (a separate source) or "
                   "config.eval.every=0 (no validation)")


def make_eval_step(model_def: train_state.ModelDef):
  """``eval_step(params, batch) -> (nll_sum, tokens)``: f32 scalars over loss_mask tokens of a
  batch of [B, T] arrays; pure, ready for jax.jit. ``model_def`` should be in eval mode."""
  def eval_step(params, batch):
    model = model_def.bind(params, jax.random.key(0))  # eval mode: the key is never drawn
    logits, _ = model(batch["inputs"], segment_ids=batch["segment_ids"],
                      positions=batch["positions"])
    nll = cross_entropy_sum(logits, batch["targets"], batch["loss_mask"])
    return nll, jnp.sum(batch["loss_mask"].astype(jnp.float32))
  return eval_step


def _empty_batch(rows: int, seq_len: int) -> dict:
  """An all-padding batch [rows, seq_len] (segment 0, loss mask 0): it adds nothing."""
  batch = {k: np.zeros((rows, seq_len), np.int32) for k in BATCH_KEYS}
  batch["loss_mask"] = np.zeros((rows, seq_len), np.float32)
  return batch


class Evaluator:
  """Validation every ``eval.every`` steps on fixed batches; see the module docstring."""

  def __init__(self, exp: Any, param_shardings: Any, batch_sharding: Any, *,
               process_index: int = 0, process_count: int = 1):
    self.cfg: EvalConfig = exp.eval
    self.total_steps = exp.steps
    self.batches: list[dict] = []
    if not self.cfg.every:
      return
    data_cfg, split = validation_data(self.cfg, exp.data)
    local = []
    try:
      for batch in holdout_lib.make_validation_iterator(
          data_cfg, split, process_index=process_index, process_count=process_count):
        local.append(batch)
        if len(local) == self.cfg.batches:
          break
    except ValueError as err:
      if not self.cfg.separate:
        raise
      raise ValueError(f"config.eval.path / config.eval.source: {err}") from err
    filled, tokens = len(local), int(sum(b["loss_mask"].sum() for b in local))
    if process_count > 1:  # every process runs the same number of eval steps
      empty = _empty_batch(data_cfg.batch_size // process_count, data_cfg.seq_len)
      local += [empty] * (self.cfg.batches - filled)
    elif not local:
      raise ValueError(f"the validation split ({split.name}) holds no document")
    if filled < self.cfg.batches:
      logging.warning("validation data fills %d of config.eval.batches=%d batches (%d tokens); "
                      "raise config.eval.holdout or set config.eval.path for a steadier "
                      "estimate", filled, self.cfg.batches, tokens)
    logging.info("validation: %d batches, %d tokens (%s split) every %d steps", filled, tokens,
                 split.name, self.cfg.every)
    self.batches = [mesh_lib.global_batch(b, batch_sharding) for b in local]
    eval_def = train_state.make_model_def(exp.model, train=False)
    self._step = jax.jit(make_eval_step(eval_def), in_shardings=(param_shardings, batch_sharding))

  def due(self, step: int) -> bool:
    every = self.cfg.every
    return bool(every) and (step % every == 0 or step == self.total_steps)

  def evaluate(self, params: Any) -> dict[str, float]:
    """{'val/loss', 'val/ppl', 'val/tokens', 'val/seconds'} of ``params`` (the train state's)."""
    jax.block_until_ready(params)  # time the evaluation alone, not the pending train step
    start = time.time()
    sums = jax.device_get([self._step(params, batch) for batch in self.batches])
    nll, tokens = (float(sum(x)) for x in zip(*sums))
    loss = nll / max(tokens, 1.0)
    return {"val/loss": loss, "val/ppl": perplexity(loss), "val/tokens": tokens,
            "val/seconds": time.time() - start}

  def run_if_due(self, step: int, params: Any) -> dict[str, float] | None:
    return self.evaluate(params) if self.due(step) else None
