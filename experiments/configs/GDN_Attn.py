"""GDN+Attn: Gated DeltaNet on even layers, full causal attention on odd ones.

    python -m experiments.train --config=GDN_Attn --workdir=/tmp/gdn_attn
"""
from __future__ import annotations

from experiments.configs.base import get_base_config


def get_config():
  config = get_base_config()
  config.arch = "GDN_Attn"
  return config
