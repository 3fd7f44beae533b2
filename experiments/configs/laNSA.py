"""laNSA: Gated DeltaNet on even layers, Native Sparse Attention on odd ones.

Default: the tiny preset on the embedded corpus (16-token blocks, 4 selected, window 64).
    python -m experiments.train --config=laNSA --workdir=/tmp/lansa
The paper's shapes: --config.size=0.4B or 1.4B (64-token blocks, 16 selected, window 512).
"""
from __future__ import annotations

from experiments.configs.base import get_base_config


def get_config():
  config = get_base_config()
  config.arch = "laNSA"
  return config
