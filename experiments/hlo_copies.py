"""Where the copies in a compiled XLA program come from (`bench_train --hlo_copies=N`).

A GPU profile of the 0.4B training step shows ~1,100 device-to-device `memcpy` calls per
step (~30 ms, 10% of it) with no name a user can act on. `copy` instructions of the
optimised HLO that keep their layout run as such memcpys (layout-changing ones become
transpose kernels), and every instruction carries the JAX op that made it in its metadata;
copies that XLA inserts itself (loop carries, output aliasing) carry none and are named
here by the value they copy. This module groups a compiled program's copies by origin.
The 0.4B GDN step's compiled program holds only 21 large copies (BENCHMARKS.md, training
step), the zero-initialisation of the layer scan's stacked buffers; the profile's memcpys are the
scan's dynamic slices and updates of those buffers, which XLA runs as memcpys: every
residual a layer saves for the backward is written into a [layers, B, T, ...] stack by the
forward loop and read back out by the backward loop. `scan_stacks` lists those stacks from
the lowered program: their bytes, moved twice each way, account for the memcpy time.

    copies = hlo_copies.summarise(jax.jit(f).lower(*args).compile().as_text())
"""
from __future__ import annotations

import collections
import re

_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2,
                "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8}
# `%copy.3 = bf16[8,4096,1024]{2,1,0} copy(%fusion.2), metadata={op_name="..." ...}`
_DEF = re.compile(r"^\s*(?:ROOT\s+)?%([\w.\-]+)\s*=\s*(?:\([^=]*?\)|(\w+)\[([\d,]*)\]"
                  r"(\{[^}]*\})?)\s+([\w\-]+)\(")
_OPERAND = re.compile(r"\(\s*(?:\w+\[[\d,]*\](?:\{[^}]*\})?\s+)?%([\w.\-]+)")
_OP_NAME = re.compile(r'op_name="([^"]*)"')
_FRAME = re.compile(r"stack_frame_id=(\d+)")
_SOURCE = re.compile(r'source_file="([^"]*)"\s+source_line=(\d+)')


def _bytes(dtype: str, dims: str) -> int:
  n = 1
  for d in filter(None, dims.split(",")):
    n *= int(d)
  return n * _DTYPE_BYTES.get(dtype, 4)


def _frames(hlo_text: str) -> dict[str, str]:
  """stack_frame_id -> 'file:line' of the innermost frame, from the module's tables
  (newer XLA writes source locations there instead of in each instruction)."""
  files = dict(re.findall(r'^(\d+) "([^"]*)"', hlo_text, re.M))
  locs = {i: (f, line) for i, f, line in
          re.findall(r"^(\d+) \{file_name_id=(\d+) function_name_id=\d+ line=(\d+)", hlo_text,
                     re.M)}
  frames = {}
  for i, loc in re.findall(r"^(\d+) \{file_location_id=(\d+)", hlo_text, re.M):
    if loc in locs:
      f, line = locs[loc]
      frames[i] = f"{files.get(f, '?').rsplit('/', 1)[-1]}:{line}"
  return frames


def _where(line: str, frames: dict[str, str]) -> str:
  """The copy's JAX op (numbers and jit wrappers dropped, so layers group together) and
  its source line."""
  m = _OP_NAME.search(line)
  name = m.group(1) if m else "(no metadata)"
  name = re.sub(r"\bjit\([^)]*\)/", "", name)
  name = re.sub(r"\d+", "#", name)
  s, f = _SOURCE.search(line), _FRAME.search(line)
  if s:
    name += f"  [{s.group(1).rsplit('/', 1)[-1]}:{s.group(2)}]"
  elif f and f.group(1) in frames:
    name += f"  [{frames[f.group(1)]}]"
  return name


def _producer(name: str, defs: dict[str, tuple[str, str]]) -> tuple[str, str]:
  """Follows get-tuple-elements (through tuples) from `name` to the value's producer:
  -> (producer's name, 'gte ' per hop)."""
  hops = ""
  while name in defs and defs[name][0] == "get-tuple-element":
    hops += "gte "
    line = defs[name][1]
    inner = _OPERAND.search(line, _DEF.match(line).end() - 1)
    index = re.search(r"index=(\d+)", line)
    if inner is None:
      break
    name = inner.group(1)
    if index and name in defs and defs[name][0] == "tuple":
      args = re.findall(r"%([\w.\-]+)", defs[name][1].split("tuple(", 1)[1].split(")", 1)[0])
      if int(index.group(1)) < len(args):
        name = args[int(index.group(1))]
  return name, hops


def summarise(hlo_text: str, top: int = 25, min_bytes: int = 0) -> list[dict]:
  """Compiled HLO text -> the `top` copy groups of at least `min_bytes` each, by bytes:
  where (op name and source line), count, MiB in all, and whether the copy keeps its
  layout (a plain memcpy on the GPU)."""
  frames = _frames(hlo_text)
  layouts, defs, copies = {}, {}, []
  for line in hlo_text.splitlines():
    m = _DEF.match(line)
    if not m:
      continue
    layouts[m.group(1)] = m.group(4) or ""
    defs[m.group(1)] = (m.group(5), line)
    if m.group(5) in ("copy", "copy-start") and m.group(2):
      copies.append((line, m))
  groups: dict[tuple[str, bool], list[int]] = collections.defaultdict(lambda: [0, 0])
  for line, m in copies:
    nbytes = _bytes(m.group(2), m.group(3))
    if nbytes < min_bytes:
      continue
    operand = _OPERAND.search(line, m.end() - 1)
    same_layout = operand is None or layouts.get(operand.group(1), "") == (m.group(4) or "")
    where = _where(line, frames)
    if where.startswith("(no metadata)") and operand is not None:
      # Copies that XLA inserts (loop carries, aliasing) carry no metadata: name them by
      # what they copy, following get-tuple-elements to the value's producer.
      name, hops = _producer(operand.group(1), defs)
      op, src = defs.get(name, ("parameter", ""))
      where = f"copy of {hops}{op} " + _where(src, frames)
    g = groups[(where, same_layout)]
    g[0] += 1
    g[1] += nbytes
  rows = [dict(where=w, memcpy=same, count=c, mib=b / 2**20)
          for (w, same), (c, b) in groups.items()]
  rows.sort(key=lambda r: -r["mib"])
  return rows[:top]


_WHILE = re.compile(r"stablehlo\.while\(.*\)\s*:\s*(.*)$")
_TENSOR = re.compile(r"tensor<((?:\d+x)+)(\w+)>")


def scan_stacks(stablehlo_text: str, batch: int, seq: int) -> list[dict]:
  """Lowered (StableHLO) text -> the activation stacks each while loop carries: arrays
  [N, batch, seq, d, ...] (a layer scan's saved residuals), grouped per loop by shape and
  dtype: loop (its order in the text), shape, dtype, count, gib."""
  rows = []
  loops = [m.group(1) for m in map(_WHILE.search, stablehlo_text.splitlines()) if m]
  for n, types in enumerate(loops):
    groups: dict[tuple[str, str], int] = collections.Counter()
    for dims, dtype in _TENSOR.findall(types):
      shape = tuple(int(d) for d in dims.rstrip("x").split("x"))
      if len(shape) >= 4 and shape[1:3] == (batch, seq):
        groups[(shape, dtype)] += 1
    for (shape, dtype), count in groups.items():
      size = _bytes(_STABLEHLO_DTYPES.get(dtype, dtype), ",".join(map(str, shape)))
      rows.append(dict(loop=n, shape="x".join(map(str, shape)), dtype=dtype, count=count,
                       gib=count * size / 2**30))
  return rows


_STABLEHLO_DTYPES = {"i1": "pred", "i8": "s8", "i16": "s16", "i32": "s32", "i64": "s64",
                     "ui8": "u8", "ui32": "u32"}
