"""experiments.convert: a converted workdir restores as experiments.train restores it."""
from __future__ import annotations

import json

import jax
import numpy as np
import pytest

from experiments import configs as config_files
from experiments import convert as convert_cli
from lte_jax import configs as configs_lib
from lte_jax.data import make_train_iterator
from lte_jax.training import checkpoint, experiment, optimizer, train_state
from tests import helpers
from tests import test_convert as synthetic


def test_workdir_restores_with_converted_params_and_controller(tmp_path, monkeypatch):
  monkeypatch.setattr(synthetic, "VOCAB", 300)  # the byte tokenizer needs >= 259 ids
  cfg = synthetic.gdn_config(model_type="hybrid_gated_deltanet", attn=synthetic.lte_spec(),
                             vocab_size=300)
  tensors = synthetic.hf_tensors(cfg, np.random.default_rng(1))
  source = synthetic.save(tmp_path, cfg, tensors)
  workdir = str(tmp_path / "wd")
  command = convert_cli.convert_to_workdir(source, workdir, helpers.lalte_convert_config(), ["--config=laLTE"])
  model_file = f"{workdir}/converted_model.json"
  assert command[-1] == f"--config.model.from_file={model_file}" and "--config=laLTE" in command

  # What experiments.train does on start: resolve the config, build the abstract state, restore.
  config = helpers.lalte_convert_config()
  config.model.from_file = model_file
  exp = experiment.resolve(config)
  assert exp.model.layers == ("gdn", "lte") and exp.model.dtype == "bfloat16"
  assert json.loads((tmp_path / "wd" / "config.json").read_text())["model"]["layers"] == ["gdn", "lte"]
  model_def = train_state.make_model_def(exp.model)
  tx, _ = optimizer.make_optimizer(exp.optim, exp.steps)
  abstract = jax.eval_shape(lambda: train_state.init_train_state(model_def, tx, exp.seed))
  ckpt = checkpoint.Checkpointer(f"{workdir}/checkpoints", every=1, keep=3)
  state = ckpt.restore_latest(abstract, make_train_iterator(exp.data))
  ckpt.close()
  assert state is not None and int(state.step) == 0
  np.testing.assert_array_equal(np.asarray(state.params["blocks"][0]["mixer"]["q_proj"]["kernel"]),
                                tensors["model.layers.0.attn.q_proj.weight"].T)
  np.testing.assert_array_equal(np.asarray(state.controller.lam), tensors["model.l1_lambda"])
  assert all(float(np.abs(np.asarray(x)).max()) == 0.0
             for x in jax.tree.leaves(state.opt_state) if np.ndim(x) >= 1)  # fresh Adam moments

  with pytest.raises(ValueError, match="already holds checkpoints"):
    convert_cli.convert_to_workdir(source, workdir, helpers.lalte_convert_config())


def test_from_file_keeps_the_files_shapes(tmp_path):
  path = tmp_path / "model.json"
  model = configs_lib.get_config("GDN_SWA", "tiny", num_layers=3)
  path.write_text(json.dumps({"model": json.loads(json.dumps(configs_lib.to_dict(model),
                                                             default=list))}))
  config = helpers.lalte_convert_config()
  config.model.from_file = str(path)
  got = experiment.model_config(config)
  assert got == configs_lib.replace(model, dtype="bfloat16")
  config.model.num_layers = 2
  with pytest.raises(ValueError, match="num_layers cannot be set together with config.model.from_file"):
    experiment.model_config(config)


def test_eval_loader_reads_a_converted_workdir(tmp_path, monkeypatch):
  from lte_jax.evals.loading import load_run  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(synthetic, "VOCAB", 300)
  cfg = synthetic.gdn_config(vocab_size=300, attn=dict(layers=[1], num_heads=4, num_kv_heads=2))
  tensors = synthetic.hf_tensors(cfg, np.random.default_rng(2))
  source = synthetic.save(tmp_path, cfg, tensors)
  workdir = str(tmp_path / "wd")
  config = config_files.load(config_files.resolve("GDN_Attn"))
  config.data.seq_len, config.data.batch_size = 16, 2
  convert_cli.convert_to_workdir(source, workdir, config)
  run = load_run(workdir)
  assert run.step == 0 and run.model.config.layers == ("gdn", "attn")
  np.testing.assert_array_equal(np.asarray(run.model.lm_head.kernel[...]),
                                tensors["lm_head.weight"].T)
