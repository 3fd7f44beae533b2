"""GDN+SWA: Gated DeltaNet on even layers, sliding-window attention on odd ones.

    python -m experiments.train --config=GDN_SWA --workdir=/tmp/gdn_swa
"""
from __future__ import annotations

from experiments.configs.base import get_base_config


def get_config():
  config = get_base_config()
  config.arch = "GDN_SWA"
  return config
