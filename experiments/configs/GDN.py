"""GDN: every layer a Gated DeltaNet (the pure linear-attention baseline).

    python -m experiments.train --config=GDN --workdir=/tmp/gdn
"""
from __future__ import annotations

from experiments.configs.base import get_base_config


def get_config():
  config = get_base_config()
  config.arch = "GDN"
  return config
