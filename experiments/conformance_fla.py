r"""Logit conformance with flash-linear-attention: FLA's models vs the same weights in lte_jax.

    python -m experiments.conformance_fla --out=conformance_fla.json

Needs a CUDA GPU with torch, transformers and flash-linear-attention 0.6.0 (the FLA kernels
are Triton); lte_jax does not depend on any of them, so they are imported only in main().
For each model below it builds a small random FLA model in float32, perturbs the norm
weights (they start at 1, which would hide a misplaced norm), saves it with
save_pretrained (safetensors), converts it with lte_jax.convert.load_hf, runs both on the
same random tokens and reports the error of lte_jax's logits against FLA's:
  gdn        GatedDeltaNetForCausalLM: GDN layers only (expand_v 2, untied head)
  gdn_attn   GDN + full softmax attention on layers 1 and 3 (GQA 4/2, tied embeddings)
  gdn_swa    GDN + sliding-window attention (window 32 visible tokens) on layers 1 and 3
The export cases go the other way: a random lte_jax model with the shapes of the FLA model
named after ``export_`` (norm weights perturbed too) is written by lte_jax.convert.save_hf,
FLA loads it with transformers' AutoModelForCausalLM.from_pretrained (every tensor must
load), and the logits are compared the same way:
  export_gdn       the gdn model's shapes
  export_gdn_attn  the gdn_attn model's shapes (attention layers, tied embeddings)
Sequence lengths <= 64 run FLA's fused_recurrent GDN kernel, longer ones its chunk kernel.

FLA's softmax attention calls flash-attn; so that the script does not need it, a
stand-in with the same signature (torch scaled_dot_product_attention with an explicit
causal / window mask, GQA by repeating KV heads) replaces fla.layers.attn.flash_attn_func.
Only forwards run, so FLA's Triton>=3.7.1 backward switch
(fla.ops.common.chunk_o.TRITON_ABOVE_3_7_1) is left alone.

Precision: both sides compute in float32, but Triton's tl.dot on float32 inputs uses TF32
by default, so FLA's GDN kernels round their products to TF32; lte_jax runs with
jax_default_matmul_precision='highest' and torch with TF32 off for its own matmuls. The
error reported is therefore an upper bound on any semantic difference. Metrics per run:
rel_max = max|lte - fla| / max|fla|, rel_rms = ||lte - fla|| / ||fla||, and the fraction
of positions whose argmax agrees. The run fails (exit 1) when rel_max > --tolerance.
"""
from __future__ import annotations

import json
import os
import platform
import sys
import tempfile
import time

from absl import app, flags

_OUT = flags.DEFINE_string("out", "conformance_fla.json", "JSON file for the results.")
_SEQ_LENS = flags.DEFINE_list("seq_lens", ["48", "300"],
                              "Sequence lengths (<= 64: FLA's fused_recurrent path; > 64: chunk).")
_BATCH = flags.DEFINE_integer("batch", 2, "Sequences per run.")
_MODELS = flags.DEFINE_list("models", ["gdn", "gdn_attn", "gdn_swa", "export_gdn",
                                        "export_gdn_attn"], "Models to check.")
_TOLERANCE = flags.DEFINE_float("tolerance", 1e-2, "Largest rel_max accepted.")
_IMPLEMENTATION = flags.DEFINE_string(
    "implementation", None, "lte_jax op implementation for every mixer (None: the backend's best).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Where the FLA checkpoints are saved (default: a "
                               "temporary folder).")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the FLA weights, the perturbation and the tokens.")

D_MODEL, LAYERS, VOCAB = 256, 4, 1024
# Export cases: the FLA model whose shapes each lte_jax model takes.
EXPORTS = {"export_gdn": "gdn", "export_gdn_attn": "gdn_attn"}


def fla_config_kwargs(name: str) -> dict:
  """GatedDeltaNetConfig arguments of each model checked."""
  base = dict(hidden_size=D_MODEL, num_hidden_layers=LAYERS, num_heads=4, head_dim=64,
              expand_v=2, conv_size=4, use_gate=True, use_short_conv=True, hidden_ratio=4,
              norm_eps=1e-6, vocab_size=VOCAB, max_position_embeddings=2048,
              tie_word_embeddings=False, fuse_cross_entropy=False)
  if name == "gdn":
    return base
  window = {"gdn_attn": None, "gdn_swa": 32}[name]
  return dict(base, tie_word_embeddings=name == "gdn_attn",
              attn=dict(layers=[1, 3], num_heads=4, num_kv_heads=2, window_size=window,
                        rope_theta=10000.0))


def flash_attn_stand_in(q, k, v, causal=True, window_size=(-1, -1), **unused):
  """flash_attn_func(q, k, v, causal, window_size) on torch SDPA. q [B,T,H,D], k/v [B,T,Hkv,D]."""
  import torch  # pylint: disable=g-import-not-at-top
  import torch.nn.functional as F  # pylint: disable=g-import-not-at-top
  if unused:
    raise ValueError(f"the flash-attn stand-in does not implement {sorted(unused)}")
  if not causal:
    raise ValueError("the flash-attn stand-in implements causal attention only")
  t, h, hkv = q.shape[1], q.shape[2], k.shape[2]
  i = torch.arange(t, device=q.device)
  mask = i[None, :] <= i[:, None]
  if window_size[0] >= 0:
    mask &= (i[:, None] - i[None, :]) <= window_size[0]
  k = k.repeat_interleave(h // hkv, dim=2)
  v = v.repeat_interleave(h // hkv, dim=2)
  o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                     attn_mask=mask)
  return o.transpose(1, 2)


def build_fla_model(name: str, seed: int, directory: str):
  """A random FLA model saved to ``directory``; returns the torch model (eval, fp32, cuda)."""
  import torch  # pylint: disable=g-import-not-at-top
  from fla.models import (  # pylint: disable=g-import-not-at-top
      GatedDeltaNetConfig, GatedDeltaNetForCausalLM)
  torch.manual_seed(seed)
  model = GatedDeltaNetForCausalLM(GatedDeltaNetConfig(**fla_config_kwargs(name)))
  with torch.no_grad():
    for pname, p in model.named_parameters():
      if "norm" in pname:  # all ones at init: perturb so a misplaced norm weight shows
        p.copy_(1.0 + 0.2 * torch.randn_like(p))
  model.save_pretrained(directory)  # safetensors: the default of transformers 4.35+ and 5
  return model.to(device="cuda", dtype=torch.float32).eval()


def random_lte_params(config, seed: int) -> dict:
  """Parameters of an lte_jax HybridLM drawn with numpy (nnx.to_pure_dict layout): matrices
  normal(init_std), norm weights 1 + normal(0.2) (at 1 a misplaced norm would not show),
  A_log = log U(1, 16) and dt_bias = softplus^-1 of dt log-uniform in [1e-3, 0.1], as FLA
  initialises them."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  from flax import traverse_util  # pylint: disable=g-import-not-at-top
  from lte_jax.convert.hf_params import expected_shapes  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(seed)
  flat = {}
  for path, shape in expected_shapes(config).items():
    if any("norm" in str(key) for key in path):
      x = 1.0 + 0.2 * rng.standard_normal(shape)
    elif path[-1] == "A_log":
      x = np.log(rng.uniform(1.0, 16.0, shape))
    elif path[-1] == "dt_bias":
      dt = np.exp(rng.uniform(np.log(1e-3), np.log(0.1), shape))
      x = dt + np.log(-np.expm1(-dt))
    else:
      x = config.init_std * rng.standard_normal(shape)
    flat[path] = x.astype(np.float32)
  return traverse_util.unflatten_dict(flat)


def export_lte_model(name: str, seed: int, directory: str, implementation: str | None = None):
  """The lte_jax half of an export case: a random model with the shapes of FLA model
  EXPORTS[name], written to ``directory`` by save_hf; returns (model in eval mode, config)."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from lte_jax import configs as configs_lib  # pylint: disable=g-import-not-at-top
  from lte_jax.convert import model_config_from_hf, save_hf  # pylint: disable=g-import-not-at-top
  from lte_jax.training import train_state  # pylint: disable=g-import-not-at-top
  config, _ = model_config_from_hf(dict(fla_config_kwargs(EXPORTS[name]),
                                        model_type="gated_deltanet"))
  params = random_lte_params(config, seed)
  save_hf(params, config, directory, overwrite=True)  # a rerun with --workdir replaces it
  if implementation is not None:
    config = configs_lib.replace(config, **{
        mixer: configs_lib.replace(getattr(config, mixer), implementation=implementation)
        for mixer in ("gdn", "attn", "swa")})
  model = train_state.make_model_def(config, train=False).bind(
      jax.tree.map(jnp.asarray, params), jax.random.key(0))
  model.eval()
  return model, config


def load_fla_export(directory: str):
  """FLA's model of an exported directory (eval, fp32, cuda); exits unless every tensor of
  the model was in the file and every tensor of the file was used."""
  import torch  # pylint: disable=g-import-not-at-top
  import fla.models  # pylint: disable=g-import-not-at-top,unused-import  # registers gated_deltanet
  from transformers import AutoModelForCausalLM  # pylint: disable=g-import-not-at-top
  model, info = AutoModelForCausalLM.from_pretrained(directory, output_loading_info=True)
  tied = model.config.tie_word_embeddings
  problems = {key: sorted(k for k in info.get(key) or () if not (tied and k == "lm_head.weight"))
              for key in ("missing_keys", "unexpected_keys", "mismatched_keys")}
  problems = {key: value for key, value in problems.items() if value}
  if problems or info.get("error_msgs"):
    sys.exit(f"FLA did not load {directory} as written: {problems} {info.get('error_msgs')}")
  return model.to(device="cuda", dtype=torch.float32).eval()


def compare(lte, fla) -> dict:
  import numpy as np  # pylint: disable=g-import-not-at-top
  lte, fla = np.asarray(lte, np.float64), np.asarray(fla, np.float64)
  diff = np.abs(lte - fla)
  return {"max_abs_err": float(diff.max()), "max_abs_fla": float(np.abs(fla).max()),
          "rel_max": float(diff.max() / np.abs(fla).max()),
          "rel_rms": float(np.linalg.norm(lte - fla) / np.linalg.norm(fla)),
          "argmax_agree": float(np.mean(lte.argmax(-1) == fla.argmax(-1)))}


def _write_report(results, jax, torch, fla, transformers) -> None:
  report = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "device": torch.cuda.get_device_name(0), "host": platform.node(),
            "versions": {"fla": getattr(fla, "__version__", "?"), "torch": torch.__version__,
                         "transformers": transformers.__version__, "jax": jax.__version__},
            "tolerance": _TOLERANCE.value, "implementation": _IMPLEMENTATION.value,
            "command": " ".join(sys.argv), "results": results}
  with open(_OUT.value, "w") as f:
    json.dump(report, f, indent=2)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # torch shares the GPU
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  import fla  # pylint: disable=g-import-not-at-top
  import fla.layers.attn  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from lte_jax.convert import load_hf  # pylint: disable=g-import-not-at-top

  known = ("gdn", "gdn_attn", "gdn_swa", *EXPORTS)
  unknown = [name for name in _MODELS.value if name not in known]
  if unknown:
    raise app.UsageError(f"--models: unknown {unknown}; known: {', '.join(known)}")
  if not torch.cuda.is_available():
    sys.exit("conformance_fla needs a CUDA GPU (FLA's kernels are Triton)")
  jax.config.update("jax_default_matmul_precision", "highest")
  torch.backends.cuda.matmul.allow_tf32 = False
  torch.backends.cudnn.allow_tf32 = False
  fla.layers.attn.flash_attn_func = flash_attn_stand_in  # before any Attention is built

  root = _WORKDIR.value or tempfile.mkdtemp(prefix="conformance_fla_")
  rng = np.random.default_rng(_SEED.value)
  results = []
  for name in _MODELS.value:
    directory = os.path.join(root, name)
    if name in EXPORTS:
      print(f"{name}: exporting an lte_jax model ({time.strftime('%H:%M:%S')})", flush=True)
      model, config = export_lte_model(name, _SEED.value, directory, _IMPLEMENTATION.value)
      fla_model = load_fla_export(directory)
    else:
      print(f"{name}: building FLA model ({time.strftime('%H:%M:%S')})", flush=True)
      fla_model = build_fla_model(name, _SEED.value, directory)
      model, config = load_hf(directory, implementation=_IMPLEMENTATION.value)
    forward = nnx.jit(lambda m, x: m(x)[0])
    # One lte_jax forward at the longest length serves every length: the model is causal,
    # so its logits at positions < t depend on tokens[:, :t] alone, and one compilation
    # (tens of seconds on a fresh GPU) replaces one per length. FLA runs each prefix on
    # its own, so each length still picks FLA's kernel path for that length.
    lengths = [int(s) for s in _SEQ_LENS.value]
    all_tokens = rng.integers(0, VOCAB, size=(_BATCH.value, max(lengths)))
    start = time.time()
    all_got = np.asarray(forward(model, jnp.asarray(all_tokens, jnp.int32)))
    lte_seconds = round(time.time() - start, 3)
    for t in lengths:
      tokens = np.ascontiguousarray(all_tokens[:, :t])
      with torch.no_grad():
        ref = fla_model(torch.as_tensor(tokens, device="cuda"), use_cache=False)
        ref = ref.logits.float().cpu().numpy()
      got = all_got[:, :t]
      row = dict(model=name, seq_len=t, batch=_BATCH.value, layers=list(config.layers),
                 fla_gdn_path="fused_recurrent" if t <= 64 else "chunk",
                 lte_seconds=lte_seconds, **compare(got, ref))
      row["pass"] = row["rel_max"] <= _TOLERANCE.value
      results.append(row)
      print(f"{name:15s} T={t:5d} {row['fla_gdn_path']:15s} rel_max={row['rel_max']:.3e} "
            f"rel_rms={row['rel_rms']:.3e} argmax={row['argmax_agree']:.4f} "
            f"{'PASS' if row['pass'] else 'FAIL'}", flush=True)
      _write_report(results, jax, torch, fla, transformers)  # a run cut short keeps its rows
    del fla_model
    torch.cuda.empty_cache()

  print(f"wrote {_OUT.value}")
  if not all(r["pass"] for r in results):
    sys.exit(1)


if __name__ == "__main__":
  app.run(main)
