"""Read and write safetensors files with numpy alone (no torch, no safetensors package).

Format: an 8-byte little-endian header length N, N bytes of JSON
{name: {"dtype": "F32", "shape": [...], "data_offsets": [begin, end]}, "__metadata__": {...}},
then the raw little-endian tensor bytes; offsets count from the end of the header.
A sharded checkpoint adds ``model.safetensors.index.json`` whose "weight_map" names the
shard file of every tensor.
"""
from __future__ import annotations

import json
import math
import os
import stat
import struct
from typing import Mapping

import ml_dtypes
import numpy as np

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

DTYPES = {
    "F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn), "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "I64": np.dtype("<i8"), "I32": np.dtype("<i4"), "I16": np.dtype("<i2"), "I8": np.dtype("i1"),
    "U8": np.dtype("u1"), "BOOL": np.dtype("?"),
}
_NAMES = {dtype: name for name, dtype in DTYPES.items()}
# A header larger than this is a corrupt file, not a model (the format's own limit).
_MAX_HEADER = 100 * 1024 * 1024


class _DuplicateKey(Exception):
  pass


def _unique_keys(pairs: list) -> dict:
  # json.loads would keep the last of two entries of one name without a word.
  seen = {}
  for key, value in pairs:
    if key in seen:
      raise _DuplicateKey(repr(key))
    seen[key] = value
  return seen


def read_header(path: str) -> tuple[dict, int]:
  """(tensor entries of the JSON header, byte offset where the data starts)."""
  if not os.path.isfile(path):
    raise ValueError(f"{path} is not a file (a safetensors file is needed)")
  file_size = os.path.getsize(path)
  with open(path, "rb") as f:
    head = f.read(8)
    if len(head) != 8:
      raise ValueError(f"{path} is not a safetensors file: shorter than its 8-byte header length")
    (size,) = struct.unpack("<Q", head)
    if size > _MAX_HEADER:
      raise ValueError(f"{path} is not a safetensors file: header length {size} is implausible")
    if 8 + size > file_size:
      raise ValueError(f"{path} is not a safetensors file (or is truncated): header length "
                       f"{size} runs past the end of the file of {file_size} bytes")
    try:
      header = json.loads(f.read(size), object_pairs_hook=_unique_keys)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
      raise ValueError(f"{path} is not a safetensors file: its header is not JSON ({err})") from err
    except _DuplicateKey as err:
      raise ValueError(f"{path}: the safetensors header names {err} twice") from None
  if not isinstance(header, dict):
    raise ValueError(f"{path}: the safetensors header must be a JSON object")
  header.pop("__metadata__", None)
  return header, 8 + size


def _is_int(x) -> bool:
  return isinstance(x, int) and not isinstance(x, bool)


def _layout(path: str, name: str, entry) -> tuple[np.dtype, tuple[int, ...], int, int]:
  """(dtype, shape, begin, end) of one header entry; ValueError naming the tensor unless the
  entry is well formed and its byte range holds exactly dtype x shape."""
  where = f"{path}: tensor {name!r}"
  if not isinstance(entry, dict):
    raise ValueError(f"{where}: its header entry must be a JSON object with dtype, shape and "
                     f"data_offsets, got {entry!r}")
  kind = entry.get("dtype")
  dtype = DTYPES.get(kind) if isinstance(kind, str) else None
  if dtype is None:
    raise ValueError(f"{where} has dtype {kind!r}; supported: {sorted(DTYPES)}")
  shape = entry.get("shape")
  if not isinstance(shape, list) or not all(_is_int(s) and s >= 0 for s in shape):
    raise ValueError(f"{where}: shape must be a list of integers >= 0, got {shape!r}")
  offsets = entry.get("data_offsets")
  if not isinstance(offsets, list) or len(offsets) != 2 or not all(map(_is_int, offsets)):
    raise ValueError(f"{where}: data_offsets must be two integers [begin, end], got {offsets!r}")
  begin, end = offsets
  if begin < 0:
    raise ValueError(f"{where}: data_offsets {offsets} begin at a negative byte (offsets count "
                     "from the start of the data, after the header)")
  if end < begin:
    raise ValueError(f"{where} ends ({end}) before it begins ({begin}): data_offsets {offsets}")
  nbytes = math.prod(shape) * dtype.itemsize  # Python ints: no overflow on absurd shapes
  if end - begin != nbytes:
    raise ValueError(f"{where}: {kind} {shape} is {nbytes} bytes but its data_offsets {offsets} "
                     f"hold {end - begin}")
  return dtype, tuple(shape), begin, end


def read_safetensors(path: str) -> dict[str, np.ndarray]:
  """All tensors of one file, as read-only arrays backed by a memory map (no copy).

  As the reference reader: the tensors' byte ranges must tile the data exactly (no
  overlap, no gap, nothing after the last), and each must hold dtype x shape bytes.
  """
  header, start = read_header(path)
  data_size = os.path.getsize(path) - start
  layouts = {name: _layout(path, name, entry) for name, entry in header.items()}
  expected, previous = 0, None
  for name, (_, _, begin, end) in sorted(layouts.items(), key=lambda kv: kv[1][2:]):
    if end > data_size:
      raise ValueError(f"{path}: tensor {name!r} ends at byte {end} of the data, past its end "
                       f"(the file holds {data_size} bytes of data)")
    if begin < expected:
      raise ValueError(f"{path}: tensor {name!r} (bytes [{begin}, {end})) overlaps tensor "
                       f"{previous!r} (bytes up to {expected}) in the data")
    if begin > expected:
      raise ValueError(f"{path}: bytes [{expected}, {begin}) of the data belong to no tensor "
                       f"(tensor {name!r} starts at byte {begin})")
    expected, previous = end, name
  if expected != data_size:
    raise ValueError(f"{path}: bytes [{expected}, {data_size}) of the data belong to no tensor "
                     "(a truncated header or trailing garbage)")
  if not layouts:
    return {}
  data = np.memmap(path, dtype=np.uint8, mode="r")
  return {name: data[start + begin:start + end].view(dtype).reshape(shape)
          for name, (dtype, shape, begin, end) in layouts.items()}


def _allowed_roots(directory: str) -> list[str]:
  """Where a checkpoint file may live once symlinks are resolved: the model directory, and
  in huggingface_hub's cache (<repo>/snapshots/<revision>/) the repo's blobs/ folder its
  symlinks point into."""
  real = os.path.realpath(directory)
  roots = [real]
  if os.path.basename(os.path.dirname(real)) == "snapshots":
    roots.append(os.path.join(os.path.dirname(os.path.dirname(real)), "blobs"))
  return roots


def checkpoint_file(directory: str, name: str, where: str) -> str:
  """The path of ``name``, a file of the model ``directory``; ValueError (starting with
  ``where``) unless it is a regular file inside it, symlinks resolved, checked before
  anything is opened."""
  if not isinstance(name, str) or not name:
    raise ValueError(f"{where} must be a shard file name, got {name!r}")
  lexical = os.path.normpath(name)
  real = os.path.realpath(os.path.join(directory, name))
  roots = _allowed_roots(directory)
  inside = not os.path.isabs(name) and lexical != ".." and not lexical.startswith("../") and any(
      os.path.commonpath([root, real]) == root for root in roots)
  if not inside:
    raise ValueError(f"{where} {name!r} resolves to {real}, outside the model directory "
                     f"{roots[0]}; checkpoint files must be regular files inside it")
  if not os.path.lexists(os.path.join(directory, name)) or not os.path.exists(real):
    raise ValueError(f"{where} {name!r} does not exist in {directory}")
  if not stat.S_ISREG(os.stat(real).st_mode):
    raise ValueError(f"{where} {name!r} is not a regular file ({real})")
  return os.path.join(directory, name)


def _read_index(index_path: str) -> dict[str, str]:
  """{tensor name: shard file name} of an index file; ValueError naming the file and key."""
  try:
    with open(index_path) as f:
      index = json.load(f)
  except (UnicodeDecodeError, json.JSONDecodeError) as err:
    raise ValueError(f"{index_path} is not valid JSON: {err}") from err
  if not isinstance(index, dict):
    raise ValueError(f"{index_path} must hold a JSON object with a 'weight_map', got "
                     f"{type(index).__name__}")
  weight_map = index.get("weight_map")
  if not isinstance(weight_map, dict) or not weight_map:
    raise ValueError(f"{index_path}: 'weight_map' must be a non-empty object of tensor name -> "
                     f"shard file, got {weight_map!r:.200}")
  for name, shard in weight_map.items():
    if not isinstance(shard, str) or not shard:
      raise ValueError(f"{index_path}: weight_map[{name!r}] must be a shard file name, got "
                       f"{shard!r}")
  return weight_map


def read_checkpoint(directory: str) -> dict[str, np.ndarray]:
  """Every tensor of a Hugging Face directory: model.safetensors, or the shards of its index.

  Every shard the index names must be a regular file inside ``directory`` (symlinks
  resolved; in huggingface_hub's cache, inside the repo's blobs/); all are checked
  before any is read.
  """
  if not isinstance(directory, (str, os.PathLike)) or not os.path.isdir(directory):
    raise ValueError(f"{directory!r} is not a directory (a Hugging Face model directory is "
                     "needed)")
  directory = os.fspath(directory)
  index_path = os.path.join(directory, INDEX_FILE)
  single_path = os.path.join(directory, SINGLE_FILE)
  if os.path.lexists(index_path):
    checkpoint_file(directory, INDEX_FILE, "the index")
    weight_map = _read_index(index_path)
    shards = {shard: checkpoint_file(directory, shard, f"{index_path}: shard")
              for shard in sorted(set(weight_map.values()))}
    tensors = {}
    for shard, path in shards.items():
      listed = {n for n, s in weight_map.items() if s == shard}
      got = read_safetensors(path)
      if set(got) != listed:
        raise ValueError(f"shard {shard} does not hold the tensors {INDEX_FILE} lists for it: "
                         f"listed but absent {sorted(listed - set(got))[:10]}, present but not "
                         f"listed {sorted(set(got) - listed)[:10]}")
      tensors.update(got)
    return tensors
  if os.path.lexists(single_path):
    return read_safetensors(checkpoint_file(directory, SINGLE_FILE, "the checkpoint file"))
  others = sorted(f for f in os.listdir(directory) if f.endswith((".bin", ".pt", ".pth")))
  hint = (f" (found {others}: re-save them with save_pretrained(safe_serialization=True); "
          "torch checkpoints are not read)" if others else "")
  raise ValueError(f"{directory} holds neither {SINGLE_FILE} nor {INDEX_FILE}{hint}")


def write_safetensors(path: str, tensors: Mapping[str, np.ndarray],
                      metadata: Mapping[str, str] | None = None) -> None:
  """Write ``tensors`` (numpy arrays of the DTYPES above) as one safetensors file."""
  header, offset, blobs = {}, 0, []
  for name, array in tensors.items():
    array = np.ascontiguousarray(array)
    kind = _NAMES.get(array.dtype)
    if kind is None:
      raise ValueError(f"tensor {name!r} has dtype {array.dtype}; supported: {sorted(DTYPES)}")
    blob = array.astype(DTYPES[kind]).tobytes()
    header[name] = {"dtype": kind, "shape": list(array.shape),
                    "data_offsets": [offset, offset + len(blob)]}
    offset += len(blob)
    blobs.append(blob)
  if metadata:
    header["__metadata__"] = dict(metadata)
  text = json.dumps(header).encode()
  text += b" " * (-len(text) % 8)  # keeps the data 8-byte aligned, as the reference writer does
  with open(path, "wb") as f:
    f.write(struct.pack("<Q", len(text)))
    f.write(text)
    for blob in blobs:
      f.write(blob)
