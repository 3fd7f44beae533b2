"""The tokenizer files of an exported Hugging Face directory.

- a ``tokenizer.json`` tokenizer (HFTokenizer): the file is copied;
- a SentencePiece model: copied as ``tokenizer.model``;
- the byte tokenizer: a ``tokenizer.json`` written here that encodes as ByteTokenizer does
  (pad 0 ``<pad>``, bos 1 ``<s>``, eos 2 ``</s>``, byte b -> b + 3: a BPE with no merges over
  the byte-level alphabet), so ``get_tokenizer(directory)`` and Hugging Face's tokenizers
  load it. As in any Hugging Face tokenizer, the literal texts ``<pad>``, ``<s>`` and
  ``</s>`` encode as those special tokens, where ByteTokenizer spells them out in bytes.
A ``tokenizer.json`` comes with a ``tokenizer_config.json`` naming its special tokens, so
transformers' AutoTokenizer takes it as a PreTrainedTokenizerFast.
"""
from __future__ import annotations

import json
import os
import shutil

from lte_jax.data import tokenizers as tokenizers_lib

_BYTE_SPECIALS = ("<pad>", "<s>", "</s>")


def _byte_level_chars() -> list[str]:
  """GPT-2's byte -> printable character table (the tokenizers ByteLevel alphabet)."""
  keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
          *range(ord("®"), ord("ÿ") + 1)]
  chars, extra = {}, 0
  for b in range(256):
    if b in keep:
      chars[b] = chr(b)
    else:
      chars[b] = chr(256 + extra)
      extra += 1
  return [chars[b] for b in range(256)]


def byte_tokenizer_json() -> dict:
  """tokenizer.json content equal to ByteTokenizer on text without its special names."""
  offset = tokenizers_lib.ByteTokenizer.OFFSET
  vocab = {name: i for i, name in enumerate(_BYTE_SPECIALS)}
  vocab.update({c: b + offset for b, c in enumerate(_byte_level_chars())})
  byte_level = dict(type="ByteLevel", add_prefix_space=False, trim_offsets=False,
                    use_regex=False)
  return {
      "version": "1.0", "truncation": None, "padding": None,
      "added_tokens": [dict(id=i, content=name, single_word=False, lstrip=False, rstrip=False,
                            normalized=False, special=True)
                       for i, name in enumerate(_BYTE_SPECIALS)],
      "normalizer": None, "pre_tokenizer": byte_level, "post_processor": None,
      "decoder": byte_level,
      "model": dict(type="BPE", dropout=None, unk_token=None, continuing_subword_prefix=None,
                    end_of_word_suffix=None, fuse_unk=False, byte_fallback=False,
                    ignore_merges=False, vocab=vocab, merges=[]),
  }


def _token_name(data: dict, token_id: int) -> str | None:
  for token in data.get("added_tokens") or []:
    if token.get("id") == token_id:
      return token.get("content")
  vocab = (data.get("model") or {}).get("vocab")
  if isinstance(vocab, dict):
    return next((name for name, i in vocab.items() if i == token_id), None)
  return None


def resolve(tokenizer, vocab_size: int):
  """The Tokenizer of ``tokenizer`` (a spec or a Tokenizer), checked before anything is
  written: one whose files can be exported, with no id beyond the model's vocabulary."""
  tok = tokenizers_lib.get_tokenizer(tokenizer)
  if not isinstance(tok, (tokenizers_lib.ByteTokenizer, tokenizers_lib.HFTokenizer,
                          tokenizers_lib.SentencePieceTokenizer)):
    raise ValueError(f"tokenizer must be 'byte', a tokenizer.json or a SentencePiece .model "
                     f"(a file to copy), got {tok!r}")
  if tok.vocab_size > vocab_size:
    raise ValueError(f"tokenizer {tok!r} has {tok.vocab_size} ids but the model only "
                     f"{vocab_size}: it is not this model's tokenizer")
  return tok


def write(tok, directory: str) -> dict:
  """Write ``tok``'s files into ``directory``; returns its special ids for config.json."""
  ids = dict(bos_token_id=tok.bos_id, eos_token_id=tok.eos_id, pad_token_id=tok.pad_id)
  if isinstance(tok, tokenizers_lib.SentencePieceTokenizer):
    shutil.copyfile(tok.path, os.path.join(directory, "tokenizer.model"))
    return ids
  if isinstance(tok, tokenizers_lib.ByteTokenizer):
    data = byte_tokenizer_json()
    with open(os.path.join(directory, "tokenizer.json"), "w") as f:
      json.dump(data, f, ensure_ascii=False)
  else:
    shutil.copyfile(tok.path, os.path.join(directory, "tokenizer.json"))
    with open(tok.path) as f:
      data = json.load(f)
  names = {key: _token_name(data, ids[f"{key}_token_id"]) for key in ("bos", "eos", "pad")}
  with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
    json.dump({"tokenizer_class": "PreTrainedTokenizerFast",
               **{f"{key}_token": name for key, name in names.items() if name is not None}},
              f, indent=2, ensure_ascii=False)
  return ids
