"""NSA: Native Sparse Attention in every layer (the reference's nsa_0.4B / nsa_1.4B).

Default: the tiny preset on the embedded corpus (16-token blocks, 4 selected, window 64).
    python -m experiments.train --config=NSA --workdir=/tmp/nsa
The paper's shapes: --config.size=0.4B or 1.4B (32 q / 2 kv heads of 64, 64-token
blocks, 16 selected, window 512); the paper's training recipe: --config.recipe=paper.
"""
from __future__ import annotations

from experiments.configs.base import get_base_config


def get_config():
  config = get_base_config()
  config.arch = "NSA"
  return config
