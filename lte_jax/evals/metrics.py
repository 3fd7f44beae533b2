"""The public metrics of the retrieval tasks (EVALS.md).

- RULER S-NIAH: 100 x mean of a case-insensitive substring match of the value
  in the prediction (``substring_match`` per sample).
- EVAPORATE-style ("contains"): case-insensitive search of the gold string in
  the continuation, max over aliases (``contains_any`` per document).
- MQAR: accuracy over the labelled positions (``mqar_accuracy``).
"""
from __future__ import annotations

from typing import Iterable

import numpy as np


def substring_match(prediction: str, answer: str) -> float:
  """1.0 when ``answer`` occurs in ``prediction`` ignoring case, else 0.0."""
  return float(answer.lower() in prediction.lower())


def contains_any(prediction: str, answers: str | Iterable[str]) -> float:
  """Max over the gold aliases of ``substring_match``; an empty alias never matches."""
  answers = [answers] if isinstance(answers, str) else list(answers)
  return max((substring_match(prediction, a) for a in answers if a), default=0.0)


def mqar_accuracy(predictions: np.ndarray, labels: np.ndarray, label_mask: np.ndarray) -> float:
  """predictions, labels [B, L] ids; label_mask [B, L] bool. Mean of hits where labelled."""
  predictions, labels = np.asarray(predictions), np.asarray(labels)
  label_mask = np.asarray(label_mask, bool)
  if predictions.shape != labels.shape or labels.shape != label_mask.shape:
    raise ValueError(f"predictions, labels and label_mask must share one shape, got "
                     f"{predictions.shape}, {labels.shape}, {label_mask.shape}")
  if not label_mask.any():
    raise ValueError("label_mask must mark at least one labelled position")
  return float(np.mean(predictions[label_mask] == labels[label_mask]))
