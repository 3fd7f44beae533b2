"""Write an lte_jax HybridLM as a Hugging Face directory: the inverse of ``load_hf``.

Every tensor name and layout comes from the importer's own rules (``hf_params.rules_for``
and its ``KINDS``), run backwards: the importer's transform of a kind, applied to an array
of HF element indices, says which HF element each lte_jax element came from, and the
export scatters the parameters back there. There is no second table to drift from the
importer's; for the kinds that copy one HF tensor to every head, the copies must agree.
"""
from __future__ import annotations

import functools
import json
import math
import os
import shutil
import tempfile
from typing import Any, Mapping

import jax
import ml_dtypes
import numpy as np
from flax import nnx

from lte_jax import _checks
from lte_jax import configs as configs_lib
from lte_jax.convert import export_config, export_tokenizer, hf_config, hf_params
from lte_jax.convert.safetensors import SINGLE_FILE, write_safetensors

DTYPES = ("float32", "bfloat16")
# {parameter path: shape} per ModelConfig (an abstract HybridLM, traced once per config).
_expected_shapes = functools.lru_cache(maxsize=16)(hf_params.expected_shapes)
_NUMPY = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16)}


def to_hf_layout(kind: str, x: np.ndarray, name: str = "tensor") -> np.ndarray:
  """The HF array that ``hf_params.KINDS[kind]`` turns into ``x`` (lte_jax layout)."""
  to_hf_shape, convert = hf_params.KINDS[kind]
  shape = tuple(x.shape)
  hf_shape = tuple(to_hf_shape(shape))
  size = math.prod(hf_shape)
  index = np.arange(size, dtype=np.int32 if size < 2 ** 31 else np.int64).reshape(hf_shape)
  source = np.asarray(convert(index, shape)).ravel()  # [lte_jax elements]: their HF element
  if source.shape != (x.size,):
    raise ValueError(f"layout {kind!r} maps {hf_shape} to {np.shape(convert(index, shape))}, "
                     f"not to {name}'s shape {shape}")
  values = np.asarray(x).ravel()
  out = np.empty(size, values.dtype)
  out[source] = values
  covered = np.zeros(size, bool)
  covered[source] = True
  if not covered.all():
    raise ValueError(f"layout {kind!r} does not determine every element of {name} {hf_shape}")
  if source.size != size and not np.array_equal(out[source], values, equal_nan=True):
    raise ValueError(f"{name} holds one tensor for all heads (layout {kind!r}), but the "
                     "model's per-head copies differ")
  return out.reshape(hf_shape)


def _leaf_key(k) -> Any:
  return getattr(k, "key", getattr(k, "idx", k))


def pure_params(model: Any) -> dict:
  """nnx.to_pure_dict of a HybridLM's parameters, or ``model`` if it already is one."""
  if isinstance(model, nnx.Module):
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))
  if isinstance(model, Mapping):
    return dict(model)
  raise ValueError(f"model must be a HybridLM or its parameters (nnx.to_pure_dict), got "
                   f"{type(model).__name__}")


def param_tensors(params: Any, config: configs_lib.ModelConfig, layout: hf_config.HFLayout,
                  dtype: str | None = None) -> dict[str, np.ndarray]:
  """{HF tensor name: array} of ``params`` (nnx.to_pure_dict layout). ``dtype``: 'float32',
  'bfloat16', or None for each parameter's own dtype. ValueError listing missing,
  unexpected or misshapen parameters."""
  flat = {tuple(map(_leaf_key, path)): leaf
          for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]}
  rules = hf_params.rules_for(config, layout)
  shapes = _expected_shapes(config)
  missing = sorted(map(str, set(shapes) - set(flat)))
  unexpected = sorted(map(str, set(flat) - set(shapes)))
  if missing or unexpected:
    raise ValueError(f"the parameters do not match the ModelConfig (layers "
                     f"{'/'.join(config.layers)}, tie_embeddings={config.tie_embeddings}): "
                     f"missing {missing[:10]}, unexpected {unexpected[:10]}")
  bad = [f"{'/'.join(map(str, p))} {tuple(np.shape(flat[p]))} (expected {s})"
         for p, s in shapes.items() if tuple(np.shape(flat[p])) != s]
  if bad:
    raise ValueError("parameters with the wrong shape for the ModelConfig: " + "; ".join(bad[:10]))
  if {r.path for r in rules} != set(shapes) or len(rules) != len(shapes):
    raise ValueError("the Hugging Face rules do not cover this model's parameters exactly once "
                     "(an lte_jax layer changed?)")
  out = {}
  for rule in rules:
    x = np.asarray(jax.device_get(flat[rule.path]))
    want = _NUMPY[dtype] if dtype else x.dtype
    if want not in _NUMPY.values() and want != np.float16:
      raise ValueError(f"parameter {'/'.join(map(str, rule.path))} has dtype {x.dtype}; "
                       f"floating point ({', '.join(DTYPES)}) is needed")
    out[rule.hf_name] = to_hf_layout(rule.kind, x.astype(want), rule.hf_name)
  return out


def controller_tensors(controller: Any, config: configs_lib.ModelConfig) -> dict[str, np.ndarray]:
  """The reference's model.l1_lambda and model.num_kept [LTE layers, KV heads] (float32) of
  a ControllerState or a {'lam', 'kept_ema'} mapping (``Converted.controller``)."""
  if controller is None:
    return {}
  num_lte = sum(m == "lte" for m in config.layers)
  if not num_lte:
    raise ValueError("controller is given but the model has no LTE layers (it must be None)")
  get = controller.get if isinstance(controller, Mapping) else (
      lambda key: getattr(controller, key, None))
  out = {}
  for key, name in zip(("lam", "kept_ema"), hf_params.CONTROLLER_TENSORS):
    value = get(key)
    if value is None:
      raise ValueError(f"controller must be a lte_controller.ControllerState or a mapping with "
                       f"'lam' and 'kept_ema', got {type(controller).__name__} without {key!r}")
    value = np.asarray(jax.device_get(value), np.float32)
    _checks.check_shape(f"controller.{key}", value, (num_lte, config.lte.num_kv_heads),
                        "[LTE layers, KV heads]")
    if not np.isfinite(value).all() or (key == "lam" and (value < 0).any()):
      raise ValueError(f"controller.{key} must be finite{' and >= 0' if key == 'lam' else ''}")
    out[name] = value
  return out


def check_target(path: Any, overwrite: bool) -> str:
  """The absolute ``path``; ValueError if it is a file, or a non-empty directory without
  ``overwrite``."""
  if not isinstance(path, (str, os.PathLike)) or not os.fspath(path):
    raise ValueError(f"path must name the directory to write, got {path!r}")
  path = os.path.abspath(os.fspath(path))
  if os.path.exists(path) and not os.path.isdir(path):
    raise ValueError(f"path {path} is a file, not a directory")
  if os.path.isdir(path) and os.listdir(path) and not overwrite:
    raise ValueError(f"path {path} exists and is not empty; pass overwrite=True to replace it")
  return path


def _move_into_place(stage: str, path: str) -> None:
  """``stage`` becomes ``path``; a directory already there is set aside until then."""
  old = None
  if os.path.isdir(path):
    old = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.replaced-",
                           dir=os.path.dirname(path))
    os.rename(path, os.path.join(old, "dir"))
  try:
    os.rename(stage, path)
  except BaseException:
    if old is not None:
      os.rename(os.path.join(old, "dir"), path)
    raise
  if old is not None:
    shutil.rmtree(old, ignore_errors=True)


def save_hf(model: Any, config: configs_lib.ModelConfig | None, path: str, *,
            tokenizer: Any = None, controller: Any = None, dtype: str | None = None,
            strict: bool = True, overwrite: bool = False) -> str:
  """Write ``model`` as a Hugging Face directory that ``load_hf`` reads back exactly.

  The format follows the layers (``export_config``): FLA's ``gated_deltanet`` for GDN,
  GDN_SWA, GDN_Attn and transformer models, the reference's ``hybrid_gated_deltanet`` for
  laLTE, laNSA and NSA. Written: ``config.json``, ``model.safetensors`` (lm_head only when
  the embeddings are untied) and, with a ``tokenizer``, its files (``export_tokenizer``: a
  tokenizer.json is copied, a SentencePiece model becomes tokenizer.model, the byte
  tokenizer gets an equivalent tokenizer.json, so ``get_tokenizer(path)`` and
  ``experiments.generate --hf_dir`` find it).

  Args:
    model: a HybridLM, or its parameters as nnx.to_pure_dict.
    config: its ModelConfig (None: ``model.config``).
    path: the directory to create; an existing non-empty one needs ``overwrite=True``,
      and is then replaced as a whole.
    tokenizer: None, 'byte', a tokenizer path or a Tokenizer of lte_jax.data.tokenizers.
    controller: the LTE lambda controller (a ControllerState, or {'lam', 'kept_ema'}
      [LTE layers, KV heads]), written as the reference's model.l1_lambda and
      model.num_kept; None writes neither.
    dtype: 'float32' or 'bfloat16' tensors; None keeps the parameters' own dtype.
    strict: False exports an LTE model whose controller targets (target_kept,
      target_seq_len) the format cannot hold; re-imported, they become budget and
      max_position.

  Everything is checked before anything is written (a ModelConfig the format cannot
  express raises ValueError naming the field), then written to a folder beside ``path``
  and renamed, so a failure leaves no partial directory. Returns the absolute path.
  """
  if config is None:
    config = getattr(model, "config", None)
    if config is None:
      raise ValueError("config is needed when model is a parameter dict")
  elif isinstance(getattr(model, "config", None), configs_lib.ModelConfig):
    have, want = (export_config.compared_fields(c) for c in (model.config, config))
    differ = sorted(name for name in set(have) | set(want) if have.get(name) != want.get(name))
    if differ:
      raise ValueError(f"config does not describe model: ModelConfig fields {differ} differ "
                       "from model.config (pass config=None to use model.config)")
  if dtype is not None:
    _checks.check_choice("dtype", dtype, DTYPES)
  path = check_target(path, overwrite)
  hf, layout = export_config.hf_config_for(config, strict=strict)
  extra = controller_tensors(controller, config)
  tok = None if tokenizer is None else export_tokenizer.resolve(tokenizer, config.vocab_size)
  tensors = {**param_tensors(pure_params(model), config, layout, dtype), **extra}
  hf["torch_dtype"] = str(tensors["model.embeddings.weight"].dtype)

  made, folder = [], os.path.dirname(path)
  while not os.path.isdir(folder):  # parent folders to create, removed again on failure
    made.append(folder)
    folder = os.path.dirname(folder)
  stage = None
  try:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    stage = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.exporting-",
                             dir=os.path.dirname(path))
    if tok is not None:
      hf.update(export_tokenizer.write(tok, stage))
    write_safetensors(os.path.join(stage, SINGLE_FILE), tensors, metadata={"format": "pt"})
    with open(os.path.join(stage, "config.json"), "w") as f:
      json.dump(hf, f, indent=2)
    _move_into_place(stage, path)
  except BaseException:
    if stage is not None:
      shutil.rmtree(stage, ignore_errors=True)
    for folder in made:  # innermost first, if still empty
      try:
        os.rmdir(folder)
      except OSError:
        break
    raise
  return path
