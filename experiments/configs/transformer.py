"""Transformer: every layer full causal attention (RoPE, SwiGLU).

    python -m experiments.train --config=transformer --workdir=/tmp/transformer
"""
from __future__ import annotations

from experiments.configs.base import get_base_config


def get_config():
  config = get_base_config()
  config.arch = "transformer"
  return config
