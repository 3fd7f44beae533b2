"""The plain-JAX ops and a train-size model step lower for TPU and CUDA on a CPU-only machine.

Nothing is allocated (ShapeDtypeStruct inputs) and nothing runs: lowering catches ops a
platform lacks and platform-specific rewrites that fail, which is the TPU proof this project
can give without a TPU (README, support table).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

from lte_jax import configs
from lte_jax.ops import attention, chunk_gated_delta_rule, lte_attention

PLATFORMS = ("tpu", "cuda")


def _sds(*shape, dtype=jnp.bfloat16):
  return jax.ShapeDtypeStruct(shape, dtype)


def _lower(fn, *args, platform):
  text = jax.jit(fn).trace(*args).lower(lowering_platforms=(platform,)).as_text()
  assert "func.func public @main" in text
  return text


def _grad_of(op):
  def loss(*args):
    return op(*args).astype(jnp.float32).sum()
  return jax.grad(loss, argnums=tuple(range(3)))


@pytest.mark.parametrize("platform", PLATFORMS)
@pytest.mark.parametrize("size", ["0.4B", "1.4B"])
def test_gated_delta_rule_xla_lowers(platform, size):
  g_cfg = configs.get_config("GDN", size).gdn
  b, t, h, dk = 1, 4096, g_cfg.num_heads, g_cfg.head_dim
  dv = int(dk * g_cfg.expand_v)
  seg = _sds(b, t, dtype=jnp.int32)

  def op(q, k, v, g, beta, segment_ids):
    return chunk_gated_delta_rule(q, k, v, g, beta, segment_ids=segment_ids,
                                  implementation="xla")[0]

  args = (_sds(b, t, h, dk), _sds(b, t, h, dk), _sds(b, t, h, dv),
          _sds(b, t, h, dtype=jnp.float32), _sds(b, t, h), seg)
  _lower(op, *args, platform=platform)
  _lower(jax.grad(lambda *a: op(*a).astype(jnp.float32).sum(), argnums=(0, 1, 2, 3, 4)),
         *args, platform=platform)


@pytest.mark.parametrize("platform", PLATFORMS)
@pytest.mark.parametrize("window", [None, 1023])
def test_attention_xla_lowers(platform, window):
  a_cfg = configs.get_config("GDN_Attn", "1.4B").attn
  b, t = 1, 4096
  q = _sds(b, t, a_cfg.num_heads, a_cfg.head_dim)
  kv = _sds(b, t, a_cfg.num_kv_heads, a_cfg.head_dim)
  op = lambda q, k, v: attention(q, k, v, window_size=window, implementation="xla")
  _lower(op, q, kv, kv, platform=platform)
  _lower(_grad_of(op), q, kv, kv, platform=platform)


@pytest.mark.parametrize("platform", PLATFORMS)
def test_lte_attention_xla_lowers(platform):
  l_cfg = configs.get_config("laLTE", "1.4B").lte
  b, t = 1, 4096
  q = _sds(b, t, l_cfg.num_heads, l_cfg.head_dim)
  kv = _sds(b, t, l_cfg.num_kv_heads, l_cfg.head_dim)
  r = _sds(b, t, l_cfg.num_kv_heads, dtype=jnp.float32)

  def op(q, k, v, r):
    return lte_attention(q, k, v, r, sink_size=l_cfg.sink_size, window_size=l_cfg.window_size,
                         implementation="xla")

  _lower(op, q, kv, kv, r, platform=platform)
  loss = lambda *a: op(*a).astype(jnp.float32).sum()
  _lower(jax.grad(loss, argnums=(0, 1, 2, 3)), q, kv, kv, r, platform=platform)


@pytest.mark.parametrize("platform", PLATFORMS)
def test_lalte_train_step_lowers(platform):
  from lte_jax.training import optimizer, step as step_lib, train_state
  cfg = configs.get_config("laLTE", "0.4B", num_layers=2, dtype="bfloat16")
  model_def = train_state.make_model_def(cfg)
  tx, schedule = optimizer.make_optimizer(optimizer.OptimizerConfig(), total_steps=1000)
  state = jax.eval_shape(lambda: train_state.init_train_state(model_def, tx, 0))
  b, t = 2, 1024
  tokens = _sds(b, t, dtype=jnp.int32)
  batch = dict(inputs=tokens, targets=tokens, segment_ids=tokens, positions=tokens,
               loss_mask=_sds(b, t, dtype=jnp.float32))
  text = _lower(step_lib.make_train_step(model_def, tx, schedule), state, batch,
                platform=platform)
  assert "while" in text  # the chunk scan of the GDN layer stays a loop
