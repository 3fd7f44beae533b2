"""lte_jax.generate / lte_jax.sampling: compiled decoding of every architecture."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lte_jax import configs
from lte_jax.data.tokenizers import ByteTokenizer
from lte_jax.generate import cut_at_stop, generate, pad_prompts, stop_token_ids
from lte_jax.models import HybridLM
from lte_jax.sampling import SamplingConfig, sample
from tests.quick_compile import quick_compile  # noqa: F401  (autouse fixture)


def tiny_model(arch):
  cfg = configs.get_config(
      arch, "tiny", vocab_size=61, d_model=32, num_layers=2, intermediate_size=64,
      init_std=0.05,  # larger than the preset so argmax gaps dwarf float rounding
      gdn=configs.GDNConfig(num_heads=2, head_dim=16, chunk_size=8),
      attn=configs.AttentionConfig(num_heads=4, num_kv_heads=2, head_dim=8),
      swa=configs.AttentionConfig(num_heads=4, num_kv_heads=2, head_dim=8, window_size=4),
      lte=configs.LTEConfig(num_heads=4, num_kv_heads=2, head_dim=8, sink_size=1,
                            window_size=12, budget=3, dropout=0.0),
      nsa=configs.NSAConfig(num_heads=4, num_kv_heads=2, head_dim=8, block_size=4,
                            block_count=3, window_size=4))
  model = HybridLM(cfg, rngs=nnx.Rngs(0))
  model.eval()
  model.set_attributes(enforce_budget=True, raise_if_not_found=False)
  return model


def check_greedy_against_full_forward(model, prompts, rows):
  """Each generated token is the argmax of the full forward at the position before it.

  One right-padded forward over prompt + generation checks every step at once: the
  model is causal, so padding after a position never changes its logits.
  """
  seqs = [list(p) + list(r) for p, r in zip(prompts, rows)]
  tokens, _ = pad_prompts(seqs)
  logits = nnx.jit(lambda m, x: m(x)[0])(model, jnp.asarray(tokens))
  for b, (p, r) in enumerate(zip(prompts, rows)):
    want = np.argmax(np.asarray(logits[b, len(p) - 1:len(p) - 1 + len(r)]), axis=-1)
    assert r == want.tolist()


PROMPTS = [np.random.default_rng(n).integers(1, 61, n).tolist() for n in (14, 21, 17)]


# NSA (every layer NSA) decodes with the mixer laNSA covers here, at minutes of CPU.
@pytest.mark.parametrize("arch", [a for a in configs.ARCHITECTURES if a != "NSA"])
def test_greedy_generation_equals_full_forward_argmax(arch):
  # Rows of different lengths, longer than the SWA/LTE windows, so windows, eviction
  # and per-row teacher forcing through decode all take part.
  model = tiny_model(arch)
  tokens, lengths = pad_prompts(PROMPTS, width=23)
  out = generate(model, tokens, lengths, max_new_tokens=6, cache_dtype=jnp.float32)
  assert out.tokens.shape == (3, 6) and out.num_tokens.tolist() == [6, 6, 6]
  check_greedy_against_full_forward(model, PROMPTS, out.rows())


def test_batch_rows_equal_each_prompt_alone_and_prefill_len_is_free():
  # The cheapest model to compile; the test above already runs rows of different
  # lengths through every mixer.
  model = tiny_model("transformer")
  tokens, lengths = pad_prompts(PROMPTS)
  together = generate(model, tokens, lengths, max_new_tokens=5, cache_dtype=jnp.float32)
  bucketed = generate(model, tokens, lengths, max_new_tokens=5, prefill_len=2,
                      cache_dtype=jnp.float32)
  np.testing.assert_array_equal(together.tokens, bucketed.tokens)
  for b in range(len(PROMPTS)):
    # One compile for all three: same width and prefill_len, only the length differs.
    alone = generate(model, tokens[b:b + 1], lengths[b:b + 1], max_new_tokens=5, prefill_len=2,
                     cache_dtype=jnp.float32)
    assert alone.rows()[0] == together.rows()[b]


def test_rows_stop_on_eos_and_stop_ids_and_keep_the_stop_token():
  model = tiny_model("transformer")
  tokens, lengths = pad_prompts(PROMPTS)
  free = generate(model, tokens, lengths, max_new_tokens=6)
  eos = free.tokens[0, 2]           # row 0 ends at its third token
  stop = free.tokens[1, 0]          # row 1 at its first
  out = generate(model, tokens, lengths, max_new_tokens=6, eos_ids=[eos], stop_ids=[stop])
  rows = out.rows()
  for b, row in enumerate(rows):
    first = next((i for i, x in enumerate(free.rows()[b]) if x in (eos, stop)), 5)
    assert row == free.rows()[b][:first + 1]
  assert len(rows[0]) <= 3 and len(rows[1]) == 1
  assert (out.tokens[1, 1:] == 0).all()


def test_stop_strings_map_to_token_ids_and_cut_text():
  tok = ByteTokenizer()
  assert stop_token_ids(tok, ["\n"]) == (ord("\n") + 3,)
  assert stop_token_ids(tok, []) == ()
  assert cut_at_stop("answer: 42\nmore", ["\n"]) == "answer: 42"
  assert cut_at_stop("no stop", ["\n", "##"]) == "no stop"
  with pytest.raises(ValueError, match="stop_strings"):
    stop_token_ids(tok, [""])


def test_sampling_is_seeded_and_top_k_1_is_greedy():
  model = tiny_model("transformer")
  tokens, lengths = pad_prompts(PROMPTS)
  greedy = generate(model, tokens, lengths, max_new_tokens=6)   # compiled by the test above
  top1 = generate(model, tokens, lengths, max_new_tokens=6, rng=jax.random.key(3),
                  sampling=SamplingConfig(temperature=1.0, top_k=1))
  np.testing.assert_array_equal(greedy.tokens, top1.tokens)
  hot = SamplingConfig(temperature=5.0)
  a = generate(model, tokens, lengths, max_new_tokens=8, sampling=hot, rng=jax.random.key(1))
  b = generate(model, tokens, lengths, max_new_tokens=8, sampling=hot, rng=jax.random.key(1))
  c = generate(model, tokens, lengths, max_new_tokens=8, sampling=hot, rng=jax.random.key(2))
  np.testing.assert_array_equal(a.tokens, b.tokens)
  assert (a.tokens != c.tokens).any()


def test_top_k_and_top_p_keep_only_the_allowed_tokens():
  logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]] * 2000))
  keys = jax.random.split(jax.random.key(0), 1)[0]
  drawn = np.asarray(sample(keys, logits, SamplingConfig(temperature=1.0, top_k=2)))
  assert set(drawn.tolist()) == {0, 1}
  drawn = np.asarray(sample(keys, logits, SamplingConfig(temperature=1.0, top_p=0.9)))
  assert set(drawn.tolist()) == {0, 1, 2}   # 0.5 + 0.3 < 0.9: the third token is needed
  drawn = np.asarray(sample(keys, logits, SamplingConfig(temperature=1.0, top_p=0.4)))
  assert set(drawn.tolist()) == {0}
  assert abs(np.mean(np.asarray(sample(keys, logits, SamplingConfig(1.0))) == 0) - 0.5) < 0.05


def test_bad_arguments_raise_value_errors():
  model = tiny_model("GDN")
  with pytest.raises(ValueError, match="lengths must be"):
    generate(model, np.zeros((2, 4), np.int32), [0, 4], max_new_tokens=2)
  with pytest.raises(ValueError, match="max_new_tokens"):
    generate(model, np.zeros((2, 4), np.int32), max_new_tokens=0)
  with pytest.raises(ValueError, match="prefill_len must be <= the shortest prompt"):
    generate(model, np.zeros((2, 4), np.int32), [2, 4], max_new_tokens=2, prefill_len=3)
  with pytest.raises(ValueError, match="rng must be"):
    generate(model, np.zeros((1, 4), np.int32), max_new_tokens=2,
             sampling=SamplingConfig(temperature=1.0))
  with pytest.raises(ValueError, match="top_p"):
    SamplingConfig(temperature=1.0, top_p=0.0)
  with pytest.raises(ValueError, match="width must be"):
    pad_prompts([[1, 2, 3]], width=2)
