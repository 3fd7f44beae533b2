"""lte_jax.convert refuses malformed checkpoints before loading anything from them: shard
paths outside the model directory, safetensors headers whose offsets do not tile the data,
config.json files without the fields that fix the tensor shapes, and a failed
experiments.convert leaves no files behind."""
from __future__ import annotations

import json
import os
import re
import struct

import numpy as np
import pytest

from experiments import configs as config_files
from experiments import convert as convert_cli
from lte_jax import convert
from lte_jax.convert import safetensors as st
from tests import test_convert as synthetic

A = np.arange(6, dtype=np.float32).reshape(2, 3)   # bytes [0, 24) of the data
B = np.arange(4, dtype=np.float32) + 100           # bytes [24, 40)


def write_file(path, tensors=None):
  st.write_safetensors(str(path), {"a": A, "b": B} if tensors is None else tensors)
  return str(path)


def rewrite_header(path, mutate, *, extra=b""):
  """Replace the JSON header of the safetensors file at ``path`` by ``mutate(header)``."""
  raw = open(path, "rb").read()
  (size,) = struct.unpack("<Q", raw[:8])
  header = mutate(json.loads(raw[8:8 + size]))
  text = json.dumps(header).encode()
  with open(path, "wb") as f:
    f.write(struct.pack("<Q", len(text)) + text + raw[8 + size:] + extra)


def entry(**changes):
  def mutate(header):
    for name, fields in changes.items():
      header[name] = fields if not isinstance(fields, dict) else {**header[name], **fields}
    return header
  return mutate


# ---- safetensors headers ------------------------------------------------------------------

@pytest.mark.parametrize("mutate, extra, message", [
    # b reads a's first 16 bytes: silently the wrong weights before.
    (entry(b=dict(data_offsets=[0, 16])), b"", r"tensor '[ab]' .*overlaps tensor '[ab]'"),
    # a starts 8 bytes before the data, inside the header.
    (entry(a=dict(data_offsets=[-8, 16])), b"", r"tensor 'a'.*negative"),
    (entry(a=dict(data_offsets=[24, 0])), b"", r"tensor 'a'.*ends \(0\) before it begins \(24\)"),
    (entry(b=dict(shape=[6], data_offsets=[24, 48])), b"", r"tensor 'b'.*ends at byte 48 .* 40 bytes"),
    (entry(a=dict(data_offsets=[0, 20])), b"", r"tensor 'a'.*F32 \[2, 3\] is 24 bytes.*20"),
    (entry(a=dict(data_offsets=[0.5, 24.5])), b"", r"tensor 'a'.*data_offsets must be two "),
    (entry(a=dict(data_offsets=[0, 12, 24])), b"", r"tensor 'a'.*data_offsets must be two "),
    (entry(a=dict(shape=[-2, -3])), b"", r"tensor 'a'.*shape must be a list of integers >= 0"),
    (entry(a=dict(shape=6)), b"", r"tensor 'a'.*shape must be a list of integers >= 0"),
    (entry(a=dict(dtype=["F32"])), b"", r"tensor 'a' has dtype \['F32'\]; supported: "),
    (entry(a=dict(dtype="F4")), b"", r"tensor 'a' has dtype 'F4'; supported: "),
    (entry(a=[0, 24]), b"", r"tensor 'a'.*must be a JSON object"),
    (entry(a=dict(data_offsets=[8, 32])), b"", r"bytes \[0, 8\) .*no tensor.*'a' starts at byte 8"),
    (lambda h: h, b"\0" * 8, r"bytes \[40, 48\) of the data belong to no tensor"),
    (lambda h: [h], b"", r"header must be a JSON object"),
], ids=["overlap", "negative_begin", "backwards", "past_the_data", "byte_count", "float_offsets",
        "three_offsets", "negative_shape", "scalar_shape", "list_dtype", "unknown_dtype",
        "entry_not_object", "gap_before", "trailing_bytes", "header_not_object"])
def test_malformed_header_is_refused_naming_tensor_and_file(tmp_path, mutate, extra, message):
  path = write_file(tmp_path / "model.safetensors")
  rewrite_header(path, mutate, extra=extra)
  with pytest.raises(ValueError, match=message) as err:
    st.read_safetensors(path)
  assert path in str(err.value)


def test_header_length_beyond_the_file_is_refused(tmp_path):
  path = write_file(tmp_path / "model.safetensors")
  raw = open(path, "rb").read()
  (size,) = struct.unpack("<Q", raw[:8])
  with open(path, "wb") as f:  # the header still parses when read short: JSON + spaces
    f.write(struct.pack("<Q", size + 4096) + raw[8:8 + size])
  with pytest.raises(ValueError, match=rf"{re.escape(path)}.*header length {size + 4096} .* file of "
                     rf"{8 + size} bytes"):
    st.read_safetensors(path)


def test_a_tensor_named_twice_is_refused(tmp_path):
  """json.loads keeps the last of two equal keys; b's first entry would vanish unseen."""
  path = write_file(tmp_path / "model.safetensors", {"b": B})
  raw = open(path, "rb").read()
  (size,) = struct.unpack("<Q", raw[:8])
  text = raw[8:8 + size].decode().rstrip()
  entry_b = text[text.index('"b"'):-1]
  text = "{" + entry_b + ", " + entry_b + "}"
  with open(path, "wb") as f:
    f.write(struct.pack("<Q", len(text)) + text.encode() + raw[8 + size:])
  with pytest.raises(ValueError, match=rf"{re.escape(path)}: the safetensors header names 'b' "
                     "twice"):
    st.read_safetensors(path)


def test_well_formed_files_still_read(tmp_path):
  """A zero-size tensor shares its offset with the next one, as the reference writer puts it."""
  tensors = {"a": A, "empty": np.zeros((0, 3), np.float32), "b": B}
  got = st.read_safetensors(write_file(tmp_path / "x.safetensors", tensors))
  for name, value in tensors.items():
    np.testing.assert_array_equal(got[name], value)


# ---- sharded checkpoints: the index ------------------------------------------------------

def write_index(directory, weight_map, raw=None):
  text = raw if raw is not None else json.dumps({"metadata": {}, "weight_map": weight_map})
  (directory / st.INDEX_FILE).write_text(text)


@pytest.fixture
def model_dir(tmp_path):
  path = tmp_path / "model"
  path.mkdir()
  write_file(path / "model-1.safetensors", {"a": A})
  write_file(tmp_path / "outside.safetensors", {"b": B})
  return path


@pytest.fixture
def no_reads(monkeypatch):
  """Fails the test if a shard is opened: bad names must be refused before any read."""
  opened = []
  monkeypatch.setattr(st, "read_safetensors", lambda path: opened.append(path) or {})
  yield
  assert not opened, opened


@pytest.mark.parametrize("shard, message", [
    ("../outside.safetensors", "outside the model directory"),
    ("{tmp}/outside.safetensors", "outside the model directory"),
    ("/dev/zero", "outside the model directory"),
    ("link.safetensors", "outside the model directory"),
    ("missing.safetensors", "does not exist"),
    ("sub", "is not a regular file"),
    (".", "is not a regular file"),
])
def test_index_shards_must_be_files_inside_the_directory(model_dir, no_reads, shard, message):
  os.symlink(model_dir.parent / "outside.safetensors", model_dir / "link.safetensors")
  (model_dir / "sub").mkdir()
  shard = shard.format(tmp=model_dir.parent)
  write_index(model_dir, {"a": "model-1.safetensors", "b": shard})
  with pytest.raises(ValueError, match=rf"{st.INDEX_FILE}: shard {re.escape(repr(shard))} .*{message}"):
    st.read_checkpoint(str(model_dir))


def test_symlinks_into_the_hub_cache_blobs_are_followed(tmp_path):
  """huggingface_hub's cache: snapshots/<rev>/<file> -> ../../blobs/<hash>; nothing else
  outside the snapshot is reachable, by a symlink or by a name with '..'."""
  repo = tmp_path / "models--org--name"
  (repo / "blobs").mkdir(parents=True)
  snapshot = repo / "snapshots" / "abc123"
  snapshot.mkdir(parents=True)
  write_file(repo / "blobs" / "f00d")
  write_file(tmp_path / "outside.safetensors")
  os.symlink("../../blobs/f00d", snapshot / "model-1.safetensors")
  os.symlink("../../../outside.safetensors", snapshot / "model-2.safetensors")
  write_index(snapshot, {"a": "model-1.safetensors", "b": "model-1.safetensors"})
  np.testing.assert_array_equal(st.read_checkpoint(str(snapshot))["b"], B)
  for shard in ("model-2.safetensors", "../../blobs/f00d"):
    write_index(snapshot, {"a": shard, "b": shard})
    with pytest.raises(ValueError, match="outside the model directory"):
      st.read_checkpoint(str(snapshot))


@pytest.mark.parametrize("raw, message", [
    ("{not json", r"is not valid JSON"),
    ("[1, 2]", r"must hold a JSON object"),
    ('{"weight_map": ["model-1.safetensors"]}', r"'weight_map' must be a non-empty object"),
    ('{"weight_map": {"a": 3}}', r"weight_map\['a'\] must be a shard file name, got 3"),
    ('{"weight_map": {"a": ["model-1.safetensors"]}}', r"weight_map\['a'\] must be a shard"),
    ('{"weight_map": {"a": ""}}', r"weight_map\['a'\] must be a shard"),
])
def test_malformed_index_is_one_clear_error(model_dir, no_reads, raw, message):
  write_index(model_dir, None, raw=raw)
  with pytest.raises(ValueError, match=rf"{re.escape(str(model_dir))}/{st.INDEX_FILE}.*{message}"):
    st.read_checkpoint(str(model_dir))


def test_single_file_that_is_not_a_regular_file_is_refused(tmp_path, no_reads):
  os.symlink("/dev/zero", tmp_path / st.SINGLE_FILE)
  with pytest.raises(ValueError, match=rf"{st.SINGLE_FILE}.*outside the model directory"):
    st.read_checkpoint(str(tmp_path))
  os.remove(tmp_path / st.SINGLE_FILE)
  (tmp_path / st.SINGLE_FILE).mkdir()
  with pytest.raises(ValueError, match=rf"{st.SINGLE_FILE}.*is not a regular file"):
    st.read_checkpoint(str(tmp_path))
  with pytest.raises(ValueError, match="is not a directory"):
    st.read_checkpoint(str(tmp_path / "nowhere"))


# ---- config.json ---------------------------------------------------------------------------

@pytest.mark.parametrize("key", ["hidden_size", "vocab_size", "num_hidden_layers"])
def test_config_without_a_shape_field_names_it(key):
  hf = synthetic.gdn_config()
  del hf[key]
  with pytest.raises(ValueError, match=rf"config.json has no field {key}"):
    convert.model_config_from_hf(hf)


@pytest.mark.parametrize("change, message", [
    (dict(tie_word_embeddings="false"), "tie_word_embeddings = 'false' is not supported"),
    (dict(norm_eps=True), "norm_eps = True is not supported"),
    (dict(hidden_ratio="4"), "hidden_ratio = '4' is not supported"),
    (dict(initializer_range=None), "initializer_range = None is not supported"),
    (dict(attn=dict(layers=[True], num_heads=4)), "attn.layers = True is not supported"),
    (dict(attn=dict(layers=[1])), r"config.json has no field attn.attn.num_heads"),
])
def test_config_values_of_the_wrong_type_are_refused(change, message):
  with pytest.raises(ValueError, match=message):
    convert.model_config_from_hf(synthetic.gdn_config(**change))


def test_fla_documented_defaults_still_apply():
  hf = synthetic.gdn_config()
  for key in ("num_heads", "head_dim", "expand_v", "conv_size", "norm_eps", "hidden_act",
              "max_position_embeddings", "tie_word_embeddings", "hidden_ratio",
              "intermediate_size", "use_gate", "use_short_conv", "allow_neg_eigval", "attn"):
    del hf[key]
  config, _ = convert.model_config_from_hf(hf)
  assert (config.gdn.num_heads, config.gdn.head_dim, config.gdn.conv_size) == (6, 256, 4)
  assert config.max_position == 2048 and not config.tie_embeddings
  del hf["vocab_size"]
  with pytest.raises(ValueError, match="config.json has no field vocab_size"):
    convert.model_config_from_hf(hf)


# ---- experiments.convert: nothing half written ------------------------------------------

@pytest.fixture
def source(tmp_path):
  cfg = synthetic.gdn_config()
  return synthetic.save(tmp_path, cfg, synthetic.hf_tensors(cfg, np.random.default_rng(0)))


def cli_config(**changes):
  config = config_files.load(config_files.resolve("GDN"))
  config.data.seq_len, config.data.batch_size = 16, 2
  config.update(changes)
  return config


def test_failed_conversion_leaves_no_files(tmp_path, source):
  before = sorted(os.listdir(tmp_path))
  workdir = tmp_path / "new" / "wd"
  # steps=0 is refused by experiment.resolve, after the converted model file is written.
  with pytest.raises(ValueError, match="config.steps"):
    convert_cli.convert_to_workdir(source, str(workdir), cli_config(steps=0))
  assert sorted(os.listdir(tmp_path)) == before  # not even the parent folder
  existing = tmp_path / "existing"
  existing.mkdir()
  (existing / "notes.txt").write_text("mine")
  with pytest.raises(ValueError, match="config.steps"):
    convert_cli.convert_to_workdir(source, str(existing), cli_config(steps=0))
  assert os.listdir(existing) == ["notes.txt"]
  assert sorted(os.listdir(tmp_path)) == sorted(before + ["existing"])


def test_from_and_to_are_checked_before_anything_is_written(tmp_path, source):
  with pytest.raises(ValueError, match=r"--from must be a Hugging Face model directory"):
    convert_cli.convert_to_workdir(str(tmp_path / "nowhere"), str(tmp_path / "wd"))
  config_json = open(os.path.join(source, "config.json")).read()
  with pytest.raises(ValueError, match=r"--to=.* is the Hugging Face directory --from"):
    convert_cli.convert_to_workdir(source, source, cli_config())
  assert open(os.path.join(source, "config.json")).read() == config_json
  assert sorted(os.listdir(source)) == ["config.json", "model.safetensors"]
  (tmp_path / "file").write_text("")
  with pytest.raises(ValueError, match=r"--to=.*file exists and is not a directory"):
    convert_cli.convert_to_workdir(source, str(tmp_path / "file"), cli_config())
  with pytest.raises(ValueError, match=r"--to must name a directory to create"):
    convert_cli.convert_to_workdir(source, "", cli_config())
