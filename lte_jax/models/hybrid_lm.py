"""HybridLM: a decoder whose mixer per layer comes from ``ModelConfig.layers``.

Block (pre-norm, as the reference):  x += mixer(RMSNorm(x));  x += SwiGLU(RMSNorm(x)).
Data flow of a batch: tokens [B, T] -> embed [B, T, D] -> blocks -> RMSNorm ->
logits [B, T, V] (float32; tied embeddings where the preset says so).

Decoding runs the same blocks on an explicit cache: a tuple with one pytree per
layer, built by each mixer's ``init_cache`` and threaded through ``prefill``
and ``decode``.
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import nnx

from lte_jax import configs as configs_lib
from lte_jax import remat
from lte_jax import segments
from lte_jax import sharding as sh
from lte_jax._checks import (check_int_dtype, check_nonempty, check_rank, check_segment_ids,
                             check_shape, check_values)
from lte_jax.layers import reference_init
from lte_jax.layers.attention import Attention
from lte_jax.layers.common import dtype_of, linear, partitioned
from lte_jax.layers.gated_deltanet import GatedDeltaNet
from lte_jax.layers.lte import LTEAttention
from lte_jax.layers.mlp import SwiGLU
from lte_jax.layers.norm import RMSNorm
from lte_jax.layers.nsa import NSAAttention

# Mixer name -> constructor(model_config, **common_kwargs). Adding a mixer means
# writing a module with the mixer protocol (see WORKSPACE.md) and one line here.
MIXER_REGISTRY: dict[str, Callable[..., nnx.Module]] = {
    "gdn": lambda cfg, **kw: GatedDeltaNet(cfg.gdn, cfg.d_model, **kw),
    "attn": lambda cfg, **kw: Attention(cfg.attn, cfg.d_model, **kw),
    "swa": lambda cfg, **kw: Attention(cfg.swa, cfg.d_model, **kw),
    "lte": lambda cfg, **kw: LTEAttention(cfg.lte, cfg.d_model, **kw),
    "nsa": lambda cfg, **kw: NSAAttention(cfg.nsa, cfg.d_model, **kw),
}


class Block(nnx.Module):
  """Pre-norm residual block: mixer then SwiGLU MLP (initialised as ``cfg.init`` says)."""

  def __init__(self, cfg: configs_lib.ModelConfig, mixer: str, *, rngs: nnx.Rngs):
    dtype, param_dtype = dtype_of(cfg.dtype), dtype_of(cfg.param_dtype)
    common = dict(num_layers=cfg.num_layers, init_std=cfg.init_std, dtype=dtype,
                  param_dtype=param_dtype, rngs=rngs)
    self.mixer_name = mixer
    self.mixer_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps, dtype=dtype,
                              param_dtype=param_dtype)
    self.mixer = MIXER_REGISTRY[mixer](cfg, **common)
    self.mlp_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps, dtype=dtype, param_dtype=param_dtype)
    self.mlp = SwiGLU(cfg.d_model, cfg.intermediate_size, **common)
    if cfg.init == "reference":
      reference_init.reinitialise(self, cfg.num_layers, rngs)

  def __call__(self, x, *, segment_ids=None, positions=None):
    h, aux = self.mixer(self.mixer_norm(x), segment_ids=segment_ids, positions=positions)
    x = x + h
    x = x + self.mlp(self.mlp_norm(x))
    return sh.constrain(x, (sh.BATCH, sh.LENGTH, sh.ACT_EMBED)), aux

  def prefill(self, x, cache):
    h, cache = self.mixer.prefill(self.mixer_norm(x), cache)
    x = x + h
    return x + self.mlp(self.mlp_norm(x)), cache

  def decode(self, x, cache):
    h, cache = self.mixer.decode(self.mixer_norm(x), cache)
    x = x + h
    return x + self.mlp(self.mlp_norm(x)), cache


def _run_block(block: Block, x, segment_ids, positions):
  return block(x, segment_ids=segment_ids, positions=positions)


# Rematerialised twins of _run_block (ModelConfig.remat, lte_jax.remat). Without remat
# autodiff keeps about 290 KB per token per 0.4B GDN block (measured with saved_residuals),
# 9 GiB per layer at 8 x 4096 tokens. 'full' keeps only the block input and recomputes the
# rest (~1/3 more FLOPs); 'dots' also keeps the matmul outputs, so only elementwise work and
# the mixer's core op are redone; 'dots_mixers' also keeps the core op's inputs, output and
# kernel residuals, so its forward kernels run once.
_RUN_BLOCK = {"none": _run_block, **{
    name: nnx.remat(_run_block, policy=remat.policy(name)) for name in remat.POLICIES[1:]}}


def layer_period(layers: tuple[str, ...]) -> int:
  """Length of the shortest prefix whose repetition gives ``layers`` (len(layers) if none)."""
  n = len(layers)
  return next(p for p in range(1, n + 1) if n % p == 0 and layers == layers[:p] * (n // p))


def _stack(trees):
  return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


def _scan_blocks(blocks, period: int, run, x, segment_ids, positions):
  """Run ``blocks`` as lax.scan over cycles of ``period`` blocks; returns (x, aux per block).

  The body is traced and compiled once per position in the cycle instead of once
  per layer: XLA's compile time no longer grows with depth. Parameters stay one
  module per layer (checkpoints, conversion, sharding and decode are unchanged);
  they are stacked here per step, a copy of the weights that costs a few
  hundred microseconds on a GPU, and autodiff routes the gradients back through
  the stack. Non-parameter state (dropout RNG counters) is written back.
  """
  cycles = len(blocks) // period
  graphdefs, params, rest = [], [], []
  for pos in range(period):
    splits = [nnx.split(blocks[c * period + pos], nnx.Param, ...) for c in range(cycles)]
    graphdefs.append(splits[0][0])
    params.append(_stack([s[1] for s in splits]))
    rest.append(_stack([s[2] for s in splits]))

  def body(h, cycle):
    cycle_params, cycle_rest = cycle
    new_rest, auxes = [], []
    for pos in range(period):
      block = nnx.merge(graphdefs[pos], cycle_params[pos], cycle_rest[pos])
      h, aux = run(block, h, segment_ids, positions)
      new_rest.append(nnx.state(block, nnx.Not(nnx.Param)))
      auxes.append(aux)
    return h, (new_rest, auxes)

  x, (new_rest, auxes) = jax.lax.scan(body, x, (params, rest))
  per_block = []
  for c in range(cycles):
    for pos in range(period):
      nnx.update(blocks[c * period + pos], jax.tree.map(lambda a: a[c], new_rest[pos]))
      per_block.append(jax.tree.map(lambda a: a[c], auxes[pos]))
  return x, per_block


class HybridLM(nnx.Module):
  """Decoder LM. ``model(tokens) -> (logits [B, T, V] f32, aux)``.

  aux['lte_retention'] is a tuple with the retention scores r [B, T, H_kv] of
  each LTE layer in order (empty for models without LTE).
  """

  def __init__(self, config: configs_lib.ModelConfig, *, rngs: nnx.Rngs):
    if not isinstance(config, configs_lib.ModelConfig):
      raise ValueError(f"config must be a lte_jax.configs.ModelConfig, got {type(config).__name__}")
    self.config = config
    dtype, param_dtype = dtype_of(config.dtype), dtype_of(config.param_dtype)
    self.embed = nnx.Embed(
        config.vocab_size, config.d_model, dtype=dtype, param_dtype=param_dtype,
        embedding_init=partitioned(nnx.initializers.normal(config.init_std),
                                   (sh.VOCAB, sh.EMBED)),
        rngs=rngs)
    self.blocks = nnx.List([Block(config, mixer, rngs=rngs) for mixer in config.layers])
    self.final_norm = RMSNorm(config.d_model, eps=config.norm_eps, dtype=dtype,
                              param_dtype=param_dtype)
    if config.tie_embeddings:
      self.lm_head = None
    else:
      self.lm_head = linear(config.d_model, config.vocab_size, names=(sh.EMBED, sh.VOCAB),
                            std=config.init_std, rngs=rngs, param_dtype=param_dtype, dtype=dtype)
    self.lte_layers = tuple(i for i, m in enumerate(config.layers) if m == "lte")

  def _check_tokens(self, tokens, name="tokens"):
    check_rank(name, tokens, 2, "[batch, time]")
    check_int_dtype(name, tokens)
    check_nonempty(name, tokens, "[batch, time]")
    vocab = self.config.vocab_size
    check_values(name, tokens, lambda ids: (ids >= 0) & (ids < vocab),
                 f"token ids in [0, vocab_size) = [0, {vocab})")

  def _embed(self, tokens):
    """tokens [B, T] -> (x [B, T, D], valid [B, T] bool). Out-of-range ids (traced: the
    check above saw no values) embed as zeros; _logits makes their rows NaN."""
    valid = (tokens >= 0) & (tokens < self.config.vocab_size)
    x = self.embed(jnp.where(valid, tokens, 0))
    return jnp.where(valid[..., None], x, jnp.zeros((), x.dtype)), valid

  def _logits(self, x, valid):
    x = jnp.where(valid[..., None], x, jnp.full((), jnp.nan, x.dtype))
    x = self.final_norm(x)
    if self.lm_head is None:
      logits = self.embed.attend(x)
    else:
      logits = self.lm_head(x)
    return logits.astype(jnp.float32)

  def __call__(self, tokens, *, segment_ids=None, positions=None):
    """tokens [B, T] int; segment_ids/positions [B, T] int (packed documents).

    Token ids must lie in [0, vocab_size): checked (ValueError) where the ids are
    concrete. Traced under jit they cannot be checked without a host sync; an
    out-of-range id is then embedded as a zero vector (what later tokens read) and
    its own logits row is NaN, so the loss over it is NaN. The same holds for
    prefill and decode.
    """
    self._check_tokens(tokens)
    b, t = tokens.shape
    check_segment_ids(segment_ids, b, t)
    positions = segments.resolve_positions(positions, segment_ids, b, t)
    x, valid = self._embed(tokens)
    x = sh.constrain(x, (sh.BATCH, sh.LENGTH, sh.ACT_EMBED))
    run = _RUN_BLOCK[self.config.remat]
    if self.config.scan_layers:
      x, auxes = _scan_blocks(self.blocks, layer_period(self.config.layers), run, x,
                              segment_ids, positions)
    else:
      auxes = []
      for block in self.blocks:
        x, aux = run(block, x, segment_ids, positions)
        auxes.append(aux)
    retention = [aux["retention"] for aux in auxes if "retention" in aux]
    return self._logits(x, valid), {"lte_retention": tuple(retention)}

  def init_cache(self, batch_size: int, max_len: int, dtype: Any = None) -> tuple:
    """One cache pytree per layer; ``max_len`` bounds the tokens a full-attention layer keeps."""
    dtype = dtype_of(self.config.dtype) if dtype is None else dtype
    return tuple(block.mixer.init_cache(batch_size, max_len, dtype) for block in self.blocks)

  def prefill(self, tokens, cache: tuple):
    """Run a prompt tokens [B, T] into a fresh cache; returns (logits [B, T, V], cache)."""
    self._check_tokens(tokens)
    self._check_cache(cache)
    x, valid = self._embed(tokens)
    new_cache = []
    for block, layer_cache in zip(self.blocks, cache):
      x, layer_cache = block.prefill(x, layer_cache)
      new_cache.append(layer_cache)
    return self._logits(x, valid), tuple(new_cache)

  def decode(self, tokens, cache: tuple):
    """One step: tokens [B, 1] -> (logits [B, 1, V], cache)."""
    self._check_tokens(tokens)
    if tokens.shape[1] != 1:
      raise ValueError(f"tokens must have shape [batch, 1] for decode, got {tuple(tokens.shape)}")
    self._check_cache(cache)
    x, valid = self._embed(tokens)
    new_cache = []
    for block, layer_cache in zip(self.blocks, cache):
      x, layer_cache = block.decode(x, layer_cache)
      new_cache.append(layer_cache)
    return self._logits(x, valid), tuple(new_cache)

  def _check_cache(self, cache):
    if not isinstance(cache, (tuple, list)) or len(cache) != len(self.blocks):
      raise ValueError(f"cache must be the tuple of {len(self.blocks)} per-layer caches made by "
                       f"init_cache, got {type(cache).__name__}")


def count_params(config: configs_lib.ModelConfig) -> int:
  """Parameter count of a config, computed without allocating (nnx.eval_shape)."""
  abstract = nnx.eval_shape(lambda: HybridLM(config, rngs=nnx.Rngs(0)))
  state = nnx.state(abstract, nnx.Param)
  return sum(int(x.size) for x in jax.tree.leaves(state))
