"""lte_jax.convert.save_hf: every architecture written as a Hugging Face directory reads back
through load_hf with the same config, parameters and logits; what a format cannot express
is refused before anything is written; experiments.convert --to_hf and the lte_jax half of
conformance_fla's export cases."""
from __future__ import annotations

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from absl.testing import flagsaver
from flax import nnx

from experiments import conformance_fla
from experiments import convert as convert_cli
from lte_jax import configs as configs_lib
from lte_jax import convert, lte_controller
from lte_jax.convert import export, export_config, hf_params
from lte_jax.data import tokenizers
from lte_jax.training import train_state
from tests import helpers

VOCAB = 97
# Each forward is compiled once, and run on both models: XLA's cheap CPU settings suffice.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def tiny(arch: str, implementation: str | None = "reference", **overrides):
  """num_layers 2, d_model 64; attention-like heads 4 x 16 (FLA splits d_model), the
  'reference' ops (the cheapest to compile; load_hf is given the same)."""
  impl = dict(implementation=implementation)
  fields = dict(
      num_layers=2, d_model=64, vocab_size=VOCAB, intermediate_size=128, max_position=64,
      gdn=configs_lib.GDNConfig(num_heads=2, head_dim=16, expand_v=2.0, **impl),
      attn=configs_lib.AttentionConfig(num_heads=4, num_kv_heads=2, head_dim=16, **impl),
      swa=configs_lib.AttentionConfig(num_heads=4, num_kv_heads=2, head_dim=16, window_size=5,
                                      **impl),
      lte=configs_lib.LTEConfig(num_heads=4, num_kv_heads=2, head_dim=16, window_size=12,
                                budget=8, target_kept=8, target_seq_len=64, dilations=(1, 1, 1),
                                dropout=0.0, **impl),
      nsa=configs_lib.NSAConfig(num_heads=4, num_kv_heads=2, head_dim=16, block_size=4,
                                block_count=3, window_size=8, **impl))
  fields.update(overrides)
  config = configs_lib.get_config(arch, "tiny", **fields)
  # Unused mixers as load_hf leaves them (ModelConfig's defaults), so the configs compare equal.
  defaults = {f.name: f.default for f in dataclasses.fields(configs_lib.ModelConfig)}
  return configs_lib.replace(config, **{
      mixer: configs_lib.replace(defaults[mixer], **impl)
      for mixer in configs_lib.MIXERS if mixer not in config.layers})


def random_params(config, seed=0) -> dict:
  """nnx.to_pure_dict parameters drawn with numpy: no init to compile."""
  return conformance_fla.random_lte_params(configs_lib.replace(config, init_std=0.2), seed)


def same_params(got, want):
  jax.tree.map(lambda g, w: np.testing.assert_array_equal(np.asarray(g), np.asarray(w)),
               got, want)


def bound_model(config, params):
  """The model as load_hf builds it: eval mode, LTE budget enforced."""
  model = train_state.make_model_def(config, train=False).bind(
      jax.tree.map(jnp.asarray, params), jax.random.key(0))
  model.eval()
  model.set_attributes(enforce_budget=True, raise_if_not_found=False)
  return model


@pytest.mark.parametrize("arch", configs_lib.ARCHITECTURES)
def test_every_architecture_reads_back_with_identical_logits(tmp_path, arch):
  """T = 24 > the LTE window + 1 (13), the NSA blocks (4) and the SWA window (5)."""
  config = tiny(arch)
  params = random_params(config)
  path = convert.save_hf(bound_model(config, params), None, str(tmp_path / "hf"))
  model_type = json.loads(open(os.path.join(path, "config.json")).read())["model_type"]
  assert model_type == ("hybrid_gated_deltanet" if arch in ("laLTE", "laNSA", "NSA")
                        else "gated_deltanet")
  loaded, loaded_config = convert.load_hf(path, implementation="reference")
  assert loaded_config == config
  same_params(nnx.to_pure_dict(nnx.state(loaded, nnx.Param)), params)
  tokens = jnp.asarray(np.random.default_rng(1).integers(0, VOCAB, (1, 24)), jnp.int32)
  graphdef, state = nnx.split(bound_model(config, params))
  forward = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x)[0])
  forward = forward.lower(state, tokens).compile(FAST_COMPILE)
  loaded_graphdef, loaded_state = nnx.split(loaded)
  assert loaded_graphdef == graphdef  # the same program, so one compilation serves both
  np.testing.assert_array_equal(np.asarray(forward(loaded_state, tokens)),
                                np.asarray(forward(state, tokens)))


def test_controller_and_bfloat16_round_trip(tmp_path):
  config = tiny("laLTE", num_layers=4)
  rng = np.random.default_rng(2)
  state = lte_controller.init_controller(2, 2).replace(
      lam=jnp.asarray(rng.uniform(0, 1e-3, (2, 2)), jnp.float32),
      kept_ema=jnp.asarray(rng.uniform(0, 30, (2, 2)), jnp.float32))
  params = random_params(config)
  path = convert.save_hf(params, config, str(tmp_path / "hf"), controller=state,
                         dtype="bfloat16")
  tensors = convert.read_checkpoint(path)
  assert tensors["model.embeddings.weight"].dtype.name == "bfloat16"
  assert tensors["model.l1_lambda"].dtype == np.float32
  converted = convert.convert_hf(path)
  np.testing.assert_array_equal(converted.controller["lam"], np.asarray(state.lam))
  np.testing.assert_array_equal(converted.controller["kept_ema"], np.asarray(state.kept_ema))
  bf16 = jax.tree.map(lambda x: x.astype(ml_dtypes.bfloat16).astype(np.float32), params)
  same_params(converted.params, bf16)
  assert json.loads(open(os.path.join(path, "config.json")).read())["torch_dtype"] == "bfloat16"


# One case per layout the importer knows (hf_params.KINDS): a new kind fails the first case.
LAYOUTS = [("copy", (3, 5)), ("linear", (4, 6)), ("short_conv", (4, 6)),
           ("scorer_conv", (3, 2, 8, 4)), ("scorer_bias", (2, 4)), ("scorer_proj", (2, 4)),
           ("scorer_conv_shared", (3, 2, 8, 4)), ("scorer_bias_shared", (2, 4)),
           ("scorer_proj_shared", (2, 4)), ("proj_bias_shared", (2,))]


@pytest.mark.parametrize("kind, shape", LAYOUTS)
def test_every_importer_layout_is_inverted(kind, shape):
  """to_hf_layout is the importer's transform run backwards, for each of its KINDS."""
  assert {k for k, _ in LAYOUTS} == set(hf_params.KINDS)
  to_hf_shape, to_lte = hf_params.KINDS[kind]
  rng = np.random.default_rng(3)
  hf = rng.standard_normal(to_hf_shape(shape)).astype(np.float32)
  lte = np.asarray(to_lte(hf, shape))  # per-head copies for the shared kinds
  np.testing.assert_array_equal(export.to_hf_layout(kind, lte), hf)
  if kind.endswith("_shared"):
    lte = lte.copy()
    lte.reshape(-1)[-1] += 1  # one head's copy differs: one tensor cannot hold both
    with pytest.raises(ValueError, match="per-head copies differ"):
      export.to_hf_layout(kind, lte)


def test_config_only_options_round_trip():
  """expand_v 1.5, NSA without a window, both attn and swa layers (a list of specs)."""
  for config in (tiny("GDN", gdn=configs_lib.GDNConfig(num_heads=2, head_dim=16, expand_v=1.5)),
                 tiny("NSA", nsa=configs_lib.NSAConfig(num_heads=4, num_kv_heads=2, head_dim=8,
                                                       block_size=4, block_count=3,
                                                       window_size=None)),
                 tiny("GDN", layers=("gdn", "attn", "swa"))):
    hf, _ = convert.hf_config_for(config)
    got, _ = convert.model_config_from_hf(json.loads(json.dumps(hf)))
    assert export_config.compared_fields(got) == export_config.compared_fields(config)


@pytest.mark.parametrize("arch, overrides, message", [
    ("GDN_Attn", dict(attn=configs_lib.AttentionConfig(num_heads=4, num_kv_heads=2,
                                                       head_dim=32)),
     r"ModelConfig.attn.head_dim = 32: FLA's attention splits hidden_size.* = 16"),
    ("GDN", dict(norm_eps=1e-5), r"ModelConfig.gdn.norm_eps = 1e-06 \(the gated_deltanet file "
                                 r"would give 1e-05; the formats have one norm_eps"),
    ("laLTE", dict(max_position=128), r"ModelConfig.lte.target_seq_len = 64 .*strict=False"),
    ("laLTE", dict(layers=("gdn", "lte", "nsa")), "with lte and nsa layers"),
    ("laLTE", dict(layers=("attn", "lte")), "with attn and lte layers"),
    ("GDN_Attn", dict(attn=configs_lib.AttentionConfig(num_heads=4, num_kv_heads=2,
                                                       head_dim=16, window_size=8)),
     "ModelConfig.attn.window_size = 8: the formats call windowed attention 'swa'"),
])
def test_configs_a_format_cannot_express_are_refused(tmp_path, arch, overrides, message):
  config = tiny(arch, **overrides)
  with pytest.raises(ValueError, match=message):
    convert.save_hf({}, config, str(tmp_path / "new" / "hf"))
  assert os.listdir(tmp_path) == []  # not even the parent folder


def test_controller_targets_export_with_strict_false(tmp_path):
  config = tiny("laLTE", max_position=128)
  path = convert.save_hf(random_params(config), config, str(tmp_path / "hf"), strict=False)
  got = convert.convert_hf(path).config
  assert (got.lte.target_kept, got.lte.target_seq_len) == (8, 128)


def test_bad_arguments_are_refused_and_nothing_is_written(tmp_path):
  config = tiny("laLTE")
  params = random_params(config)
  target = str(tmp_path / "hf")

  def refused(message, model=params, cfg=config, path=target, **kwargs):
    with pytest.raises(ValueError, match=message):
      convert.save_hf(model, cfg, path, **kwargs)

  untied = configs_lib.replace(config, tie_embeddings=False)
  refused(r"missing \[\"\('lm_head', 'kernel'\)\"\]", cfg=untied)
  head = dict(params, lm_head={"kernel": np.zeros((64, VOCAB), np.float32)})
  refused(r"tie_embeddings=True\): missing \[\], unexpected \[\"\('lm_head', 'kernel'\)\"\]",
          model=head)
  bad = jax.tree.map(lambda x: x, params)
  bad["final_norm"]["weight"] = np.ones(65, np.float32)
  refused(r"final_norm/weight \(65,\) \(expected \(64,\)\)", model=bad)
  refused("model must be a HybridLM or its parameters", model=[1])
  refused(r"config does not describe model: ModelConfig fields \['d_model'",
          model=bound_model(config, params), cfg=tiny("laLTE", d_model=32))
  refused("controller is given but the model has no LTE layers", model=random_params(tiny("GDN")),
          cfg=tiny("GDN"), controller=lte_controller.init_controller(1, 2))
  refused(r"controller.lam must have shape \[1, 2\]", controller={"lam": np.zeros((2, 2)),
                                                                  "kept_ema": np.zeros((1, 2))})
  refused("controller.lam must be finite and >= 0", controller={"lam": -np.ones((1, 2)),
                                                                "kept_ema": np.zeros((1, 2))})
  refused("tokenizer ByteTokenizer.* has 259 ids but the model only 97", tokenizer="byte")
  refused(r"dtype must be one of \('float32', 'bfloat16'\)", dtype="float16")
  assert os.listdir(tmp_path) == []
  (tmp_path / "file").write_text("")
  refused("is a file, not a directory", path=str(tmp_path / "file"))
  (tmp_path / "hf").mkdir()
  (tmp_path / "hf" / "notes.txt").write_text("mine")
  refused("exists and is not empty; pass overwrite=True", path=target)
  assert os.listdir(tmp_path / "hf") == ["notes.txt"]


def test_a_failed_write_leaves_nothing_and_overwrite_replaces(tmp_path, monkeypatch):
  config = tiny("GDN")
  params = random_params(config)
  old = tmp_path / "hf"
  old.mkdir()
  (old / "model.safetensors.index.json").write_text("{}")  # would shadow model.safetensors

  def disk_full(*args, **kwargs):
    raise OSError("no space left on device")

  with monkeypatch.context() as patch:
    patch.setattr(export, "write_safetensors", disk_full)
    with pytest.raises(OSError, match="no space left"):
      convert.save_hf(params, config, str(tmp_path / "a" / "b" / "hf"))
    with pytest.raises(OSError, match="no space left"):
      convert.save_hf(params, config, str(old), overwrite=True)
  assert sorted(os.listdir(tmp_path)) == ["hf"] and os.listdir(old) == [
      "model.safetensors.index.json"]
  convert.save_hf(params, config, str(old), overwrite=True)
  assert sorted(os.listdir(tmp_path)) == ["hf"]
  assert sorted(os.listdir(old)) == ["config.json", "model.safetensors"]
  same_params(convert.convert_hf(str(old)).params, params)


def test_tokenizers_are_written_so_they_load_again(tmp_path):
  config = tiny("transformer", vocab_size=300)
  params = random_params(config)
  byte_dir = convert.save_hf(params, config, str(tmp_path / "byte"), tokenizer="byte")
  got, byte = tokenizers.get_tokenizer(byte_dir), tokenizers.ByteTokenizer()
  text = "Grüße, 世界 \t\n 🙂 ~\x00"
  assert got.encode(text) == byte.encode(text) and got.decode(byte.encode(text)) == text
  assert (got.bos_id, got.eos_id, got.pad_id, got.vocab_size) == (1, 2, 0, 259)
  hf = json.loads(open(os.path.join(byte_dir, "config.json")).read())
  assert (hf["bos_token_id"], hf["eos_token_id"], hf["pad_token_id"]) == (1, 2, 0)

  source = os.path.join(byte_dir, "tokenizer.json")  # a tokenizer.json tokenizer: copied
  copied = convert.save_hf(params, config, str(tmp_path / "json"),
                           tokenizer=tokenizers.HFTokenizer(source))
  assert open(os.path.join(copied, "tokenizer.json")).read() == open(source).read()
  assert json.loads(open(os.path.join(copied, "tokenizer_config.json")).read())[
      "eos_token"] == "</s>"

  sp = object.__new__(tokenizers.SentencePieceTokenizer)  # the copy needs no sentencepiece
  sp.path, sp.vocab_size, sp.bos_id, sp.eos_id, sp.pad_id = str(tmp_path / "sp.model"), 8, 1, 2, 2
  (tmp_path / "sp.model").write_bytes(b"\x0a\x01spm")
  sp_dir = convert.save_hf(params, config, str(tmp_path / "sp"), tokenizer=sp)
  assert open(os.path.join(sp_dir, "tokenizer.model"), "rb").read() == b"\x0a\x01spm"


def test_cli_exports_a_workdir_with_its_controller_and_tokenizer(tmp_path, parsed_flags):
  """HF dir -> workdir (experiments.convert --to) -> HF dir (--to_hf): the same tensors."""
  config = tiny("laLTE", vocab_size=300)  # the byte tokenizer's 259 ids fit
  params = random_params(config)
  controller = {"lam": np.full((1, 2), 3e-4, np.float32),
                "kept_ema": np.asarray([[5.0, 7.0]], np.float32)}
  source = convert.save_hf(params, config, str(tmp_path / "hf"), controller=controller)
  workdir = str(tmp_path / "wd")
  convert_cli.convert_to_workdir(source, workdir, helpers.lalte_convert_config())

  out = str(tmp_path / "out")
  with flagsaver.flagsaver(**{"from": workdir, "to": None, "to_hf": out}):
    convert_cli.main(["convert"])
  written = convert.read_checkpoint(out)
  for name, tensor in convert.read_checkpoint(source).items():
    np.testing.assert_array_equal(written[name], tensor, err_msg=name)
  assert set(written) == set(convert.read_checkpoint(source))
  assert convert.convert_hf(out).config == convert.convert_hf(source).config
  assert tokenizers.get_tokenizer(out).encode("ok") == tokenizers.ByteTokenizer().encode("ok")

  with pytest.raises(ValueError, match="path .* exists and is not empty; pass --overwrite"):
    convert_cli.export_workdir(workdir, out)
  with pytest.raises(ValueError, match="--from must be a workdir"):
    convert_cli.export_workdir(source, str(tmp_path / "x"))
  with pytest.raises(ValueError, match="--to_hf=.* is the workdir --from"):
    convert_cli.export_workdir(workdir, workdir)
  for flag_values in ({"to": "x", "to_hf": "y"}, {"to": None, "to_hf": None}):
    with flagsaver.flagsaver(**{"from": workdir, **flag_values}):
      with pytest.raises(SystemExit, match="give exactly one of --to .* and --to_hf"):
        convert_cli.main(["convert"])
  with pytest.raises(SystemExit, match="--config.data.seq_len does not apply with --to_hf"):
    convert_cli.parse_flags(["convert", f"--from={workdir}", "--to_hf=y",
                             "--config.data.seq_len=8"])


def test_conformance_export_case_writes_what_fla_loads(tmp_path):
  """The lte_jax half of conformance_fla's export_gdn_attn (the GPU run loads it in FLA)."""
  directory = str(tmp_path / "export_gdn_attn")
  model, config = conformance_fla.export_lte_model("export_gdn_attn", 0, directory, "xla")
  assert config.layers == ("gdn", "attn", "gdn", "attn") and config.tie_embeddings
  assert config.attn.implementation == "xla"
  hf = json.loads(open(os.path.join(directory, "config.json")).read())
  assert hf["model_type"] == "gated_deltanet" and hf["attn"]["layers"] == [1, 3]
  assert hf["architectures"] == ["GatedDeltaNetForCausalLM"]
  tensors = convert.read_checkpoint(directory)
  assert "lm_head.weight" not in tensors
  assert abs(float(np.mean(tensors["model.layers.0.attn.o_norm.weight"])) - 1) < 0.1
  assert float(np.std(tensors["model.layers.0.attn.o_norm.weight"])) > 0.1
  same_params(convert.convert_hf(directory).params, nnx.to_pure_dict(nnx.state(model, nnx.Param)))
