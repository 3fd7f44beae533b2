"""Hugging Face tensor names and layouts -> lte_jax parameters (nnx.to_pure_dict layout).

One rule per tensor: its HF name, the lte_jax parameter path it fills, and a layout kind.
Layouts (torch on the left, lte_jax on the right):
  linear       nn.Linear weight [out, in]             -> kernel [in, out] (transposed)
  short_conv   depthwise Conv1d weight [C, 1, K]      -> ShortConv weight [K, C]
               (both causal: tap K-1 reads the current token)
  scorer_conv  grouped Conv2d weight [G*Cout, Cin, 1, k] -> [k, G, Cin, Cout]
               (group g = KV head g; its outputs are channels g*Cout .. g*Cout+Cout-1)
  scorer_bias  [G*Cout]                               -> [G, Cout]
  scorer_proj  grouped 1x1 Conv2d weight [G, C, 1, 1] -> [G, C]
  copy         norms, A_log, dt_bias, embeddings, proj bias: same shape
With the reference's routing_shared='layer' the scorer has one group and its weights are
copied to every KV head ('*_shared' kinds).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import jax
import numpy as np
from flax import nnx

from lte_jax import configs as configs_lib
from lte_jax.convert.hf_config import HFLayout

# Derived buffers some versions save: recomputed from rope_theta, so they are skipped.
IGNORED_SUFFIXES = (".rotary.inv_freq",)
# LTE lambda-controller buffers of the reference model (not parameters).
CONTROLLER_TENSORS = ("model.l1_lambda", "model.num_kept")


def _kinds() -> dict[str, tuple[Callable, Callable]]:
  """kind -> (HF shape from the lte_jax shape, HF array -> lte_jax array)."""
  def scorer_conv(x, s):  # s = (k, G, Cin, Cout)
    return x.reshape(s[1], s[3], s[2], s[0]).transpose(3, 0, 2, 1)

  def scorer_conv_shared(x, s):
    return np.broadcast_to(x[:, :, 0, :].transpose(2, 1, 0)[:, None], s)

  return {
      "copy": (lambda s: s, lambda x, s: x),
      "linear": (lambda s: s[::-1], lambda x, s: x.T),
      "short_conv": (lambda s: (s[1], 1, s[0]), lambda x, s: x[:, 0, :].T),
      "scorer_conv": (lambda s: (s[1] * s[3], s[2], 1, s[0]), scorer_conv),
      "scorer_bias": (lambda s: (s[0] * s[1],), lambda x, s: x.reshape(s)),
      "scorer_proj": (lambda s: (s[0], s[1], 1, 1), lambda x, s: x[:, :, 0, 0]),
      "scorer_conv_shared": (lambda s: (s[3], s[2], 1, s[0]), scorer_conv_shared),
      "scorer_bias_shared": (lambda s: (s[1],), lambda x, s: np.broadcast_to(x, s)),
      "scorer_proj_shared": (lambda s: (1, s[1], 1, 1),
                             lambda x, s: np.broadcast_to(x[:, :, 0, 0], s)),
      "proj_bias_shared": (lambda s: (1,), lambda x, s: np.broadcast_to(x, s)),
  }


KINDS = _kinds()


@dataclasses.dataclass(frozen=True)
class Rule:
  hf_name: str
  path: tuple          # lte_jax parameter path, e.g. ('blocks', 0, 'mixer', 'q_proj', 'kernel')
  kind: str            # a key of KINDS


def _mixer_rules(mixer: str, prefix: str, path: tuple, num_scorer_convs: int,
                 shared: str | None) -> list[Rule]:
  def lin(*names):
    return [Rule(f"{prefix}{n}.weight", path + (n, "kernel"), "linear") for n in names]

  if mixer == "gdn":
    rules = lin("q_proj", "k_proj", "v_proj", "a_proj", "b_proj", "g_proj", "o_proj")
    rules += [Rule(f"{prefix}{c}_conv1d.weight", path + (f"{c}_conv", "weight"), "short_conv")
              for c in "qkv"]
    rules += [Rule(f"{prefix}A_log", path + ("A_log",), "copy"),
              Rule(f"{prefix}dt_bias", path + ("dt_bias",), "copy"),
              Rule(f"{prefix}o_norm.weight", path + ("o_norm", "weight"), "copy")]
    return rules
  if mixer in ("attn", "swa"):
    return lin("q_proj", "k_proj", "v_proj", "o_proj")
  if mixer == "nsa":
    # g_proj rows are (head, branch) with branch fastest in both code bases.
    return lin("q_proj", "k_proj", "v_proj", "g_proj", "o_proj")
  if mixer == "lte":
    suffix = "_shared" if shared == "layer" else ""
    stack = f"{prefix}router.conv_stack."
    scorer = path + ("scorer",)
    rules = lin("q_proj", "k_proj", "v_proj", "o_proj")
    for j in range(num_scorer_convs):
      rules += [Rule(f"{stack}convs.{j}.weight", scorer + ("conv_kernels", j),
                     "scorer_conv" + suffix),
                Rule(f"{stack}convs.{j}.bias", scorer + ("conv_biases", j),
                     "scorer_bias" + suffix)]
    rules += [Rule(f"{stack}proj.weight", scorer + ("proj_kernel",), "scorer_proj" + suffix),
              Rule(f"{stack}proj.bias", scorer + ("proj_bias",),
                   "proj_bias_shared" if suffix else "copy")]
    return rules
  raise ValueError(f"mixer {mixer!r} has no Hugging Face tensor mapping")


def rules_for(config: configs_lib.ModelConfig, layout: HFLayout) -> list[Rule]:
  """Every tensor the checkpoint must hold (lm_head only when embeddings are not tied)."""
  rules = [Rule("model.embeddings.weight", ("embed", "embedding"), "copy"),
           Rule("model.norm.weight", ("final_norm", "weight"), "copy")]
  if not config.tie_embeddings:
    rules.append(Rule("lm_head.weight", ("lm_head", "kernel"), "linear"))
  for i, mixer in enumerate(config.layers):
    p, path = f"model.layers.{i}.", ("blocks", i)
    rules += [Rule(f"{p}attn_norm.weight", path + ("mixer_norm", "weight"), "copy"),
              Rule(f"{p}mlp_norm.weight", path + ("mlp_norm", "weight"), "copy")]
    rules += [Rule(f"{p}mlp.{n}.weight", path + ("mlp", n, "kernel"), "linear")
              for n in ("gate_proj", "up_proj", "down_proj")]
    rules += _mixer_rules(mixer, f"{p}attn.", path + ("mixer",), len(config.lte.kernel_sizes),
                          layout.lte_routing_shared)
  return rules


def expected_shapes(config: configs_lib.ModelConfig) -> dict[tuple, tuple]:
  """{parameter path: shape} of a HybridLM, computed without allocating."""
  from lte_jax.models import HybridLM  # pylint: disable=g-import-not-at-top
  abstract = nnx.eval_shape(lambda: HybridLM(config, rngs=nnx.Rngs(0)))
  flat = jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(nnx.state(abstract, nnx.Param)))[0]
  return {tuple(getattr(k, "key", getattr(k, "idx", k)) for k in path): tuple(leaf.shape)
          for path, leaf in flat}


def _listing(names: list[str], limit: int = 20) -> str:
  more = f" ... and {len(names) - limit} more" if len(names) > limit else ""
  return ", ".join(names[:limit]) + more


def _float32(name: str, x: np.ndarray) -> np.ndarray:
  # ml_dtypes' bfloat16 / float8 are not numpy 'floating' subtypes, hence the name test.
  if x.dtype.kind != "f" and not x.dtype.name.startswith(("bfloat16", "float8")):
    raise ValueError(f"tensor {name} must be floating point, got dtype {x.dtype}")
  return np.asarray(x, dtype=np.float32)


def _nest(flat: Mapping[tuple, np.ndarray]) -> dict:
  out: dict = {}
  for path, value in flat.items():
    node = out
    for key in path[:-1]:
      node = node.setdefault(key, {})
    node[path[-1]] = value
  return out


def map_tensors(tensors: Mapping[str, np.ndarray], config: configs_lib.ModelConfig,
                layout: HFLayout) -> tuple[dict, dict | None]:
  """(params, controller): params in nnx.to_pure_dict layout (float32 numpy); controller
  {'lam', 'kept_ema'} [LTE layers, KV heads] from the reference's buffers, or None.

  Raises ValueError listing missing and unexpected tensor names, or every tensor whose
  shape is not the one the config implies.
  """
  rules = rules_for(config, layout)
  shapes = expected_shapes(config)
  covered, wanted = {r.path for r in rules}, set(shapes)
  if covered != wanted or len(covered) != len(rules):
    raise ValueError(f"the mapping does not cover this model's parameters exactly once (an "
                     f"lte_jax layer changed?): unmapped {sorted(map(str, wanted - covered))}, "
                     f"unknown {sorted(map(str, covered - wanted))}")
  num_lte = sum(m == "lte" for m in config.layers)
  names = set(tensors)
  known = {r.hf_name for r in rules}
  optional = set(CONTROLLER_TENSORS) if num_lte else set()
  if config.tie_embeddings:
    optional.add("lm_head.weight")
  missing = sorted(known - names)
  unexpected = sorted(n for n in names - known - optional if not n.endswith(IGNORED_SUFFIXES))
  if missing or unexpected:
    raise ValueError(f"the checkpoint does not match its config.json ({len(config.layers)} layers "
                     f"{'/'.join(config.layers)}): missing tensors [{_listing(missing)}]; "
                     f"unexpected tensors [{_listing(unexpected)}]")

  bad, flat = [], {}
  for rule in rules:
    x = tensors[rule.hf_name]
    to_hf_shape, convert = KINDS[rule.kind]
    want = tuple(to_hf_shape(shapes[rule.path]))
    if tuple(x.shape) != want:
      bad.append(f"{rule.hf_name} has shape {tuple(x.shape)}, expected {want}")
      continue
    flat[rule.path] = np.ascontiguousarray(convert(_float32(rule.hf_name, x), shapes[rule.path]))
  if bad:
    raise ValueError("tensors with the wrong shape for config.json: " + "; ".join(bad))

  if config.tie_embeddings and "lm_head.weight" in names:
    head, embed = tensors["lm_head.weight"], tensors["model.embeddings.weight"]
    if head.shape != embed.shape or not np.array_equal(head, embed):
      raise ValueError("config.json has tie_word_embeddings=true but lm_head.weight differs from "
                       "model.embeddings.weight; set tie_word_embeddings=false to keep both")
  return _nest(flat), _controller(tensors, num_lte, config.lte.num_kv_heads)


def _controller(tensors: Mapping[str, np.ndarray], num_lte: int, num_kv_heads: int) -> dict | None:
  """The reference's l1_lambda (scalar, [L] or [L, H]) and num_kept [L, H] as [L, H] arrays."""
  if not num_lte or "model.l1_lambda" not in tensors:
    return None
  shape = (num_lte, num_kv_heads)
  lam = _float32("model.l1_lambda", tensors["model.l1_lambda"])
  if lam.ndim == 1:
    lam = lam[:, None]
  try:
    out = {"lam": np.broadcast_to(lam, shape).copy()}
    kept = tensors.get("model.num_kept")
    out["kept_ema"] = (np.zeros(shape, np.float32) if kept is None
                       else np.broadcast_to(_float32("model.num_kept", kept), shape).copy())
  except ValueError as err:
    raise ValueError(f"model.l1_lambda / model.num_kept must broadcast to [LTE layers, KV heads] "
                     f"= {shape}: {err}") from err
  return out
