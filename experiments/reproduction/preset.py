"""Study presets: one model shape, data mixture, schedule and evaluation for every architecture.

The paper's windows are fixed at its training length of 4096 tokens (PAPER.md section 5):
LTE window 768, 4 sinks, budget (and controller target) 512; SWA 1024 visible tokens; NSA
blocks of 64, 16 selected, window 512. ``scaled_windows(T)`` keeps each in the same
proportion to the study's training length T, so a model of the study sees as much (or as
little) of its context through each mechanism as the paper's does of 4096 tokens.

Every architecture gets the same depth, width, data, steps and optimiser; only the mixer
differs. ``small`` is sized to train all models of the study on one H100 / H200 in about 20
minutes; ``smoke`` runs the same pipeline on a CPU in about a minute (tests).
"""
from __future__ import annotations

import dataclasses
import math

from lte_jax import configs as configs_lib

PAPER_SEQ_LEN = 4096
# The paper's windows at PAPER_SEQ_LEN (the reference 0.4B / 1.4B configs).
PAPER_WINDOWS = {"lte_window": 768, "lte_sinks": 4, "lte_budget": 512, "swa_window": 1024,
                 "nsa_block": 64, "nsa_window": 512}
NSA_BLOCK_COUNT = 16   # selected blocks: a count, not a length, so it stays
STUDY_ARCHS = ("GDN", "GDN_SWA", "GDN_Attn", "laLTE", "laNSA", "transformer")
# Architectures with a cache of constant size (the claim of the paper is about these).
CONSTANT_MEMORY = ("GDN", "GDN_SWA", "laLTE")


def scaled_windows(seq_len: int) -> dict[str, int]:
  """PAPER_WINDOWS scaled by seq_len / 4096 (rounded; sinks at least 1, NSA blocks >= 4)."""
  r = seq_len / PAPER_SEQ_LEN
  out = {name: max(1, round(value * r)) for name, value in PAPER_WINDOWS.items()}
  out["nsa_block"] = max(4, out["nsa_block"])
  return out


@dataclasses.dataclass(frozen=True)
class StudyPreset:
  """One study size. Lengths in tokens (byte tokenizer: one token a UTF-8 byte)."""
  name: str
  seq_len: int
  d_model: int
  num_layers: int
  gdn_heads: int
  gdn_head_dim: int
  attn_heads: int          # attention and LTE: multi-head, as the paper's 0.4B
  attn_head_dim: int
  nsa_heads: int           # NSA: GQA with 2 KV heads, as the paper's
  nsa_kv_heads: int
  steps: int
  batch_size: int
  learning_rate: float
  warmup_steps: int
  # documents by count; mean lengths differ (README of the report gives token shares)
  mixture: tuple[tuple[str, float], ...]
  mqar_seq_len: int
  mqar_num_pairs: int
  eval_multiples: tuple[int, ...]      # NIAH / perplexity lengths, x seq_len
  eval_samples: int                    # per NIAH task and length
  mqar_lengths_pairs: tuple[tuple[int, int], ...]
  mqar_samples: int
  greedy_samples: int                  # per NIAH task, at 1x: generation beside teacher forcing
  ppl_rows: int
  eval_batch: int
  seeds_twice: tuple[str, ...]         # archs trained with a second seed
  log_every: int
  checkpoint_every: int
  dtype: str = "bfloat16"

  @property
  def eval_lengths(self) -> tuple[int, ...]:
    return tuple(m * self.seq_len for m in self.eval_multiples)

  @property
  def tokens_per_model(self) -> int:
    return self.steps * self.batch_size * self.seq_len


_SMALL = StudyPreset(
    name="small", seq_len=2048, d_model=384, num_layers=8, gdn_heads=3, gdn_head_dim=128,
    attn_heads=6, attn_head_dim=64, nsa_heads=12, nsa_kv_heads=2,
    steps=1500, batch_size=16, learning_rate=1e-3, warmup_steps=100,
    mixture=(("corpus", 0.1), ("niah", 0.55), ("mqar", 0.35)),
    mqar_seq_len=512, mqar_num_pairs=32, eval_multiples=(1, 2, 4), eval_samples=200,
    mqar_lengths_pairs=((512, 16), (512, 32), (512, 64), (2048, 64), (2048, 127)),
    mqar_samples=200, greedy_samples=48, ppl_rows=32, eval_batch=8,
    seeds_twice=("laLTE", "GDN_SWA"), log_every=20, checkpoint_every=500)

PRESETS = {
    "small": _SMALL,
    # 'small' at half the length and fewer steps: the controls' check in ~9 minutes of an
    # H100 for three models at once (measured: ~200K tokens/s over all models together).
    "pilot": dataclasses.replace(
        _SMALL, name="pilot", seq_len=1024, steps=1300, eval_samples=100,
        mqar_lengths_pairs=((512, 32), (1024, 64)), mqar_samples=100, greedy_samples=32,
        ppl_rows=16, checkpoint_every=1300),
    "smoke": StudyPreset(
        name="smoke", seq_len=512, d_model=32, num_layers=2, gdn_heads=1, gdn_head_dim=32,
        attn_heads=2, attn_head_dim=16, nsa_heads=2, nsa_kv_heads=1,
        steps=4, batch_size=2, learning_rate=1e-3, warmup_steps=1,
        mixture=(("corpus", 0.4), ("niah", 0.3), ("mqar", 0.3)),
        mqar_seq_len=64, mqar_num_pairs=4, eval_multiples=(1,), eval_samples=2,
        mqar_lengths_pairs=((64, 4),), mqar_samples=2, greedy_samples=1, ppl_rows=2,
        eval_batch=2, seeds_twice=(), log_every=2, checkpoint_every=2,
        dtype="float32"),
}


def get_preset(name: str) -> StudyPreset:
  if name not in PRESETS:
    raise ValueError(f"preset must be one of {tuple(PRESETS)}, got {name!r}")
  return PRESETS[name]


def model_config(preset: StudyPreset, arch: str) -> configs_lib.ModelConfig:
  """The ModelConfig of ``arch`` at this preset (byte vocabulary of 512 ids)."""
  if arch not in STUDY_ARCHS:
    raise ValueError(f"arch must be one of {STUDY_ARCHS}, got {arch!r}")
  p, w = preset, scaled_windows(preset.seq_len)
  attn = dict(num_heads=p.attn_heads, num_kv_heads=p.attn_heads, head_dim=p.attn_head_dim)
  return configs_lib.get_config(
      arch, "tiny", vocab_size=512, d_model=p.d_model, num_layers=p.num_layers,
      intermediate_size=configs_lib.intermediate_size(p.d_model), tie_embeddings=True,
      max_position=max(p.eval_lengths),
      gdn=configs_lib.GDNConfig(num_heads=p.gdn_heads, head_dim=p.gdn_head_dim),
      attn=configs_lib.AttentionConfig(**attn),
      swa=configs_lib.AttentionConfig(**attn, window_size=w["swa_window"]),
      lte=configs_lib.LTEConfig(**attn, sink_size=w["lte_sinks"], window_size=w["lte_window"],
                                budget=w["lte_budget"], target_kept=w["lte_budget"],
                                target_seq_len=p.seq_len),
      nsa=configs_lib.NSAConfig(num_heads=p.nsa_heads, num_kv_heads=p.nsa_kv_heads,
                                head_dim=p.attn_head_dim, block_size=w["nsa_block"],
                                block_count=NSA_BLOCK_COUNT, window_size=w["nsa_window"]),
      dtype=p.dtype)


def runs(preset: StudyPreset, archs: tuple[str, ...], seeds: int) -> list[tuple[str, int]]:
  """(arch, seed) of every model: ``seeds`` seeds for the archs of seeds_twice (at least 2
  there), one for the others."""
  out = []
  for arch in archs:
    count = max(seeds, 2) if arch in preset.seeds_twice else 1
    out += [(arch, s) for s in range(count)]
  return out


def controller_steps_to_target(lam_init: float = 1e-9, lam_needed: float = 1e-2,
                               up: float = 1.5, every: int = 32) -> int:
  """Steps the lambda controller needs to grow lambda from lam_init to lam_needed at its
  fastest (x up every ``every`` steps): why a study shorter than this cannot show it."""
  return every * math.ceil(math.log(lam_needed / lam_init) / math.log(up))
