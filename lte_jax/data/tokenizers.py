"""Tokenizers behind one small protocol: byte-level, Hugging Face, SentencePiece.

``get_tokenizer(spec)`` is the entry point: ``'byte'`` needs nothing; a path to a
local ``tokenizer.json`` (or a folder holding one) loads it with the ``tokenizers``
package; a path to a SentencePiece ``.model`` (or a folder holding
``tokenizer.model``) loads it with ``sentencepiece``. Nothing is ever downloaded.
The optional packages are imported only when such a path is given.

``encode_document`` turns a document into int32 ids with bounded memory: the
byte tokenizer maps bytes to ids in numpy, the others encode a long text in
pieces of at most ``PIECE_CHARS`` characters, cut before a whitespace character
that starts a word, so no tokenizer sees one huge string.
"""
from __future__ import annotations

import importlib
import os
import re
from typing import Any, Iterator, Protocol, Sequence, runtime_checkable

import numpy as np

TOKENIZER_SPECS = ("'byte'", "a path to tokenizer.json", "a path to a SentencePiece .model",
                   "a folder holding tokenizer.json or tokenizer.model")


@runtime_checkable
class Tokenizer(Protocol):
  """What the data pipeline needs from a tokenizer. Special ids are plain ints."""

  vocab_size: int
  bos_id: int
  eos_id: int
  pad_id: int

  def encode(self, text: str) -> list[int]:
    """Token ids of ``text`` without any special token."""

  def decode(self, ids: Sequence[int]) -> str:
    """Text of ``ids``; special tokens are dropped."""


def _import_optional(module: str, pip_name: str, what: str) -> Any:
  try:
    return importlib.import_module(module)
  except ImportError as e:
    raise ImportError(
        f"{what} needs the `{pip_name}` package: pip install {pip_name} "
        f"(or pip install 'lte_jax[data]')") from e


class ByteTokenizer:
  """UTF-8 bytes as tokens: pad=0, bos=1, eos=2, byte b -> b + 3 (vocab 259).

  Needs no file, encodes any text losslessly and fits every preset's vocab.
  """

  OFFSET = 3

  def __init__(self):
    self.pad_id, self.bos_id, self.eos_id = 0, 1, 2
    self.vocab_size = 256 + self.OFFSET

  def encode(self, text: str) -> list[int]:
    return [b + self.OFFSET for b in text.encode("utf-8")]

  def encode_into(self, text: str, bos: int | None = None, eos: int | None = None) -> np.ndarray:
    """int32 [n (+ 2)]: ``bos``, the ids of ``text``, ``eos`` (either None: left out),
    built in numpy from the UTF-8 bytes: about 4 bytes of memory a byte of text."""
    data = np.frombuffer(text.encode("utf-8"), np.uint8)
    head, tail = int(bos is not None), int(eos is not None)
    ids = np.empty(head + len(data) + tail, np.int32)
    np.add(data, self.OFFSET, out=ids[head:head + len(data)], casting="unsafe")
    if head:
      ids[0] = bos
    if tail:
      ids[-1] = eos
    return ids

  def decode(self, ids: Sequence[int]) -> str:
    data = bytes(int(i) - self.OFFSET for i in ids if self.OFFSET <= int(i) < self.vocab_size)
    return data.decode("utf-8", errors="replace")

  def __repr__(self) -> str:
    return "ByteTokenizer()"


# Names under which common tokenizer.json files store their special tokens.
_BOS_NAMES = ("<s>", "<bos>", "<|begin_of_text|>", "<|startoftext|>", "[BOS]", "[CLS]")
_EOS_NAMES = ("</s>", "<eos>", "<|end_of_text|>", "<|endoftext|>", "<|im_end|>", "[EOS]", "[SEP]")
_PAD_NAMES = ("<pad>", "[PAD]", "<|pad|>", "<|padding|>")


def _resolve_special(name: str, given: int | None, found: int | None, fallback: int | None,
                     path: str) -> int:
  if given is not None:
    return int(given)
  if found is not None:
    return int(found)
  if fallback is not None:
    return int(fallback)
  raise ValueError(f"tokenizer {path!r} has no recognisable {name} token; pass {name}_id=")


class HFTokenizer:
  """A local Hugging Face ``tokenizer.json`` through the ``tokenizers`` package.

  Special ids are looked up by common names (``<s>``, ``</s>``,
  ``<|endoftext|>``, ...) unless given. A tokenizer with only an end token (GPT-2
  style) uses it as bos and pad too; padding is masked by segment id 0, so the pad
  id only has to be a valid token.
  """

  def __init__(self, path: str, *, bos_id: int | None = None, eos_id: int | None = None,
               pad_id: int | None = None):
    tokenizers = _import_optional("tokenizers", "tokenizers", "a tokenizer.json tokenizer")
    self.path = path
    self._tok = tokenizers.Tokenizer.from_file(path)
    lookup = lambda names: next(
        (i for i in (self._tok.token_to_id(n) for n in names) if i is not None), None)
    bos, eos, pad = lookup(_BOS_NAMES), lookup(_EOS_NAMES), lookup(_PAD_NAMES)
    self.eos_id = _resolve_special("eos", eos_id, eos, bos, path)
    self.bos_id = _resolve_special("bos", bos_id, bos, self.eos_id, path)
    self.pad_id = _resolve_special("pad", pad_id, pad, self.eos_id, path)
    self.vocab_size = int(self._tok.get_vocab_size(with_added_tokens=True))

  def encode(self, text: str) -> list[int]:
    return list(self._tok.encode(text, add_special_tokens=False).ids)

  def decode(self, ids: Sequence[int]) -> str:
    return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)

  def __getstate__(self):
    # The Rust tokenizer pickles through its JSON; keep worker processes simple.
    return {"path": self.path, "ids": (self.bos_id, self.eos_id, self.pad_id)}

  def __setstate__(self, state):
    bos, eos, pad = state["ids"]
    self.__init__(state["path"], bos_id=bos, eos_id=eos, pad_id=pad)

  def __repr__(self) -> str:
    return f"HFTokenizer({self.path!r})"


class SentencePieceTokenizer:
  """A local SentencePiece ``.model`` through the ``sentencepiece`` package.

  A model trained without a pad piece (pad id -1) pads with eos.
  """

  def __init__(self, path: str):
    spm = _import_optional("sentencepiece", "sentencepiece", "a SentencePiece tokenizer")
    self.path = path
    self._sp = spm.SentencePieceProcessor(model_file=path)
    self.vocab_size = int(self._sp.get_piece_size())
    bos, eos, pad, unk = (int(self._sp.bos_id()), int(self._sp.eos_id()),
                          int(self._sp.pad_id()), int(self._sp.unk_id()))
    if eos < 0 and bos < 0:
      raise ValueError(f"SentencePiece model {path!r} defines neither bos nor eos")
    self.eos_id = eos if eos >= 0 else bos
    self.bos_id = bos if bos >= 0 else self.eos_id
    self.pad_id = pad if pad >= 0 else (self.eos_id if self.eos_id >= 0 else unk)

  def encode(self, text: str) -> list[int]:
    return list(self._sp.encode(text, out_type=int))

  def decode(self, ids: Sequence[int]) -> str:
    return self._sp.decode([int(i) for i in ids])

  def __getstate__(self):
    return {"path": self.path}

  def __setstate__(self, state):
    self.__init__(state["path"])

  def __repr__(self) -> str:
    return f"SentencePieceTokenizer({self.path!r})"


PIECE_CHARS = 1 << 16  # ~16K subword tokens: a piece's Python lists stay a few MB
# The last whitespace character before a non-space one: a cut before it leaves words and
# runs of whitespace as a byte-level or SentencePiece pre-tokenizer splits them.
_LAST_CUT = re.compile(r".*\s(?=\S)", re.DOTALL)


def text_pieces(text: str, piece_chars: int = PIECE_CHARS) -> Iterator[str]:
  """``text`` in consecutive pieces of at most ``piece_chars`` characters.

  Each cut falls before the last whitespace character that precedes a
  non-space one in the second half of the piece; a piece with none there (one
  huge word) is cut at ``piece_chars``.
  """
  if not isinstance(piece_chars, int) or piece_chars < 2:
    raise ValueError(f"piece_chars must be an integer >= 2, got {piece_chars!r}")
  start, n = 0, len(text)
  while n - start > piece_chars:
    m = _LAST_CUT.match(text, start + piece_chars // 2, start + piece_chars)
    cut = m.end() - 1 if m else start + piece_chars
    yield text[start:cut]
    start = cut
  yield text[start:]


def encode_document(tokenizer: Tokenizer, text: str, *,
                    piece_chars: int = PIECE_CHARS) -> np.ndarray:
  """int32 [n + 2]: BOS, the ids of ``text``, EOS, with memory bounded for long text.

  The byte tokenizer's ids are exact. Other tokenizers encode texts longer than
  ``piece_chars`` piece by piece (``text_pieces``): identical ids for byte-level
  BPE and SentencePiece models that split at whitespace, which never merge
  across it; a tokenizer whose tokens span whitespace, or a word longer than
  ``piece_chars``, may tokenize differently at the cuts (one cut per piece).
  """
  if isinstance(tokenizer, ByteTokenizer):
    return tokenizer.encode_into(text, tokenizer.bos_id, tokenizer.eos_id)
  parts = [np.asarray([tokenizer.bos_id], np.int32)]
  for piece in text_pieces(text, piece_chars):
    parts.append(np.asarray(tokenizer.encode(piece), np.int32))
  parts.append(np.asarray([tokenizer.eos_id], np.int32))
  return np.concatenate(parts)


def get_tokenizer(spec: str | Tokenizer) -> Tokenizer:
  """'byte', a tokenizer.json / SentencePiece .model path, a folder, or a Tokenizer."""
  if not isinstance(spec, str):
    if isinstance(spec, Tokenizer):
      return spec
    raise ValueError(f"tokenizer must be one of {', '.join(TOKENIZER_SPECS)}, got {spec!r}")
  if spec == "byte":
    return ByteTokenizer()
  path = os.path.expanduser(spec)
  if os.path.isdir(path):
    for name, cls in (("tokenizer.json", HFTokenizer), ("tokenizer.model", SentencePieceTokenizer)):
      if os.path.isfile(os.path.join(path, name)):
        return cls(os.path.join(path, name))
  elif os.path.isfile(path) and path.endswith(".json"):
    return HFTokenizer(path)
  elif os.path.isfile(path) and path.endswith(".model"):
    return SentencePieceTokenizer(path)
  raise ValueError(f"tokenizer must be one of {', '.join(TOKENIZER_SPECS)}, got {spec!r}")
