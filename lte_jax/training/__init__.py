"""Training: optimizer, train state and step, mesh and shardings, checkpoints, metrics.

experiments/train.py wires these together; each module has one job:
optimizer (AdamW recipe), train_state (the saved pytree and the static model
definition), step (one update), mesh (devices and shardings), checkpoint
(orbax), metrics (JSONL / TensorBoard / progress / MFU), experiment
(ConfigDict -> validated dataclass configs).
"""
from lte_jax.training.checkpoint import Checkpointer, PreemptionGuard
from lte_jax.training.experiment import Experiment, resolve
from lte_jax.training.mesh import (batch_sharding, global_batch, make_mesh,
                                   maybe_initialize_distributed, param_shardings, state_shardings)
from lte_jax.training.metrics import MetricsWriter, Progress, flops_per_token, peak_flops
from lte_jax.training.optimizer import (OptimizerConfig, learning_rate_schedule, make_optimizer,
                                        weight_decay_mask)
from lte_jax.training.step import cross_entropy_sum, make_train_step
from lte_jax.training.train_state import ModelDef, TrainState, init_train_state, make_model_def

__all__ = [
    "Checkpointer", "PreemptionGuard", "Experiment", "resolve", "batch_sharding", "global_batch",
    "make_mesh", "maybe_initialize_distributed", "param_shardings", "state_shardings",
    "MetricsWriter", "Progress", "flops_per_token", "peak_flops", "OptimizerConfig",
    "learning_rate_schedule", "make_optimizer", "weight_decay_mask", "cross_entropy_sum",
    "make_train_step", "ModelDef", "TrainState", "init_train_state", "make_model_def",
]
