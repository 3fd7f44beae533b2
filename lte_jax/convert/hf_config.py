"""Hugging Face config.json of a (hybrid) Gated DeltaNet LM -> lte_jax ModelConfig.

Two model types are read: flash-linear-attention's ``gated_deltanet`` (GDN layers, and
softmax attention on the layers an ``attn`` spec lists; 0.6.0 also takes a list of specs)
and the reference's ``hybrid_gated_deltanet`` (one ``attn`` spec whose ``attn_type`` is
'attn', 'lte' or 'nsa'). Every option that would change what the model computes and that
lte_jax does not implement is rejected with a ValueError naming the field; options that
only change training (loss kernels, the LTE lambda controller) are accepted and listed in
``HFLayout.notes``.

Conventions carried over unchanged (checked against both code bases):
- softmax attention ``window_size`` = visible tokens including the current one (flash-attn
  is called with window (W - 1, 0)) = AttentionConfig.window_size;
- LTE ``window_size`` = the largest distance w (its ring holds w + 1 tokens) =
  LTEConfig.window_size; ``buffer_size`` = LTEConfig.budget;
- attention and LTE layers use head_dim = hidden_size // num_heads; NSA has its own head_dim.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any, Mapping

from lte_jax import configs as configs_lib

MODEL_TYPES = ("gated_deltanet", "hybrid_gated_deltanet")

# Keys an attention spec may carry, per attn_type. Anything else is refused: FLA ignores
# unknown keys, but a key we do not know might be one a newer version honours.
_COMMON_KEYS = {"layers", "num_heads", "num_kv_heads", "qkv_bias", "window_size", "rope_theta",
                "attn_type"}
_LTE_KEYS = _COMMON_KEYS | {
    "conv_size", "conv_dilation", "dropout_prob", "buffer_size", "sink_size", "routing_method",
    "routing_grad", "routing_shared", "routing_freeze_steps", "receptive_margin",
    "l1_lambda_init", "l1_lambda_min", "l1_lambda_max", "l1_alpha", "l1_alpha_neg",
    "l1_warmup_steps", "l1_lambda_initial_steps", "l1_lambda_update_steps", "l1_lambda_shared",
    "l1_lambda_tolerate"}
_NSA_KEYS = _COMMON_KEYS | {"head_dim", "block_size", "block_counts"}
# The lambda controller of lte_jax.lte_controller has these settings fixed; a reference
# model trained with others still converts (they do not change the model), with a note.
_CONTROLLER_DEFAULTS = {
    "l1_lambda_init": 1e-9, "l1_lambda_min": 1e-9, "l1_lambda_max": 1.0, "l1_alpha": 1.5,
    "l1_alpha_neg": 2, "l1_lambda_update_steps": 32, "l1_lambda_tolerate": [0.95, 1.0],
    "l1_warmup_steps": 0, "l1_lambda_initial_steps": 0, "routing_freeze_steps": 0}
LTE_ROUTING_SHARED = ("head", "layer")


@dataclasses.dataclass(frozen=True)
class HFLayout:
  """What the tensor mapping needs besides the ModelConfig.

  lte_routing_shared: 'head' (one scorer CNN per KV head, a grouped conv) or 'layer'
    (one CNN per layer shared by its heads; copied to every head); None without LTE.
  notes: accepted settings that differ from lte_jax's training defaults.
  """
  model_type: str
  lte_routing_shared: str | None = None
  notes: tuple[str, ...] = ()


def read_config(directory: str) -> dict:
  path = os.path.join(directory, "config.json")
  if not os.path.isfile(path):
    raise ValueError(f"{directory} has no config.json (a Hugging Face model directory is needed)")
  with open(path) as f:
    try:
      data = json.load(f)
    except json.JSONDecodeError as err:
      raise ValueError(f"{path} is not valid JSON: {err}") from err
  if not isinstance(data, dict):
    raise ValueError(f"{path} must hold a JSON object")
  return data


def _need(cond: bool, field: str, allowed: str, value: Any) -> None:
  if not cond:
    raise ValueError(f"config.json field {field} = {value!r} is not supported: lte_jax needs "
                     f"{allowed}")


_REQUIRED = object()


def _int(hf: Mapping, key: str, default: Any = _REQUIRED, where: str = "") -> int:
  """hf[key], a positive integer; without a ``default`` the key must be present."""
  if key not in hf and default is _REQUIRED:
    raise ValueError(f"config.json has no field {where}{key} (a positive integer is required)")
  value = hf.get(key, default)
  _need(isinstance(value, int) and not isinstance(value, bool) and value > 0, where + key,
        "a positive integer", value)
  return value


def _number(hf: Mapping, key: str, default: float, where: str = "") -> float:
  """hf[key] (``default`` when absent), a positive int or float."""
  value = hf.get(key, default)
  _need(isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0,
        where + key, "a positive number", value)
  return float(value)


def _bool(hf: Mapping, key: str, default: bool) -> bool:
  value = hf.get(key, default)
  _need(isinstance(value, bool), key, "true or false", value)
  return value


def _int_list(spec: Mapping, key: str, default: list) -> list:
  """spec[key] (``default`` when absent or null): a non-empty list of positive integers."""
  value = spec.get(key) or default
  _need(isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) and v > 0
                                        for v in value), "attn." + key,
        "a list of positive integers", value)
  return value


def _intermediate_size(hf: Mapping, d_model: int) -> int:
  """FLA's GatedMLP rule: 2/3 x hidden_ratio x d, rounded up to a multiple of 256."""
  if hf.get("intermediate_size") is not None:
    return _int(hf, "intermediate_size")
  ratio = 4 if hf.get("hidden_ratio") is None else _number(hf, "hidden_ratio", 4)
  return 256 * math.ceil(int(d_model * ratio * 2 / 3) / 256)


def _gdn_config(hf: Mapping) -> configs_lib.GDNConfig:
  _need(hf.get("use_short_conv", True) is True, "use_short_conv", "true (q/k/v short convs)",
        hf.get("use_short_conv"))
  # lte_jax's GatedDeltaNet always applies the gated output norm.
  _need(hf.get("use_gate", True) is True, "use_gate", "true (the gated output RMSNorm)",
        hf.get("use_gate"))
  _need(not hf.get("allow_neg_eigval", False), "allow_neg_eigval",
        "false (beta = sigmoid(b), not 2 sigmoid(b))", hf.get("allow_neg_eigval"))
  num_heads = _int(hf, "num_heads", 6)
  _need(hf.get("num_v_heads") in (None, num_heads), "num_v_heads",
        f"null or num_heads={num_heads} (no grouped value heads)", hf.get("num_v_heads"))
  _need(hf.get("output_gate_activation", "swish") in ("swish", "silu"), "output_gate_activation",
        "'swish' or 'silu'", hf.get("output_gate_activation"))
  _need(hf.get("attnres_block_size") is None, "attnres_block_size",
        "null (no attention residuals)", hf.get("attnres_block_size"))
  _need(hf.get("attn_mode", "chunk") in ("chunk", "fused_recurrent"), "attn_mode",
        "'chunk' or 'fused_recurrent' (the same function)", hf.get("attn_mode"))
  return configs_lib.GDNConfig(num_heads=num_heads, head_dim=_int(hf, "head_dim", 256),
                               expand_v=_number(hf, "expand_v", 2.0),
                               conv_size=_int(hf, "conv_size", 4), use_gate=True,
                               norm_eps=_number(hf, "norm_eps", 1e-6))


def _attention_common(spec: Mapping, d_model: int, kind: str) -> dict:
  where = f"attn.{kind}."
  num_heads = _int(spec, "num_heads", where=where)
  num_kv_heads = spec.get("num_kv_heads")
  num_kv_heads = num_heads if num_kv_heads is None else _int(spec, "num_kv_heads", where=where)
  _need(spec.get("qkv_bias", False) is False, where + "qkv_bias", "false (no q/k/v biases)",
        spec.get("qkv_bias"))
  return dict(num_heads=num_heads, num_kv_heads=num_kv_heads,
              rope_theta=_number(spec, "rope_theta", 10000.0, where=where))


def _head_dim(d_model: int, num_heads: int, where: str) -> int:
  # FLA's Attention and the reference LTE layer project to hidden_size and split it.
  _need(d_model % num_heads == 0, where + "num_heads",
        f"a divisor of hidden_size={d_model} (head_dim = hidden_size // num_heads)", num_heads)
  return d_model // num_heads


def _lte_config(spec: Mapping, d_model: int, max_position: int, notes: list) -> tuple:
  common = _attention_common(spec, d_model, "lte")
  _need(spec.get("routing_method", "relu") == "sigmoid", "attn.routing_method",
        "'sigmoid' (r = sigmoid(logit) - 0.5)", spec.get("routing_method", "relu"))
  shared = spec.get("routing_shared", "head")
  _need(shared in LTE_ROUTING_SHARED, "attn.routing_shared",
        f"one of {LTE_ROUTING_SHARED} ('all' shares one CNN across layers)", shared)
  window = _int(spec, "window_size", 512, where="attn.")
  budget = _int(spec, "buffer_size", 512, where="attn.")
  kernels = _int_list(spec, "conv_size", [3, 3, 3])
  dilations = _int_list(spec, "conv_dilation", [1, 1, 1])
  dropout = spec.get("dropout_prob", 0.0)
  _need(isinstance(dropout, (int, float)) and not isinstance(dropout, bool) and
        0 <= dropout < 1, "attn.dropout_prob", "a number in [0, 1)", dropout)
  if spec.get("routing_grad", True) is not True:
    notes.append("attn.routing_grad=false: the reference detached the scorer input; lte_jax "
                 "trains the scorer through k and v when fine-tuning")
  for key, value in _CONTROLLER_DEFAULTS.items():
    if key in spec and spec[key] != value:
      notes.append(f"attn.{key}={spec[key]!r} differs from lte_jax's lambda controller "
                   f"({value!r}); it only matters for fine-tuning")
  cfg = configs_lib.LTEConfig(
      head_dim=_head_dim(d_model, common["num_heads"], "attn."),
      sink_size=spec.get("sink_size", 4), window_size=window, budget=budget,
      kernel_sizes=tuple(kernels), dilations=tuple(dilations),
      dropout=float(dropout), target_kept=budget,
      target_seq_len=max_position, **common)
  return cfg, shared


def _nsa_config(spec: Mapping, d_model: int):
  from lte_jax.models import hybrid_lm  # pylint: disable=g-import-not-at-top
  nsa_cls = getattr(configs_lib, "NSAConfig", None)
  if nsa_cls is None or "nsa" not in hybrid_lm.MIXER_REGISTRY:
    raise ValueError("config.json has NSA layers (attn.attn_type='nsa') but this lte_jax has no "
                     "NSA mixer (lte_jax/layers/nsa.py); NSA checkpoints cannot be converted yet")
  common = _attention_common(spec, d_model, "nsa")
  counts = spec.get("block_counts", 16)
  _need(isinstance(counts, int) and not isinstance(counts, bool), "attn.block_counts",
        "one integer (the same count for every query)", counts)
  window = spec.get("window_size", 512)
  return nsa_cls(head_dim=_int(spec, "head_dim", 64, where="attn."),
                 block_size=_int(spec, "block_size", 64, where="attn."), block_count=counts,
                 window_size=None if not window else window, **common)


def model_config_from_hf(hf: Mapping[str, Any], *, dtype: str = "float32"
                         ) -> tuple[configs_lib.ModelConfig, HFLayout]:
  """(ModelConfig, HFLayout) of a config.json dict. ``dtype``: compute dtype of the model."""
  model_type = hf.get("model_type")
  if model_type not in MODEL_TYPES:
    raise ValueError(f"config.json model_type must be one of {MODEL_TYPES}, got {model_type!r}")
  # FLA documents defaults for these three too, but they fix every tensor's shape: a
  # config.json without them describes some other checkpoint, so none is assumed.
  d_model = _int(hf, "hidden_size")
  num_layers = _int(hf, "num_hidden_layers")
  vocab_size = _int(hf, "vocab_size")
  max_position = _int(hf, "max_position_embeddings", 2048)
  _need(hf.get("hidden_act", "swish") in ("swish", "silu"), "hidden_act",
        "'swish' (SwiGLU MLP)", hf.get("hidden_act"))
  norm_eps = _number(hf, "norm_eps", 1e-6)

  attn = hf.get("attn")
  if attn is None:
    specs = []
  elif isinstance(attn, dict):
    specs = [attn]
  elif isinstance(attn, list) and model_type == "gated_deltanet":
    specs = attn
  else:
    allowed = "null, a dict or a list of dicts" if model_type == "gated_deltanet" else \
        "null or a dict"
    raise ValueError(f"config.json field attn must be {allowed} for model_type {model_type}, "
                     f"got {type(attn).__name__}")

  layers = ["gdn"] * num_layers
  mixers: dict[str, Any] = {}
  notes: list[str] = []
  shared = None
  for spec in specs:
    if not isinstance(spec, dict):
      raise ValueError(f"config.json attn specs must be dicts, got {spec!r}")
    kind = spec.get("attn_type", "attn")
    allowed = ("attn",) if model_type == "gated_deltanet" else ("attn", "lte", "nsa")
    _need(kind in allowed, "attn.attn_type", f"one of {allowed} for model_type {model_type}", kind)
    keys = {"attn": _COMMON_KEYS, "lte": _LTE_KEYS, "nsa": _NSA_KEYS}[kind]
    unknown = sorted(set(spec) - keys)
    if unknown:
      raise ValueError(f"config.json attn spec has keys lte_jax does not know: {unknown} "
                       f"(known for attn_type {kind!r}: {sorted(keys)})")
    if kind == "attn":
      common = _attention_common(spec, d_model, "attn")
      window = spec.get("window_size")
      if window is not None:
        _int(spec, "window_size", where="attn.")
      mixer = "attn" if window is None else "swa"
      cfg = configs_lib.AttentionConfig(head_dim=_head_dim(d_model, common["num_heads"], "attn."),
                                        window_size=window, **common)
    elif kind == "lte":
      mixer = "lte"
      cfg, shared = _lte_config(spec, d_model, max_position, notes)
    else:
      mixer = "nsa"
      cfg = _nsa_config(spec, d_model)
    if mixer in mixers and mixers[mixer] != cfg:
      raise ValueError(f"config.json attn specs give two different {mixer!r} layer settings; "
                       "lte_jax has one setting per mixer kind")
    mixers[mixer] = cfg
    layer_ids = spec.get("layers")
    if not isinstance(layer_ids, (list, tuple)):
      raise ValueError(f"config.json attn.layers must be a list of layer indices, "
                       f"got {layer_ids!r}")
    for i in layer_ids:
      _need(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < num_layers, "attn.layers",
            f"indices in [0, {num_layers})", i)
      _need(layers[i] == "gdn", "attn.layers", "each layer in at most one spec", i)
      layers[i] = mixer

  config = configs_lib.ModelConfig(
      vocab_size=vocab_size, d_model=d_model, layers=tuple(layers),
      intermediate_size=_intermediate_size(hf, d_model), gdn=_gdn_config(hf),
      tie_embeddings=_bool(hf, "tie_word_embeddings", False), norm_eps=norm_eps,
      init_std=_number(hf, "initializer_range", 0.02), max_position=max_position,
      dtype=dtype, param_dtype="float32", **mixers)
  return config, HFLayout(model_type=model_type, lte_routing_shared=shared, notes=tuple(notes))
