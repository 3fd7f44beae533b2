"""Hugging Face checkpoints of flash-linear-attention's ``gated_deltanet`` and the
reference's ``hybrid_gated_deltanet``, into lte_jax (``load_hf``) and out of it
(``save_hf``); see CONFORMANCE.md."""
from lte_jax.convert.export import save_hf
from lte_jax.convert.export_config import hf_config_for
from lte_jax.convert.hf_config import HFLayout, MODEL_TYPES, model_config_from_hf, read_config
from lte_jax.convert.hf_params import map_tensors, rules_for
from lte_jax.convert.load import Converted, convert_hf, load_hf, load_hf_with_tokenizer
from lte_jax.convert.safetensors import read_checkpoint, read_safetensors, write_safetensors

__all__ = ["Converted", "HFLayout", "MODEL_TYPES", "convert_hf", "hf_config_for", "load_hf",
           "load_hf_with_tokenizer",
           "map_tensors", "model_config_from_hf", "read_checkpoint", "read_config",
           "read_safetensors", "rules_for", "save_hf", "write_safetensors"]
