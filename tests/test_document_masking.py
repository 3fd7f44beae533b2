"""Document boundaries: data.document_masking (per-document segments, or one sequence a row as
the reference trainer) and data.append_eos (EOS-ended or BOS-only documents)."""
from __future__ import annotations

import json

import jax
import numpy as np
import pytest
from flax import nnx

from lte_jax import configs
from lte_jax.data import DataConfig, make_document_dataset, make_train_iterator
from lte_jax.data.boundaries import apply_document_masking
from lte_jax.models import HybridLM
from tests.quick_compile import quick_compile  # noqa: F401  (autouse fixture)

T, CUT = 48, 24  # a row of two documents: [0, 24) and [24, 48)
NEAR, FAR = CUT - 1, 1  # doc 1's last token (every mixer's reach), a far one (a sink)


def _doc_positions(seg: np.ndarray) -> np.ndarray:
  """[B, T] position inside each run of equal ids (segments.positions_from_segment_ids)."""
  pos = np.zeros_like(seg)
  for t in range(1, seg.shape[1]):
    pos[:, t] = np.where(seg[:, t] == seg[:, t - 1], pos[:, t - 1] + 1, 0)
  return pos


def _packed_batch() -> dict:
  """Two rows as the packer makes them: three documents and a padded tail."""
  seg = np.array([[1] * 5 + [2] * 3, [1] * 2 + [2] * 4 + [0] * 2], np.int32)
  batch = {"inputs": np.arange(16, dtype=np.int32).reshape(2, 8) + 3,
           "targets": np.arange(16, dtype=np.int32).reshape(2, 8) + 4,
           "segment_ids": seg,
           "positions": _doc_positions(seg),
           "loss_mask": (seg != 0).astype(np.float32)}
  batch["loss_mask"][0, 2] = 0  # an MQAR-style non-query token keeps its 0
  return batch


def test_batch_function_outputs_per_setting():
  batch = _packed_batch()
  kept = apply_document_masking(batch, True)
  for key, value in batch.items():
    np.testing.assert_array_equal(kept[key], value)
  merged = apply_document_masking(batch, False)
  np.testing.assert_array_equal(merged["segment_ids"],
                                [[1] * 8, [1] * 6 + [0] * 2])  # padding stays 0
  np.testing.assert_array_equal(merged["positions"], np.tile(np.arange(8), (2, 1)))
  for key in ("inputs", "targets", "loss_mask"):
    np.testing.assert_array_equal(merged[key], batch[key])
  assert merged["segment_ids"].dtype == merged["positions"].dtype == np.int32
  with pytest.raises(ValueError, match="document_masking"):
    apply_document_masking(batch, "no")


@pytest.mark.parametrize("field", ["document_masking", "append_eos"])
def test_config_fields_are_validated(field):
  assert getattr(DataConfig(), field) is True
  with pytest.raises(ValueError, match=f"DataConfig.{field}"):
    DataConfig(**{field: 1})


@pytest.mark.parametrize("recipe,size,want", [("default", "tiny", True),
                                               ("paper", "0.4B", False)])
def test_recipes_set_both_fields(recipe, size, want):
  from experiments.configs.base import get_base_config  # pylint: disable=g-import-not-at-top
  from lte_jax.training import experiment  # pylint: disable=g-import-not-at-top
  config = get_base_config()
  config.recipe, config.size = recipe, size
  data = experiment.resolve(config, num_devices=1).data
  assert data.document_masking is want and data.append_eos is want
  config.data.document_masking = True  # a field set in the config wins over the recipe
  assert experiment.resolve(config, num_devices=1).data.document_masking is True


def test_train_help_documents_the_fields():
  from experiments import train  # pylint: disable=g-import-not-at-top
  from lte_jax.data import DOCUMENTS_HELP  # pylint: disable=g-import-not-at-top
  text = train.flags.FLAGS["config"].help
  assert DOCUMENTS_HELP in text
  assert "data.document_masking=True" in text and "data.append_eos=True" in text


def _corpus(tmp_path, texts):
  path = tmp_path / "docs.jsonl"
  path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
  return str(path)


TEXTS = ["first document", "two", "a third one, longer than the others"]


@pytest.mark.parametrize("append_eos", [True, False])
@pytest.mark.parametrize("masking", [True, False])
def test_pipeline_rows(tmp_path, append_eos, masking):
  """BOS-only documents without masking are the reference's rows: the stream
  BOS doc1 BOS doc2 ... cut into rows, targets the next token, positions 0..T-1."""
  cfg = DataConfig(source="jsonl", path=_corpus(tmp_path, TEXTS), seq_len=32, batch_size=2,
                   shuffle=False, num_epochs=1, document_masking=masking,
                   append_eos=append_eos)
  batch = next(make_train_iterator(cfg))
  stream = np.concatenate([[1, *(b + 3 for b in t.encode())] for t in TEXTS])  # byte ids
  end = 2 if append_eos else 1
  real = batch["segment_ids"] != 0
  inputs, targets = batch["inputs"][real], batch["targets"][real]
  np.testing.assert_array_equal(inputs, stream)  # row 1 ends in padding, nothing between
  want_targets = np.append(stream[1:], 0)
  ends = np.flatnonzero(stream == 1)[1:] - 1  # each document's last token
  want_targets[ends], want_targets[-1] = end, end
  np.testing.assert_array_equal(targets, want_targets)
  assert (2 in batch["inputs"]) is False and (2 in batch["targets"]) is append_eos
  np.testing.assert_array_equal(batch["loss_mask"], real.astype(np.float32))
  if masking:
    want = _doc_positions(batch["segment_ids"])
    np.testing.assert_array_equal(batch["positions"][real], want[real])
    assert batch["segment_ids"][0].max() == 3  # three documents in row 0
  else:
    np.testing.assert_array_equal(batch["segment_ids"], real.astype(np.int32))
    np.testing.assert_array_equal(batch["positions"], np.tile(np.arange(32), (2, 1)))


def test_bos_only_niah_documents_have_no_eos():
  cfg = DataConfig(seq_len=1024, mixture={"niah": 1.0}, append_eos=False)
  docs = make_document_dataset(cfg)
  for i in range(2):
    doc = docs[i]
    assert 2 not in doc["inputs"] and 2 not in doc["targets"]
    assert doc["inputs"][0] == 1 and doc["targets"][-1] == 1


# ---- every mixer reads across documents without masking, none with it ----

MIXERS = ("gdn", "attn", "swa", "lte", "nsa")


def _mixers() -> HybridLM:
  """One layer of each mixer, random weights of std 0.3 set from numpy: no eager
  initialisers to compile. GDN decays slowly; the LTE scorer retains nothing (r < 0),
  so only its window and sinks reach far back."""
  cfg = configs.get_config(
      "GDN", "tiny", layers=MIXERS, vocab_size=97, d_model=32, intermediate_size=64,
      gdn=configs.GDNConfig(num_heads=2, head_dim=16, chunk_size=8),
      attn=configs.AttentionConfig(num_heads=2, num_kv_heads=1, head_dim=16),
      swa=configs.AttentionConfig(num_heads=2, num_kv_heads=1, head_dim=16, window_size=6),
      lte=configs.LTEConfig(num_heads=2, num_kv_heads=1, head_dim=16, sink_size=2,
                            window_size=13, budget=4, dropout=0.0),
      nsa=configs.NSAConfig(num_heads=2, num_kv_heads=1, head_dim=16, block_size=4,
                            block_count=3, window_size=6))
  graph, params, rest = nnx.split(nnx.eval_shape(lambda: HybridLM(cfg, rngs=nnx.Rngs(0))),
                                  nnx.Param, ...)
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda p: (0.3 * rng.standard_normal(p.shape)).astype(p.dtype), params)
  gdn, scorer = (params["blocks"][MIXERS.index(m)]["mixer"] for m in ("gdn", "lte"))
  gdn["A_log"][...] = np.full(2, -4.0, np.float32)  # slow decay: the state reaches far
  scorer = scorer["scorer"]
  scorer["proj_kernel"][...] = 0.05 * scorer["proj_kernel"][...]
  scorer["proj_bias"][...] = np.full(1, -2.0, np.float32)
  rest = jax.tree.map(lambda x: jax.random.key(0) if jax.dtypes.issubdtype(
      x.dtype, jax.dtypes.prng_key) else np.zeros(x.shape, x.dtype), rest)
  return nnx.merge(graph, params, rest)


@nnx.jit
def _mix_all(model, x, segment_ids, positions):
  """Each mixer alone on x [B, T, D]: ({mixer: y [B, T, D]}, LTE r [B, T, Hkv])."""
  out, r = {}, None
  for name, block in zip(MIXERS, model.blocks):
    out[name], aux = block.mixer(x, segment_ids=segment_ids, positions=positions)
    r = aux.get("retention", r)
  return out, r


@pytest.fixture(scope="module")
def mixed():
  """Rows [original, doc 1's NEAR token changed, its FAR token changed] of two
  documents, packed with document masking (rows 0-2) and without (rows 3-5)."""
  x = np.random.default_rng(1).standard_normal((T, 32)).astype(np.float32)
  rows = np.stack([x, x, x])
  rows[1, NEAR] += 1.0
  rows[2, FAR] += 1.0
  seg = np.repeat([[1] * CUT + [2] * (T - CUT)], 3, axis=0).astype(np.int32)
  pos = np.repeat([list(range(CUT)) + list(range(T - CUT))], 3, axis=0).astype(np.int32)
  views = [apply_document_masking({"segment_ids": seg, "positions": pos}, m)
           for m in (True, False)]
  cat = lambda key: np.concatenate([v[key] for v in views])
  out, r = _mix_all(_mixers(), np.concatenate([rows, rows]), cat("segment_ids"),
                    cat("positions"))
  return {k: np.asarray(v) for k, v in out.items()}, np.asarray(r)


# (mixer, does a FAR change reach document 2 without masking?): SWA's window does not.
@pytest.mark.parametrize("mixer,far_reaches", [("gdn", True), ("attn", True), ("swa", False),
                                               ("lte", True), ("nsa", True)])
def test_every_mixer_reads_across_documents_only_without_masking(mixed, mixer, far_reaches):
  out, r = mixed
  doc2 = out[mixer][:, CUT:]
  diff = lambda a, b: float(np.max(np.abs(doc2[a] - doc2[b])))
  scale = float(np.max(np.abs(doc2)))
  # Masked: document 2 cannot see document 1 at all.
  assert diff(1, 0) <= 1e-6 * scale and diff(2, 0) <= 1e-6 * scale
  # Unmasked: it reads doc 1's last token (state, conv, window, scorer, blocks) ...
  assert diff(4, 3) > 1e-3 * scale
  # ... and its far token through state, full attention, the row's sinks, NSA block 0.
  assert (diff(5, 3) > 1e-3 * scale) is far_reaches
  if mixer == "lte":
    assert np.all(r < 0)  # so the far token reaches document 2 only as a sink
    # The scorer's convolutions look across the boundary without masking only.
    near = slice(CUT, CUT + 6)
    np.testing.assert_array_equal(r[1, near], r[0, near])
    assert np.max(np.abs(r[4, near] - r[3, near])) > 1e-6
    np.testing.assert_array_equal(r[4, CUT + 7:], r[3, CUT + 7:])
