"""Load a Hugging Face (hybrid) Gated DeltaNet checkpoint as an lte_jax HybridLM."""
from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import jax.numpy as jnp
from absl import logging

from lte_jax import configs as configs_lib
from lte_jax.convert import hf_config, hf_params
from lte_jax.convert.safetensors import read_checkpoint


@dataclasses.dataclass(frozen=True)
class Converted:
  """A converted checkpoint, before it becomes a model or a train state.

  params: nnx.to_pure_dict layout of HybridLM's parameters, float32 numpy arrays.
  controller: {'lam', 'kept_ema'} [LTE layers, KV heads] from the reference's LTE
    lambda-controller buffers, or None.
  """
  config: configs_lib.ModelConfig
  params: Any
  controller: dict | None
  layout: hf_config.HFLayout
  source: str


_MIXER_CONFIGS = ("gdn", "attn", "swa", "lte", "nsa")


def convert_hf(path: str, *, dtype: str = "float32", implementation: str | None = None
               ) -> Converted:
  """Read config.json + safetensors (one file or an index of shards) from ``path``.

  ``dtype``: compute dtype of the model; ``implementation``: op implementation for every
  mixer (None: the backend's best).
  """
  if not isinstance(path, (str, os.PathLike)) or not os.path.isdir(path):
    raise ValueError(f"path must be a Hugging Face model directory, got {path!r}")
  config, layout = hf_config.model_config_from_hf(hf_config.read_config(path), dtype=dtype)
  if implementation is not None:
    config = configs_lib.replace(config, **{
        name: configs_lib.replace(getattr(config, name), implementation=implementation)
        for name in _MIXER_CONFIGS if hasattr(config, name)})
  for note in layout.notes:
    logging.warning("%s: %s", path, note)
  params, controller = hf_params.map_tensors(read_checkpoint(path), config, layout)
  return Converted(config=config, params=params, controller=controller, layout=layout,
                   source=os.path.abspath(path))


def load_hf(path: str, *, dtype: str = "float32", implementation: str | None = None
            ) -> tuple[Any, configs_lib.ModelConfig]:
  """(model, config) of the checkpoint in ``path``: an lte_jax HybridLM in eval mode.

  The model is lte_jax's own HybridLM, returned as is: ``model(tokens [B, T])`` returns
  ``(logits [B, T, vocab] float32, aux)``; take ``[0]`` for the logits. LTE layers run with
  the inference budget enforced (``enforce_budget=True``), as the reference's eval
  forward does, and dropout is off.
  """
  from lte_jax.training import train_state  # pylint: disable=g-import-not-at-top
  converted = convert_hf(path, dtype=dtype, implementation=implementation)
  model_def = train_state.make_model_def(converted.config, train=False)
  params = jax.tree.map(jnp.asarray, converted.params)
  model = model_def.bind(params, jax.random.key(0))
  model.eval()
  model.set_attributes(enforce_budget=True, raise_if_not_found=False)
  return model, converted.config


def load_hf_with_tokenizer(path: str, tokenizer: str | None = None, *, dtype: str = "float32",
                           path_name: str = "path", tokenizer_name: str = "tokenizer"):
  """(model, tokenizer) of a Hugging Face directory: ``load_hf`` and the tokenizer named by
  ``tokenizer`` (a lte_jax.data.tokenizers spec) or, by default, the directory's own
  tokenizer.json / tokenizer.model. Errors name ``path_name`` / ``tokenizer_name`` (how the
  caller's user spells the two, e.g. '--hf_dir' and '--tokenizer')."""
  from lte_jax.data.tokenizers import get_tokenizer  # pylint: disable=g-import-not-at-top
  path = str(path)
  if not os.path.isdir(path):
    raise ValueError(f"{path_name} must be a Hugging Face model directory, got {path!r}")
  if tokenizer is None and not any(os.path.isfile(os.path.join(path, name))
                                   for name in ("tokenizer.json", "tokenizer.model")):
    raise ValueError(f"{path_name}={path} holds no tokenizer.json or tokenizer.model; name "
                     f"one with {tokenizer_name}")
  model, _ = load_hf(path, dtype=dtype)
  return model, get_tokenizer(str(tokenizer) if tokenizer is not None else path)
