"""Configs are validated data: bad fields name themselves and what is allowed."""
from __future__ import annotations

import pytest

from lte_jax import configs


def test_every_architecture_and_size_builds():
  for arch in configs.ARCHITECTURES:
    for size in configs.SIZES:
      cfg = configs.get_config(arch, size)
      assert cfg.num_layers == len(cfg.layers)


def test_paper_layer_patterns():
  assert configs.get_config("GDN", "0.4B").layers == ("gdn",) * 24
  assert configs.get_config("transformer", "0.4B").layers == ("attn",) * 24
  for arch, mixer in [("GDN_SWA", "swa"), ("GDN_Attn", "attn"), ("laLTE", "lte")]:
    layers = configs.get_config(arch, "1.4B").layers
    assert layers[0::2] == ("gdn",) * 12 and layers[1::2] == (mixer,) * 12


def test_paper_shapes():
  small, large = configs.get_config("laLTE", "0.4B"), configs.get_config("laLTE", "1.4B")
  assert (small.d_model, small.intermediate_size, small.tie_embeddings) == (1024, 2816, True)
  assert (large.d_model, large.intermediate_size, large.tie_embeddings) == (2048, 5632, False)
  assert (small.lte.num_heads, small.lte.num_kv_heads, small.lte.head_dim) == (16, 16, 64)
  assert (large.lte.num_heads, large.lte.num_kv_heads) == (32, 8)
  assert (small.lte.sink_size, small.lte.window_size, small.lte.budget) == (4, 768, 512)
  assert small.lte.kernel_sizes == (3, 3, 3) and small.lte.dilations == (2, 2, 2)
  assert small.lte.lookahead == 6
  assert (large.gdn.num_heads, large.gdn.head_dim) == (8, 256)
  assert small.swa.window_size == 1024


@pytest.mark.parametrize("call,match", [
    (lambda: configs.get_config("mamba"), "architecture must be one of"),
    (lambda: configs.get_config("GDN", "7B"), "size must be one of"),
    (lambda: configs.get_config("GDN", "tiny", hidden=3), "unknown ModelConfig field 'hidden'"),
    (lambda: configs.get_config("GDN", "tiny", dtype="float64"), "ModelConfig.dtype"),
    (lambda: configs.get_config("GDN", "tiny", layers=("gdn", "rnn")), "ModelConfig.layers"),
    (lambda: configs.AttentionConfig(num_heads=6, num_kv_heads=4), "num_kv_heads"),
    (lambda: configs.LTEConfig(budget=4, sink_size=4), "LTEConfig.budget"),
    (lambda: configs.LTEConfig(kernel_sizes=(3, 4, 3)), "LTEConfig.kernel_sizes"),
    (lambda: configs.LTEConfig(dilations=(2, 2)), "LTEConfig.dilations"),
    (lambda: configs.LTEConfig(window_size=10), "LTEConfig.window_size"),
    (lambda: configs.GDNConfig(head_dim=0), "GDNConfig.head_dim"),
    (lambda: configs.replace(configs.GDNConfig(), heads=2), "unknown GDNConfig field"),
])
def test_bad_config_raises_value_error(call, match):
  with pytest.raises(ValueError, match=match):
    call()


def test_gdn_use_gate_false_is_refused_not_ignored():
  with pytest.raises(ValueError, match="GDNConfig.use_gate"):
    configs.GDNConfig(use_gate=False)
