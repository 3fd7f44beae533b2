"""Fields shared by every training config; each architecture's file edits a copy.

Every field can be overridden on the command line: ``--config.optim.learning_rate=1e-4``.
Fields set to None under ``model`` keep the value of the ``size`` preset
(lte_jax.configs.get_config(arch, size, ...)). Fields marked "recipe" are None here and
take the value of ``config.recipe`` unless set (lte_jax.training.recipes.RECIPES).

The 'default' recipe trains a tiny model on the embedded corpus on a laptop CPU in a few
minutes. The paper's training recipe (PAPER.md section 5), e.g. for the 1.4B laLTE:
  --config.recipe=paper --config.size=1.4B
  --config.data.source=jsonl --config.data.path=... --config.data.tokenizer=...
  --config.eval.every=1000 --config.eval.batches=16 --config.eval.holdout=2000
"""
from __future__ import annotations

import ml_collections
from ml_collections import config_dict


def get_base_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.arch = "laLTE"         # lte_jax.configs.ARCHITECTURES
  config.size = "tiny"          # tiny | 0.4B | 1.4B
  config.recipe = "default"     # default | paper: fills the fields marked "recipe"
  config.steps = config_dict.placeholder(int)   # recipe; optimizer updates
  config.seed = 42

  # ModelConfig overrides; None keeps the preset's value.
  config.model = ml_collections.ConfigDict()
  config.model.num_layers = config_dict.placeholder(int)
  config.model.d_model = config_dict.placeholder(int)
  config.model.intermediate_size = config_dict.placeholder(int)
  config.model.vocab_size = config_dict.placeholder(int)
  config.model.dtype = "bfloat16"        # compute dtype (fp32 math in norms, softmax, loss)
  config.model.param_dtype = "float32"   # master parameters
  # recipe; none | full | dots | dots_mixers (lte_jax.remat)
  config.model.remat = config_dict.placeholder(str)
  # recipe; lax.scan over the layer cycle: compile time flat in depth
  config.model.scan_layers = config_dict.placeholder(bool)
  # recipe; normal | reference (lte_jax.configs.INIT_SCHEMES)
  config.model.init = config_dict.placeholder(str)
  config.model.lte_dropout = config_dict.placeholder(float)
  # LTE scorer matmul operands: float32 | bfloat16 (lte_jax.configs.LTEConfig.scorer_dtype).
  config.model.lte_scorer_dtype = config_dict.placeholder(str)
  config.model.implementation = config_dict.placeholder(str)  # op implementation for all mixers
  # GDN 'pallas' kernel options 'name=value;...' (GDNConfig.plan_options), e.g.
  # 'keep_states=True;block_k=32'.
  config.model.gdn_plan_options = config_dict.placeholder(str)
  # LTE 'pallas' kernel options (LTEConfig.plan_options), e.g. 'far_gather=copy'.
  config.model.lte_plan_options = config_dict.placeholder(str)
  # GDN q/k/v short convs: 'pallas' | 'xla' (GDNConfig.conv_implementation); None: per backend.
  config.model.gdn_conv_implementation = config_dict.placeholder(str)
  # A ModelConfig JSON (e.g. WORKDIR/converted_model.json from experiments.convert) used
  # instead of arch/size and the shape fields above.
  config.model.from_file = config_dict.placeholder(str)

  # lte_jax.data.DataConfig fields (batch_size is global, over all processes).
  config.data = ml_collections.ConfigDict()
  config.data.source = "embedded"
  config.data.path = config_dict.placeholder(str)
  config.data.text_field = "text"
  config.data.tokenizer = "byte"
  config.data.seq_len = config_dict.placeholder(int)     # recipe
  config.data.batch_size = config_dict.placeholder(int)  # recipe
  config.data.seed = 0
  config.data.mixture = ml_collections.ConfigDict({"corpus": 1.0, "mqar": 0.0, "niah": 0.0})
  config.data.niah_loss = "all"  # 'answer': NIAH documents train on their answers only
  config.data.worker_count = 0
  config.data.read_threads = 2
  # A corpus record that is not UTF-8, bad JSON, null or without a string text_field:
  # 'skip' drops and counts it (metrics.jsonl data/bad_records, the run summary) | 'error'
  # stops at the first, naming its file and line (lte_jax.data.DataConfig.bad_records).
  config.data.bad_records = "skip"
  config.data.max_bad_fraction = 0.01  # 'skip' stops once more of the records are bad
  config.data.validate = True          # parse every JSONL line before the first step
  # recipe; True: each document in a packed row its own segment (no mixer reads across it,
  # RoPE restarts) | False: each row one sequence, positions 0..T-1 (the reference trainer)
  config.data.document_masking = config_dict.placeholder(bool)
  # recipe; True: a document's last target is EOS | False: BOS only (the next document's BOS)
  config.data.append_eos = config_dict.placeholder(bool)

  # lte_jax.training.optimizer.OptimizerConfig fields, plus accumulation.
  config.optim = ml_collections.ConfigDict()
  config.optim.learning_rate = 3e-4
  config.optim.b1 = 0.9
  config.optim.b2 = 0.95
  config.optim.eps = 1e-15
  config.optim.weight_decay = 0.1
  config.optim.warmup_steps = config_dict.placeholder(int)   # recipe
  config.optim.final_lr_ratio = 0.1
  config.optim.clip_norm = 1.0
  # recipe; matrices | all (lte_jax.training.optimizer.WEIGHT_DECAY_MASKS)
  config.optim.weight_decay_mask = config_dict.placeholder(str)
  # recipe; skip_step | skip_update: what a non-finite step advances (NONFINITE_MODES)
  config.optim.nonfinite = config_dict.placeholder(str)
  # recipe, one of the two: micro-batches per update (batch_size must divide), or
  # sequences per device and micro-batch, the accumulation then derived from the devices
  # that split the batch (mesh data x fsdp).
  config.optim.grad_accum = config_dict.placeholder(int)
  config.optim.micro_batch_per_device = config_dict.placeholder(int)

  # Device mesh: -1 takes the devices left over.
  config.mesh = ml_collections.ConfigDict()
  config.mesh.data = config_dict.placeholder(int)   # recipe
  config.mesh.fsdp = config_dict.placeholder(int)   # recipe
  config.mesh.tensor = 1

  config.checkpoint = ml_collections.ConfigDict()
  config.checkpoint.every = 100    # steps between saves (also saved at the end and on SIGTERM)
  config.checkpoint.keep = 3       # newest checkpoints kept
  config.checkpoint.async_save = True

  config.log = ml_collections.ConfigDict()
  config.log.every = 10            # steps between metric records (JSONL, TensorBoard)
  config.log.progress = True       # progress line with loss, tokens/s and ETA
  config.log.tensorboard = True

  # Validation (lte_jax.training.evaluation.EvalConfig): val/loss and val/ppl in metrics.jsonl,
  # TensorBoard and the progress line, on the same batches every time.
  config.eval = ml_collections.ConfigDict()
  config.eval.every = 100          # steps between evaluations, and after the last (0: none)
  config.eval.batches = 2          # validation batches of the training shape
  # Corpus documents kept out of training (lte_jax.data.holdout): a fraction in (0, 1) or,
  # >= 1, a number of documents; 0 trains on all. 0.01 of the 79 embedded topics is one.
  config.eval.holdout = 0.01
  config.eval.path = config_dict.placeholder(str)    # a separate validation glob instead
  config.eval.source = config_dict.placeholder(str)  # its kind (default: data.source)
  return config
