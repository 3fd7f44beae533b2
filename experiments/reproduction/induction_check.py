r"""Can a model of the study learn to copy at all? A retrieval sanity check in minutes on a CPU.

    python -m experiments.reproduction.induction_check --archs=transformer,GDN_Attn --steps=400

Each sequence is BOS, ``copy_len`` random ids, then the same ids again; the loss is on the
second copy after its first token, where the next id is always the one that followed the
current id in the first copy (an induction head's job). A model whose attention works
drives that loss to ~0 within a few hundred steps; a retrieval study whose models never
copy (experiments/reproduction, REPRODUCTION.md) then lacks training signal, not a
working mixer. Prints a table and writes JSON (--out): per architecture the loss every
--log_every steps, the first logged step under 0.1 nats, and the copy accuracy on a fresh
batch at the end.
"""
from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app, flags
from flax import nnx

from experiments import bench_common
from lte_jax import configs as configs_lib
from lte_jax.data.tokenizers import get_tokenizer
from lte_jax.models import HybridLM

_ARCHS = flags.DEFINE_list("archs", ["transformer", "GDN_Attn", "laLTE", "GDN"],
                           "Architectures to train.")
_SIZE = flags.DEFINE_enum("size", "tiny", list(configs_lib.SIZES), "Model preset.")
_STEPS = flags.DEFINE_integer("steps", 400, "Training steps.", lower_bound=1)
_COPY_LEN = flags.DEFINE_integer("copy_len", 48, "Random ids before the copy.", lower_bound=2)
_BATCH = flags.DEFINE_integer("batch", 16, "Sequences per step.", lower_bound=1)
_LR = flags.DEFINE_float("learning_rate", 1e-3, "AdamW learning rate (constant).")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the parameters and the data.")
_LOG_EVERY = flags.DEFINE_integer("log_every", 50, "Steps between loss readings.",
                                  lower_bound=1)
_OUT = flags.DEFINE_string("out", "induction_check.json", "Where to write the JSON results.")

FIRST_ID, LAST_ID = 10, 200   # random ids: clear of BOS / EOS / pad, inside every vocab
LEARNED = 0.1                 # nats: "copies"


def copy_batch(rng: np.random.Generator, batch: int, copy_len: int, bos_id: int
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """inputs, targets [batch, 2 * copy_len] int32 and the loss mask [2 * copy_len] float32
  (1 on the targets inside the second copy, from its second id on)."""
  x = rng.integers(FIRST_ID, LAST_ID, size=(batch, copy_len))
  ids = np.concatenate([np.full((batch, 1), bos_id), x, x], axis=1).astype(np.int32)
  mask = np.zeros(2 * copy_len, np.float32)
  mask[copy_len + 1:] = 1.0
  return ids[:, :-1], ids[:, 1:], mask


def train_one(arch: str) -> dict:
  cfg = configs_lib.get_config(arch, _SIZE.value)
  model = HybridLM(cfg, rngs=nnx.Rngs(_SEED.value))
  params = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(nnx.state(model, nnx.Param)))
  opt = nnx.Optimizer(model, optax.adamw(_LR.value, b2=0.95, weight_decay=0.0), wrt=nnx.Param)

  def scores(m, x, y, mask):
    logits, _ = m(x)
    nll = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), y)
    hit = (jnp.argmax(logits, -1) == y).astype(jnp.float32)
    norm = mask.sum() * x.shape[0]
    return (nll * mask).sum() / norm, (hit * mask).sum() / norm

  @nnx.jit
  def step(m, opt, x, y, mask):
    (loss, _), grads = nnx.value_and_grad(scores, has_aux=True)(m, x, y, mask)
    opt.update(m, grads)
    return loss

  rng = np.random.default_rng(_SEED.value)
  bos = get_tokenizer("byte").bos_id   # the presets' byte vocabulary
  curve, learned_at, start = [], None, time.time()
  for i in range(1, _STEPS.value + 1):
    loss = step(model, opt, *map(jnp.asarray, copy_batch(rng, _BATCH.value, _COPY_LEN.value,
                                                          bos)))
    if i % _LOG_EVERY.value == 0 or i == _STEPS.value:
      loss = float(loss)
      curve.append([i, loss])
      print(f"{arch}: step {i} copy loss {loss:.4f} ({time.time() - start:.0f} s)", flush=True)
      if learned_at is None and loss < LEARNED:
        learned_at = i
  held_out = np.random.default_rng([_SEED.value, 1])
  x, y, mask = map(jnp.asarray, copy_batch(held_out, _BATCH.value, _COPY_LEN.value, bos))
  loss, acc = nnx.jit(scores)(model, x, y, mask)
  return {"arch": arch, "params": params, "final_loss": float(loss), "copy_acc": float(acc),
          "learned_at": learned_at, "seconds": time.time() - start, "curve": curve}


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  bad = [a for a in _ARCHS.value if a not in configs_lib.ARCHITECTURES]
  if bad:
    raise app.UsageError(f"--archs: {bad[0]!r} is not one of {configs_lib.ARCHITECTURES}")
  rows = [train_one(arch) for arch in _ARCHS.value]
  print(f"\ncopy of {_COPY_LEN.value} ids, batch {_BATCH.value}, {_STEPS.value} steps, "
        f"lr {_LR.value}, preset {_SIZE.value}")
  bench_common.print_table(rows, ["arch", "params", "final_loss", "copy_acc", "learned_at",
                                  "seconds"])
  setup = {"size": _SIZE.value, "steps": _STEPS.value, "copy_len": _COPY_LEN.value,
           "batch": _BATCH.value, "learning_rate": _LR.value, "seed": _SEED.value}
  bench_common.write_json(_OUT.value, {"environment": bench_common.environment(),
                                       "setup": setup, "results": rows})


if __name__ == "__main__":
  app.run(main)
