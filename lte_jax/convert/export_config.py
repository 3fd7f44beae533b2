"""lte_jax ModelConfig -> Hugging Face config.json: the inverse of hf_config.

Formats (the ones the importer reads):
- flash-linear-attention's ``gated_deltanet``: GDN layers, and softmax attention (full:
  mixer 'attn', or sliding window: 'swa') on the layers its ``attn`` spec lists. GDN,
  GDN_SWA, GDN_Attn and transformer (attention on every layer) models.
- the reference's ``hybrid_gated_deltanet``: GDN layers and one ``attn`` spec of
  ``attn_type`` 'lte' or 'nsa'. laLTE, laNSA and NSA (NSA on every layer) models.

``hf_config_for`` builds the dict, then reads it back with ``hf_config.model_config_from_hf``
and compares the result with the model's config: any field that does not come back
equal is one the format cannot express, and is refused with a ValueError naming it.
Fields that do not change what the model computes (dtypes, remat, scan_layers, op
implementations and kernel options, chunk sizes, the init scheme, the LTE score bias
init) are not written and not compared.
"""
from __future__ import annotations

import dataclasses
import json
from typing import Any

from lte_jax import configs as configs_lib
from lte_jax.convert import hf_config

# Fields that change how, not what, the model computes, or only how it was initialised.
_IGNORED = {"dtype", "param_dtype", "remat", "scan_layers", "init", "implementation",
            "plan_options", "chunk_size", "conv_implementation", "scorer_dtype",
            "score_bias_init"}
# LTE controller targets: the formats imply target_kept = buffer_size and target_seq_len =
# max_position_embeddings; they only steer fine-tuning (strict=False drops them).
_TRAINING_ONLY = {"lte.target_kept", "lte.target_seq_len"}
_HINTS = {
    "gdn.norm_eps": "the formats have one norm_eps for the whole model (ModelConfig.norm_eps)",
    "attn.head_dim": "FLA's attention splits hidden_size: head_dim = d_model // num_heads",
    "swa.head_dim": "FLA's attention splits hidden_size: head_dim = d_model // num_heads",
    "lte.head_dim": "the reference's LTE layer splits hidden_size: head_dim = d_model // "
                    "num_heads",
    "lte.target_kept": "the reference's controller keeps buffer_size tokens (target_kept = "
                       "budget); strict=False exports anyway (it only steers fine-tuning)",
    "lte.target_seq_len": "the reference's controller target is per max_position_embeddings "
                          "tokens (target_seq_len = max_position); strict=False exports anyway "
                          "(it only steers fine-tuning)",
}


def _number(x: float) -> int | float:
  """JSON number as the Python configs write it (2 rather than 2.0 where integral)."""
  return int(x) if float(x).is_integer() else float(x)


def model_type_for(config: configs_lib.ModelConfig) -> str:
  """'gated_deltanet' or 'hybrid_gated_deltanet'; ValueError for a mix neither holds."""
  kinds = sorted(set(config.layers) - {"gdn"})
  if not set(kinds) & {"lte", "nsa"}:
    return "gated_deltanet"
  if len(kinds) > 1:
    raise ValueError(f"cannot export ModelConfig.layers with {' and '.join(kinds)} layers: "
                     "the reference's hybrid_gated_deltanet holds GDN layers and one attention "
                     "kind (lte or nsa), and FLA's gated_deltanet has no LTE or NSA layers")
  return "hybrid_gated_deltanet"


def _attention_spec(config: configs_lib.ModelConfig, mixer: str) -> dict:
  cfg = getattr(config, mixer)
  # The formats' attention layers project to hidden_size and split it into heads.
  if cfg.num_heads * cfg.head_dim != config.d_model:
    raise ValueError(f"cannot export ModelConfig.{mixer}.head_dim = {cfg.head_dim}: "
                     f"{_HINTS.get(mixer + '.head_dim', 'head_dim = d_model // num_heads')} "
                     f"= {config.d_model // cfg.num_heads}")
  layers = [i for i, m in enumerate(config.layers) if m == mixer]
  return dict(layers=layers, num_heads=cfg.num_heads, num_kv_heads=cfg.num_kv_heads,
              qkv_bias=False, rope_theta=_number(cfg.rope_theta))


def _specs(config: configs_lib.ModelConfig) -> list[dict]:
  specs = []
  for mixer in ("attn", "swa", "lte", "nsa"):
    if mixer not in config.layers:
      continue
    if mixer == "nsa":  # NSA keeps its own head_dim
      cfg = config.nsa
      spec = dict(attn_type="nsa", layers=[i for i, m in enumerate(config.layers) if m == mixer],
                  num_heads=cfg.num_heads, num_kv_heads=cfg.num_kv_heads, qkv_bias=False,
                  head_dim=cfg.head_dim, block_size=cfg.block_size, block_counts=cfg.block_count,
                  window_size=cfg.window_size or 0, rope_theta=_number(cfg.rope_theta))
    elif mixer == "lte":
      cfg = config.lte
      spec = dict(attn_type="lte", **_attention_spec(config, mixer),
                  window_size=cfg.window_size, buffer_size=cfg.budget, sink_size=cfg.sink_size,
                  conv_size=list(cfg.kernel_sizes), conv_dilation=list(cfg.dilations),
                  dropout_prob=_number(cfg.dropout), routing_method="sigmoid",
                  routing_grad=True, routing_shared="head", l1_lambda_shared="head",
                  **hf_config._CONTROLLER_DEFAULTS)  # pylint: disable=protected-access
    else:
      cfg = getattr(config, mixer)
      if mixer == "attn" and cfg.window_size is not None:
        raise ValueError(f"cannot export ModelConfig.attn.window_size = {cfg.window_size}: the "
                         "formats call windowed attention 'swa' (put the window in "
                         "ModelConfig.swa and name those layers 'swa')")
      spec = dict(**_attention_spec(config, mixer), window_size=cfg.window_size)
    specs.append(spec)
  return specs


def _flat(config: Any, prefix: str = "") -> dict[str, Any]:
  out = {}
  for field in dataclasses.fields(config):
    value = getattr(config, field.name)
    if dataclasses.is_dataclass(value):
      out.update(_flat(value, f"{prefix}{field.name}."))
    else:
      out[prefix + field.name] = value
  return out


def compared_fields(config: configs_lib.ModelConfig, strict: bool = True
                    ) -> dict[str, Any]:
  """The fields of ``config`` a format must carry: those of the mixers its layers use."""
  unused = set(configs_lib.MIXERS) - set(config.layers)
  return {name: value for name, value in _flat(config).items()
          if name.split(".")[-1] not in _IGNORED and name.split(".")[0] not in unused
          and (strict or name not in _TRAINING_ONLY)}


def hf_config_for(config: configs_lib.ModelConfig, *, strict: bool = True
                  ) -> tuple[dict, hf_config.HFLayout]:
  """(config.json dict, the HFLayout the importer reads it with) of ``config``.

  ValueError naming the ModelConfig field when the format cannot hold it; with
  ``strict=False`` the LTE controller targets (``lte.target_kept``, ``lte.target_seq_len``),
  which only steer fine-tuning, may differ from the format's (budget, max_position).
  """
  if not isinstance(config, configs_lib.ModelConfig):
    raise ValueError(f"config must be a lte_jax.configs.ModelConfig, got {type(config).__name__}")
  model_type = model_type_for(config)
  gdn = config.gdn
  hf = dict(model_type=model_type, hidden_size=config.d_model,
            num_hidden_layers=config.num_layers, vocab_size=config.vocab_size,
            max_position_embeddings=config.max_position,
            intermediate_size=config.intermediate_size, hidden_act="swish",
            norm_eps=config.norm_eps, tie_word_embeddings=config.tie_embeddings,
            initializer_range=config.init_std, attn_mode="chunk", num_heads=gdn.num_heads,
            head_dim=gdn.head_dim, expand_v=_number(gdn.expand_v), conv_size=gdn.conv_size,
            use_gate=True, use_short_conv=True, allow_neg_eigval=False)
  if model_type == "gated_deltanet":
    hf["architectures"] = ["GatedDeltaNetForCausalLM"]
  specs = _specs(config)
  # FLA's GatedDeltaNetConfig takes one dict; only a model with both attn and swa layers
  # needs a list (which FLA 0.6.0's model reads, but older configs refuse).
  hf["attn"] = None if not specs else specs[0] if len(specs) == 1 else specs
  hf = json.loads(json.dumps(hf))  # exactly what the file will hold
  try:
    got, layout = hf_config.model_config_from_hf(hf, dtype=config.dtype)
  except ValueError as err:
    raise ValueError(f"cannot export this model as {model_type}: {err}") from err
  want, have = compared_fields(config, strict), compared_fields(got, strict)
  bad = [f"ModelConfig.{name} = {want[name]!r} (the {model_type} file would give "
         f"{have.get(name)!r}{'; ' + _HINTS[name] if name in _HINTS else ''})"
         for name in want if have.get(name) != want[name]]
  if bad:
    raise ValueError(f"cannot export this model as {model_type}: it cannot express "
                     + "; ".join(bad))
  return hf, layout
