"""Remat policies (lte_jax.remat): what the backward pass reruns, and that no policy changes
a gradient.

Pallas keeps every pallas_call in a jaxpr (its dead-code rule never drops one), while XLA
drops a side-effect-free custom call whose result is unused. So the backward's kernels are
counted here after a liveness pass that drops unused pallas_calls as XLA would.
"""
from __future__ import annotations

from collections import Counter

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lte_jax import configs, remat
from lte_jax.layers.gated_deltanet import GatedDeltaNet
from lte_jax.layers.lte import LTEAttention
from tests.quick_compile import quick_compile  # noqa: F401  (autouse fixture)


def _sub_jaxprs(eqn):
  for p in eqn.params.values():
    for q in (p if isinstance(p, (tuple, list)) else [p]):
      inner = q if hasattr(q, "eqns") else getattr(q, "jaxpr", None)
      if inner is not None and hasattr(inner, "eqns"):
        yield inner


def live_kernels(jaxpr) -> Counter:
  """Names of the pallas_calls whose results something uses (or that have effects)."""
  counts = Counter()

  def visit(j, used_out):
    live = {v for v, u in zip(j.outvars, used_out) if u and type(v).__name__ != "Literal"}
    for e in reversed(j.eqns):
      used = [o in live for o in e.outvars]
      if not any(used) and not e.effects:
        continue
      if e.primitive.name == "pallas_call":
        counts[str(e.params["name"]).split(" ")[0]] += 1
      for inner in _sub_jaxprs(e):
        same = len(inner.outvars) == len(e.outvars)
        visit(inner, used if same else [True] * len(inner.outvars))
      live.update(v for v in e.invars if type(v).__name__ != "Literal")

  visit(jaxpr, [True] * len(jaxpr.outvars))
  return counts


def _layer_loss(layer):
  graphdef, state = nnx.split(layer)

  def loss(state, x):
    y, _ = nnx.merge(graphdef, state)(x)
    return jnp.sum(jnp.sin(y.astype(jnp.float32)))
  return loss, state


def _backward(layer, x, policy):
  """(kernels a step of loss and gradients runs, gradients) under jax.checkpoint with
  `policy`. Traced and jitted, never run eagerly (the interpreted kernels are slow op by
  op): the forward's kernels count once for the loss, plus once more for every rerun in
  the backward."""
  loss, state = _layer_loss(layer)
  f = loss if policy == "none" else jax.checkpoint(loss, policy=remat.policy(policy))

  def step(state, x):
    value, vjp = jax.vjp(f, state, x)
    return value, vjp(jnp.ones_like(value))

  kernels = live_kernels(jax.make_jaxpr(step)(state, x).jaxpr)
  return kernels, jax.jit(step)(state, x)[1]


def _gdn():
  cfg = configs.GDNConfig(num_heads=2, head_dim=16, implementation="pallas", chunk_size=16)
  return GatedDeltaNet(cfg, 32, num_layers=1, init_std=0.02, rngs=nnx.Rngs(0))


def _lte():
  cfg = configs.LTEConfig(num_heads=2, num_kv_heads=1, head_dim=16, window_size=16,
                          sink_size=2, implementation="pallas")
  return LTEAttention(cfg, 32, num_layers=1, init_std=0.02, rngs=nnx.Rngs(0))


# T = 40: not a multiple of the GDN chunk nor of the attention blocks.
_X = jax.random.normal(jax.random.key(0), (1, 40, 32), jnp.float32)


@pytest.mark.parametrize("make,forward_only", [
    (_gdn, ("gdn_wy_inverse", "gdn_chunk_outputs")),
    (_lte, ("lte_attention_fwd",))])
def test_dots_mixers_runs_the_forward_kernels_once(make, forward_only):
  """Under 'dots' the backward reruns the forward kernels (their outputs are not matmul
  outputs); under 'dots_mixers' it runs only the backward's own kernels, and every policy
  gives the gradients of no remat."""
  layer = make()
  runs = {p: _backward(layer, _X, p) for p in ("none", "dots", "dots_mixers")}
  for name in forward_only:
    assert runs["none"][0][name] == 1, name
    assert runs["dots"][0][name] == 2, (name, runs["dots"][0])
    assert runs["dots_mixers"][0][name] == 1, (name, runs["dots_mixers"][0])
  assert runs["dots_mixers"][0] == runs["none"][0]
  for policy in ("dots", "dots_mixers"):
    for a, b in zip(jax.tree.leaves(runs[policy][1]), jax.tree.leaves(runs["none"][1])):
      if a.dtype != jax.dtypes.float0:     # the cotangent of an integer leaf
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


def test_policy_names_and_errors():
  assert remat.POLICIES == configs.REMAT_POLICIES
  assert remat.policy("full") is None
  with pytest.raises(ValueError, match=r"remat policy must be one of .*'dots_mixers'.*got 'dot'"):
    remat.policy("dot")
  with pytest.raises(ValueError, match="ModelConfig.remat must be one of"):
    configs.get_config("GDN", "tiny", remat="mixers")
