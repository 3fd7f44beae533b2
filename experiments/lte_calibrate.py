"""Put a fresh laLTE model at a chosen LTE sparsity, for timing (`bench_train --lte_kept=N`).

A fresh scorer's projection bias is 0.5 (PAPER.md section 3: retain everything at the
start), so the first steps of a run attend almost densely. The lambda controller then
drives each (layer, KV head) towards its target of kept tokens (512 per 4096-token
sequence), where a run spends nearly all of its steps; the LTE kernels' cost follows the
kept count. To time that regime without training for it, this shifts every scorer's
projection bias per KV head so that `kept` of the T tokens of each sequence score r > 0 on
a given batch. Each layer's scores depend on the layers below it, so the shift is repeated
for a few rounds.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp


def _logits(r: jax.Array) -> jax.Array:
  """r = sigmoid(logit) - 0.5 -> logit (clipped where fp32's sigmoid saturated)."""
  p = jnp.clip(r.astype(jnp.float32) + 0.5, 1e-7, 1 - 1e-7)
  return jnp.log(p) - jnp.log1p(-p)


def calibrate_kept(model_def: Any, params: Any, batch: dict, kept: int, *,
                   rounds: int = 3) -> tuple[Any, jax.Array]:
  """-> (params with shifted scorer biases, kept [L, H]: tokens per sequence with r > 0
  per LTE layer and KV head after the last shift, measured on `batch`).

  model_def: train_state.ModelDef; params: its pure dict; batch: dict with inputs,
  segment_ids, positions [B, T]; kept: target tokens per sequence, in [1, T)."""
  layers = model_def.lte_layers
  t = batch["inputs"].shape[1]
  if not layers:
    raise ValueError(f"calibrate_kept needs a model with LTE layers; this one has "
                     f"{model_def.config.layers}")
  if not 0 < kept < t:
    raise ValueError(f"kept must be in [1, {t}) for sequences of {t} tokens, got {kept}")

  @jax.jit
  def retention(p):
    model = model_def.bind(p, jax.random.key(0))
    _, aux = model(batch["inputs"], segment_ids=batch["segment_ids"],
                   positions=batch["positions"])
    return jnp.stack(aux["lte_retention"])                     # [L, B, T, H]

  def bias_of(p, i):
    return p["blocks"][i]["mixer"]["scorer"]["proj_bias"]

  for _ in range(rounds):
    logits = _logits(retention(params))
    # Per (layer, head): the logit that `kept` tokens of T exceed, averaged over the batch.
    threshold = jnp.quantile(logits, 1.0 - kept / t, axis=(1, 2))      # [L, H]
    for n, i in enumerate(layers):
      old = bias_of(params, i)
      new = jax.device_put((old - threshold[n]).astype(old.dtype), old.sharding)
      params = _replace_bias(params, i, new)
  r = retention(params)
  return params, jnp.mean((r > 0).astype(jnp.float32), axis=(1, 2)) * t


def _replace_bias(params: Any, block: int, value: jax.Array) -> Any:
  """A copy of the pure-dict params with block `block`'s scorer projection bias replaced."""
  out = dict(params)
  out["blocks"] = dict(params["blocks"])
  b = out["blocks"][block] = dict(params["blocks"][block])
  m = b["mixer"] = dict(b["mixer"])
  s = m["scorer"] = dict(m["scorer"])
  s["proj_bias"] = value
  return out
