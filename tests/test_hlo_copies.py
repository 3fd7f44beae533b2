"""experiments/hlo_copies.py: a compiled program's copies, grouped by origin."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from experiments import hlo_copies

# A hand-written fragment in the compiled text's format: a loop carry copied out through a
# get-tuple-element (no metadata, named by its producer), a layout change, a small copy.
_HLO = """
%body (p: (s32[], bf16[8,1024])) -> (s32[], bf16[8,1024]) {
  %p = (s32[], bf16[8,1024]{1,0}) parameter(0)
  %ys.1 = bf16[8,1024]{1,0} fusion(%p), kind=kLoop, calls=%f, metadata={op_name="jit(step)/while/body/dynamic_update_slice" source_file="/src/model.py" source_line=42}
  %t = (s32[], bf16[8,1024]{1,0}) tuple(%i, %ys.1)
  %gte.3 = bf16[8,1024]{1,0} get-tuple-element(%t), index=1
  %copy.7 = bf16[8,1024]{1,0} copy(%gte.3)
  %tr = f32[64,32]{0,1} transpose(%x), dimensions={1,0}
  %copy.8 = f32[64,32]{1,0} copy(%tr), metadata={op_name="jit(step)/layer3/transpose" source_file="/src/layer.py" source_line=7}
  %copy.9 = f32[64,32]{1,0} copy(%tr), metadata={op_name="jit(step)/layer12/transpose" source_file="/src/layer.py" source_line=7}
  ROOT %copy.10 = s32[] copy(%i)
}
"""


def test_groups_copies_by_origin_with_sizes_and_kind():
  rows = hlo_copies.summarise(_HLO)
  by_where = {r["where"]: r for r in rows}
  carry = by_where["copy of gte fusion while/body/dynamic_update_slice  [model.py:42]"]
  assert carry == dict(where=carry["where"], memcpy=True, count=1, mib=8 * 1024 * 2 / 2**20)
  # Layer numbers are dropped, so the same copy in every layer is one group.
  layout = by_where["layer#/transpose  [layer.py:7]"]
  assert layout["memcpy"] is False and layout["count"] == 2
  assert layout["mib"] == 2 * 64 * 32 * 4 / 2**20
  assert rows[0] is carry                           # sorted by bytes
  assert len(hlo_copies.summarise(_HLO, min_bytes=10_000)) == 1
  assert len(hlo_copies.summarise(_HLO, top=2)) == 2


def test_reads_a_compiled_program():
  # Returning the argument twice makes XLA copy it into two output buffers.
  text = jax.jit(lambda x: (x, x)).lower(jnp.ones((512, 256))).compile().as_text()
  (row,) = hlo_copies.summarise(text)
  assert row["where"].startswith("copy of parameter") and row["memcpy"]
  assert row["count"] == 2 and row["mib"] == 1.0


def test_lists_the_activation_stacks_of_a_scan():
  """A scanned layer's saved residuals: [layers, B, T, D] arrays carried by the forward loop
  (written) and the backward loop (read); the scanned weights [layers, D, D] are not."""
  def loss(x, ws):
    def layer(h, w):
      h = jnp.tanh(h @ w)
      return h, None
    return jnp.sum(jax.lax.scan(layer, x, ws)[0])

  text = jax.jit(jax.grad(loss, argnums=1)).lower(jnp.ones((2, 24, 16)),
                                                  jnp.ones((5, 16, 16))).as_text()
  rows = hlo_copies.scan_stacks(text, 2, 24)
  assert {r["loop"] for r in rows} == {0, 1}
  assert all(r["shape"] == "5x2x24x16" and r["dtype"] == "f32" for r in rows)
  assert all(r["gib"] == r["count"] * 5 * 2 * 24 * 16 * 4 / 2**30 for r in rows)
  assert hlo_copies.scan_stacks(text, 3, 24) == []
