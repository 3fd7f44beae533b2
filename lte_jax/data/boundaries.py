"""Document boundaries in training data: the token that ends a document, and whether a
packed row is one sequence or several documents.

Two DataConfig fields choose between lte_jax's packing and the reference trainer's
(flame: BOS-only documents concatenated into rows, no document masking):

``append_eos``: a text document is the pairs (inputs ``[BOS] + ids``, targets
``ids + [end]``). True: ``end`` is EOS, the model learns to end a document with
EOS. False: ``end`` is BOS, the next document's first token, so the packed
stream reads ``BOS a1 .. an BOS b1 ..`` with targets shifted by one: the
tokenizer adds BOS only and no EOS appears anywhere. Either way EOS / BOS is
never an input at a document's end, and no pair is lost at a boundary.

``document_masking``: True keeps the packer's segments (``segment_ids`` 1, 2, ...
per document in a row, positions restarting at 0): GDN state, short convs,
attention, the LTE scorer and NSA blocks never cross a document. False gives
every row one segment over its real tokens (padding keeps id 0) and positions
0..T-1, so every mixer reads across document boundaries, RoPE counts from the
row's start and the LTE sinks are the row's first tokens. ``loss_mask`` and the
targets are the same under both; unlike the reference, the row's last token
keeps its target (the next token of the stream), one more counted pair a row.
"""
from __future__ import annotations

from typing import Mapping

import numpy as np

DOCUMENTS_HELP = (
    "Document boundaries: data.document_masking=True (DataConfig's default and the 'default' "
    "recipe's) packs documents with their own segment ids and RoPE positions, so no mixer (GDN "
    "state and convs, attention, the LTE scorer and sinks, NSA blocks) reads across a "
    "document; False makes each row one sequence (positions 0..T-1). data.append_eos=True "
    "ends each document with an EOS target; False is BOS only: a document's last target is "
    "the next document's BOS. --config.recipe=paper sets both False, the reference trainer's "
    "BOS-only documents concatenated into rows without masking.")


def end_token(bos_id: int, eos_id: int, append_eos: bool) -> int:
  """The target after a document's last token: EOS, or with ``append_eos=False`` the next
  document's BOS."""
  return int(eos_id if append_eos else bos_id)


def apply_document_masking(batch: Mapping[str, np.ndarray], document_masking: bool,
                           ) -> dict[str, np.ndarray]:
  """The packed batch as the mixers should see it.

  batch: ``inputs``, ``targets``, ``segment_ids``, ``positions`` ([B, T] int32) and
  ``loss_mask`` ([B, T] float32), as the packer makes them. ``document_masking``
  True returns them unchanged; False returns ``segment_ids`` 1 on every real token
  (id != 0) and 0 on padding, ``positions`` 0..T-1 on every row, the rest as given.
  """
  if not isinstance(document_masking, (bool, np.bool_)):
    raise ValueError(f"document_masking must be a bool, got {document_masking!r}")
  out = dict(batch)
  if document_masking:
    return out
  seg = np.asarray(batch["segment_ids"])
  if seg.ndim != 2:
    raise ValueError(f"batch['segment_ids'] must be [batch, time], got shape {seg.shape}")
  out["segment_ids"] = (seg != 0).astype(np.int32)
  out["positions"] = np.broadcast_to(np.arange(seg.shape[1], dtype=np.int32), seg.shape).copy()
  return out
