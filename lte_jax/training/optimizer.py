"""AdamW with warm-up + cosine schedule, global-norm clipping and a weight-decay mask.

The recipe of the reference trainer (PAPER.md section 5): lr 3e-4, betas
0.9/0.95, eps 1e-15, weight decay 0.1, 512 linear warm-up steps, cosine decay
to 0.1 x peak, clip 1.0. Weight decay applies to the matrices only
(``weight_decay_mask='matrices'``, the default) or, as in the reference's one
parameter group, to every parameter (``'all'``). Gradient accumulation and the
skipping of non-finite steps (``nonfinite``) live in the train step
(training/step.py), not here, so one call of the optimizer is one update.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import optax

# Parameters never decayed under 'matrices', whatever their rank: biases (every name holding
# 'bias': bias, dt_bias, the LTE scorer's per-head conv_biases [Hkv, C] and proj_bias) and
# A_log; the GDN decay parameters are log-rates and offsets, shrinking them towards 0 would
# change the decay prior.
NO_DECAY_NAMES = ("A_log",)
NO_DECAY_SUBSTRING = "bias"
# Which parameters weight decay shrinks (OptimizerConfig.weight_decay_mask): 'matrices' (rank
# >= 2, no norms, biases, A_log or dt_bias) or 'all' (the reference trainer: one parameter
# group, norms, biases, A_log and dt_bias decayed too).
WEIGHT_DECAY_MASKS = ("matrices", "all")
# What a step with a non-finite loss or gradient norm does (OptimizerConfig.nonfinite), the
# parameters and Adam moments staying as they were either way:
#   'skip_step'   nothing else moves either: the learning-rate schedule and the LTE controller
#                 (lambda, kept EMA, its step) wait for the next applied update;
#   'skip_update' the reference trainer: the schedule advances and the LTE controller takes
#                 the step's kept counts, as its lr_scheduler.step() and lambda update run
#                 whether or not optimizer.step() was skipped.
NONFINITE_MODES = ("skip_step", "skip_update")


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
  learning_rate: float = 3e-4
  b1: float = 0.9
  b2: float = 0.95
  eps: float = 1e-15
  weight_decay: float = 0.1
  warmup_steps: int = 512
  final_lr_ratio: float = 0.1   # cosine ends at final_lr_ratio x learning_rate
  clip_norm: float = 1.0        # <= 0 disables clipping
  weight_decay_mask: str = "matrices"   # WEIGHT_DECAY_MASKS
  nonfinite: str = "skip_step"          # NONFINITE_MODES (applied by training/step.py)

  def __post_init__(self):
    if not self.learning_rate > 0:
      raise ValueError(f"optim.learning_rate must be > 0, got {self.learning_rate!r}")
    if not (0 <= self.b1 < 1 and 0 <= self.b2 < 1):
      raise ValueError(f"optim.b1 and optim.b2 must be in [0, 1), got {self.b1!r}, {self.b2!r}")
    if not self.eps >= 0 or not self.weight_decay >= 0:
      raise ValueError(f"optim.eps and optim.weight_decay must be >= 0, got {self.eps!r}, "
                       f"{self.weight_decay!r}")
    if not isinstance(self.warmup_steps, int) or self.warmup_steps < 0:
      raise ValueError(f"optim.warmup_steps must be an integer >= 0, got {self.warmup_steps!r}")
    if not 0 <= self.final_lr_ratio <= 1:
      raise ValueError(f"optim.final_lr_ratio must be in [0, 1], got {self.final_lr_ratio!r}")
    if self.weight_decay_mask not in WEIGHT_DECAY_MASKS:
      raise ValueError(f"optim.weight_decay_mask must be one of {WEIGHT_DECAY_MASKS}, got "
                       f"{self.weight_decay_mask!r}")
    if self.nonfinite not in NONFINITE_MODES:
      raise ValueError(f"optim.nonfinite must be one of {NONFINITE_MODES}, got "
                       f"{self.nonfinite!r}")


def learning_rate_schedule(cfg: OptimizerConfig, total_steps: int) -> optax.Schedule:
  """Linear warm-up from 0 over ``warmup_steps``, then cosine to final_lr_ratio x peak."""
  if not isinstance(total_steps, int) or total_steps < 1:
    raise ValueError(f"steps must be a positive integer, got {total_steps!r}")
  if cfg.warmup_steps >= total_steps:
    raise ValueError(f"optim.warmup_steps ({cfg.warmup_steps}) must be smaller than steps "
                     f"({total_steps}); lower it with --config.optim.warmup_steps")
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=cfg.learning_rate, warmup_steps=cfg.warmup_steps,
      decay_steps=total_steps, end_value=cfg.final_lr_ratio * cfg.learning_rate)


def _key_name(entry: Any) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(entry, attr):
      return str(getattr(entry, attr))
  return str(entry)


def param_path(path: tuple) -> str:
  """'blocks/1/mixer/A_log' for a jax tree path."""
  return "/".join(_key_name(p) for p in path)


def decays(path: str, ndim: int, mode: str = "matrices") -> bool:
  """Whether the parameter at ``path`` gets weight decay under ``mode`` (WEIGHT_DECAY_MASKS)."""
  if mode not in WEIGHT_DECAY_MASKS:
    raise ValueError(f"mode must be one of {WEIGHT_DECAY_MASKS}, got {mode!r}")
  if mode == "all":
    return True
  names = path.split("/")
  if ndim < 2 or any(n in NO_DECAY_NAMES or NO_DECAY_SUBSTRING in n.lower() for n in names):
    return False
  return not any("norm" in n.lower() for n in names)


def weight_decay_mask(params: Any, mode: str = "matrices") -> Any:
  """Pytree of bools like ``params``: True where weight decay applies under ``mode``."""
  return jax.tree_util.tree_map_with_path(
      lambda path, x: decays(param_path(path), x.ndim, mode), params)


def _is_schedule(x: Any) -> bool:
  return isinstance(x, optax.ScaleByScheduleState)


def schedule_count(opt_state: Any) -> jax.Array | None:
  """int32 []: the learning-rate schedule's step count (the step its next update reads);
  None for an optimizer state without a schedule (optax.ScaleByScheduleState)."""
  found = [x for x in jax.tree.leaves(opt_state, is_leaf=_is_schedule) if _is_schedule(x)]
  return found[0].count if found else None


def advance_schedule(opt_state: Any) -> Any:
  """``opt_state`` with the learning-rate schedule's step count one further, nothing else
  changed (Adam's own count, which its bias correction reads, stays: the update was not
  made). What OptimizerConfig.nonfinite='skip_update' does on a skipped step."""
  if schedule_count(opt_state) is None:
    raise ValueError("opt_state holds no learning-rate schedule (optax.ScaleByScheduleState); "
                     "build the optimizer with make_optimizer")
  return jax.tree.map(lambda x: x._replace(count=x.count + 1) if _is_schedule(x) else x,
                      opt_state, is_leaf=_is_schedule)


def make_optimizer(cfg: OptimizerConfig,
                   total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """The optax chain and its learning-rate schedule (for logging).

  The decay mask is a function of the parameters under both ``weight_decay_mask``
  settings, so the optimizer state has the same structure either way.
  """
  schedule = learning_rate_schedule(cfg, total_steps)
  mask = functools.partial(weight_decay_mask, mode=cfg.weight_decay_mask)
  adamw = optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                      weight_decay=cfg.weight_decay, mask=mask)
  if cfg.clip_norm > 0:
    return optax.chain(optax.clip_by_global_norm(cfg.clip_norm), adamw), schedule
  return adamw, schedule
