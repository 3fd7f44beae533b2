"""Read and write safetensors files with numpy alone (no torch, no safetensors package).

Format: an 8-byte little-endian header length N, N bytes of JSON
{name: {"dtype": "F32", "shape": [...], "data_offsets": [begin, end]}, "__metadata__": {...}},
then the raw little-endian tensor bytes; offsets count from the end of the header.
A sharded checkpoint adds ``model.safetensors.index.json`` whose "weight_map" names the
shard file of every tensor.
"""
from __future__ import annotations

import json
import os
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


def read_header(path: str) -> tuple[dict, int]:
  """(tensor entries of the JSON header, byte offset where the data starts)."""
  with open(path, "rb") as f:
    head = f.read(8)
    if len(head) != 8:
      raise ValueError(f"{path} is not a safetensors file: shorter than its 8-byte header length")
    (size,) = struct.unpack("<Q", head)
    if size > _MAX_HEADER:
      raise ValueError(f"{path} is not a safetensors file: header length {size} is implausible")
    try:
      header = json.loads(f.read(size))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
      raise ValueError(f"{path} is not a safetensors file: its header is not JSON ({err})") from err
  if not isinstance(header, dict):
    raise ValueError(f"{path}: the safetensors header must be a JSON object")
  header.pop("__metadata__", None)
  return header, 8 + size


def read_safetensors(path: str) -> dict[str, np.ndarray]:
  """All tensors of one file, as read-only arrays backed by a memory map (no copy)."""
  header, start = read_header(path)
  data = np.memmap(path, dtype=np.uint8, mode="r")
  out = {}
  for name, entry in header.items():
    dtype = DTYPES.get(entry.get("dtype"))
    if dtype is None:
      raise ValueError(f"{path}: tensor {name!r} has dtype {entry.get('dtype')!r}; supported: "
                       f"{sorted(DTYPES)}")
    shape = tuple(int(s) for s in entry["shape"])
    begin, end = (start + int(o) for o in entry["data_offsets"])
    if end - begin != int(np.prod(shape, dtype=np.int64)) * dtype.itemsize or end > data.size:
      raise ValueError(f"{path}: tensor {name!r} of shape {shape} and dtype {entry['dtype']} does "
                       f"not match its data_offsets {entry['data_offsets']}")
    out[name] = data[begin:end].view(dtype).reshape(shape)
  return out


def read_checkpoint(directory: str) -> dict[str, np.ndarray]:
  """Every tensor of a Hugging Face directory: model.safetensors, or the shards of its index."""
  index_path = os.path.join(directory, INDEX_FILE)
  single_path = os.path.join(directory, SINGLE_FILE)
  if os.path.exists(index_path):
    with open(index_path) as f:
      weight_map = json.load(f).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
      raise ValueError(f"{index_path} has no 'weight_map' of tensor name -> shard file")
    tensors = {}
    for shard in sorted(set(weight_map.values())):
      listed = {n for n, s in weight_map.items() if s == shard}
      got = read_safetensors(os.path.join(directory, shard))
      if set(got) != listed:
        raise ValueError(f"shard {shard} does not hold the tensors {INDEX_FILE} lists for it: "
                         f"listed but absent {sorted(listed - set(got))[:10]}, present but not "
                         f"listed {sorted(set(got) - listed)[:10]}")
      tensors.update(got)
    return tensors
  if os.path.exists(single_path):
    return read_safetensors(single_path)
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
