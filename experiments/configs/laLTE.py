"""laLTE: Gated DeltaNet on even layers, LTE sparse attention on odd ones (the paper's model).

Default: the tiny preset on the embedded corpus, a few minutes on a laptop CPU.
    python -m experiments.train --config=laLTE --workdir=/tmp/lalte
"""
from __future__ import annotations

from experiments.configs.base import get_base_config


def get_config():
  config = get_base_config()
  config.arch = "laLTE"
  return config
