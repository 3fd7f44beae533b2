"""Per-array checksums of a saved state: a checkpoint that parses is not always intact.

Orbax notices files that no longer parse, not numbers that changed: a flipped
byte inside a stored array, or a block of garbage, restores silently as wrong
values or NaN. Every save therefore records, per array of the state, two sums
of its bits taken as uint32 words (modulo 2^32): the plain sum, which any
change confined to one word (any single flipped byte) alters, and a sum
weighted by an odd hash of each word's position, so that other damage must fit
both 32-bit sums to pass. Accelerator states are summed on device under one
jit (sharded and multi-host states need no gather; unsigned sums do not depend
on the reduction order, so any mesh gets the same numbers), host arrays by numpy
with the same arithmetic, so a checkpoint saved on GPUs verifies on a CPU.

The sums of step ``n`` live in ``<checkpoints>/checksums/<n>.json`` (JSON:
``{"format": 1, "step": n, "arrays": {"params/embed/embedding": [sum, weighted],
...}}``). A checkpoint without that file (saved before checksums existed, or
whose file could not be written) is accepted only if every floating array is
finite.
"""
from __future__ import annotations

import json
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from jax import lax

CHECKSUM_DIR = "checksums"
FORMAT = 1
_POSITION_HASH = 0x9E3779B1  # odd: position -> weight stays a bijection modulo 2^32


def _unsigned(itemsize: int, xp) -> Any:
  return {1: xp.uint8, 2: xp.uint16, 4: xp.uint32}[itemsize]


def _device_words(x: jax.Array) -> jax.Array:
  """x's bits as uint32 words: same shape, or [..., 2] for 64-bit dtypes."""
  if x.dtype == jnp.bool_:
    x = x.astype(jnp.uint8)
  if x.dtype.itemsize > 4:
    return lax.bitcast_convert_type(x, jnp.uint32)
  return lax.bitcast_convert_type(x, _unsigned(x.dtype.itemsize, jnp)).astype(jnp.uint32)


def _device_positions(shape: tuple[int, ...]) -> jax.Array:
  """Row-major index of every element as uint32 (wrapping), built without a reshape,
  which would move a sharded array's data."""
  index = jnp.zeros(shape, jnp.uint32)
  stride = 1
  for dim in reversed(range(len(shape))):
    index = index + lax.broadcasted_iota(jnp.uint32, shape, dim) * np.uint32(stride % 2**32)
    stride *= shape[dim]
  return index


@jax.jit
def _device_sums(leaves: list[jax.Array]) -> jax.Array:
  """[n, 3] uint32: per leaf the plain sum, the weighted sum and its non-finite count."""
  rows = []
  for x in leaves:
    words = _device_words(x)
    weight = _device_positions(words.shape) * np.uint32(_POSITION_HASH) | np.uint32(1)
    bad = (jnp.sum(~jnp.isfinite(x), dtype=jnp.uint32)
           if jnp.issubdtype(x.dtype, jnp.inexact) else jnp.uint32(0))
    rows.append(jnp.stack([jnp.sum(words, dtype=jnp.uint32),
                           jnp.sum(words * weight, dtype=jnp.uint32), bad]))
  return jnp.stack(rows) if rows else jnp.zeros((0, 3), jnp.uint32)


def _host_sums(x: np.ndarray) -> tuple[int, int, int]:
  """_device_sums of one array, in numpy: the same numbers, no compilation."""
  x = np.ascontiguousarray(x)
  flat = x.reshape(-1).view(np.uint8) if x.dtype == np.bool_ else x.reshape(-1)
  if flat.dtype.itemsize > 4:
    words = flat.view(np.uint32)
  else:
    words = flat.view(_unsigned(flat.dtype.itemsize, np)).astype(np.uint32)
  weight = np.arange(words.size, dtype=np.uint32) * np.uint32(_POSITION_HASH) | np.uint32(1)
  bad = int((~np.isfinite(x)).sum()) if jnp.issubdtype(x.dtype, jnp.inexact) else 0
  return int(words.sum(dtype=np.uint32)), int((words * weight).sum(dtype=np.uint32)), bad


def _on_host(x: Any) -> bool:
  return not isinstance(x, jax.Array) or (
      x.is_fully_addressable and all(d.platform == "cpu" for d in x.devices()))


def array_sums(state: Any) -> dict[str, tuple[int, int, int]]:
  """{array name ('params/blocks/0/mlp/up_proj/kernel'): (sum, weighted sum, non-finite)}.

  Arrays in host memory are summed by numpy (no compilation: CPU runs and tests),
  others under one jit on their devices; both give the same numbers. Blocks until the
  state is computed.
  """
  flat, _ = jax.tree_util.tree_flatten_with_path(state)
  names = [jax.tree_util.keystr(path, simple=True, separator="/") for path, _ in flat]
  leaves = [jax.random.key_data(x) if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)
            else x for _, x in flat]
  if all(_on_host(x) for x in leaves):
    rows = [_host_sums(np.asarray(x)) for x in leaves]
  else:
    rows = [tuple(int(v) for v in row) for row in np.asarray(_device_sums(leaves))]
  return dict(zip(names, rows))


def path_for(directory: str | epath.Path, step: int) -> epath.Path:
  return epath.Path(directory) / CHECKSUM_DIR / f"{step}.json"


def write(directory: str | epath.Path, step: int, sums: dict[str, tuple[int, int, int]]) -> None:
  """Write step's checksum file (through a temporary name, so a reader never sees half)."""
  path = path_for(directory, step)
  path.parent.mkdir(parents=True, exist_ok=True)
  text = json.dumps({"format": FORMAT, "step": step,
                     "arrays": {name: list(row[:2]) for name, row in sums.items()}})
  tmp = path.parent / f"{path.name}.tmp"
  tmp.write_text(text)
  tmp.rename(path)


def read(directory: str | epath.Path, step: int) -> dict[str, list[int]] | None:
  """The recorded sums of ``step`` ({name: [sum, weighted]}), or None when its file is
  missing or unreadable (the checkpoint is then unverified)."""
  path = path_for(directory, step)
  try:
    record = json.loads(path.read_text())
    arrays = record["arrays"]
    if record.get("format") != FORMAT or record.get("step") != step or not isinstance(arrays, dict):
      return None
    return arrays
  except (OSError, ValueError, KeyError, TypeError):
    return None


def damage(recorded: dict[str, list[int]] | None, state: Any) -> str | None:
  """None when ``state`` matches ``recorded`` (or, with nothing recorded, is all finite);
  otherwise which arrays differ, for a log line."""
  sums = array_sums(state)
  if recorded is None:
    bad = [f"{name} ({row[2]} non-finite values)" for name, row in sums.items() if row[2]]
    return _listing("holds no checksum file and has non-finite arrays", bad)
  bad = [name for name, row in sums.items() if list(row[:2]) != recorded.get(name)]
  return _listing("arrays differ from the checksums saved with them", bad)


def _listing(what: str, names: list[str], shown: int = 3) -> str | None:
  if not names:
    return None
  more = f" and {len(names) - shown} more" if len(names) > shown else ""
  return f"{what}: {', '.join(names[:shown])}{more}"
