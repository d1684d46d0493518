"""GLUE metrics (thesis §7.1.1), on the host with NumPy over a whole split.

Matthews correlation for CoLA, Pearson correlation for STS-B, F1 of the positive
class for MRPC and QQP, accuracy otherwise, as the GLUE benchmark and Hugging
Face ``evaluate`` define them. Values are fractions (multiply by 100 for the
thesis's tables). A prediction with any non-finite logit counts as wrong in
every metric (as in :mod:`bissl_jax.evaluation.metrics`).
"""
from typing import Dict

import numpy as np

from bissl_jax.evaluation.metrics import nonfinite_mask, top_k_accuracy

GLUE_METRICS = {"cola": "matthews", "sst2": "accuracy", "mrpc": "f1", "qqp": "f1",
                "stsb": "pearson", "qnli": "accuracy", "rte": "accuracy"}


def _labels_pair(predictions, labels):
  predictions, labels = np.asarray(predictions), np.asarray(labels)
  if predictions.shape != labels.shape or predictions.ndim != 1:
    raise ValueError(f"Expected predictions and labels of one shape (N,); got "
                     f"{predictions.shape} and {labels.shape}.")
  return predictions.astype(np.int64), labels.astype(np.int64)


def accuracy(predictions, labels) -> float:
  """Share of predicted classes equal to the labels."""
  predictions, labels = _labels_pair(predictions, labels)
  return float(np.mean(predictions == labels)) if labels.size else float("nan")


def f1_binary(predictions, labels, positive: int = 1) -> float:
  """F1 of class ``positive``: ``2TP / (2TP + FP + FN)``; 0 when it is never predicted nor present."""
  predictions, labels = _labels_pair(predictions, labels)
  tp = np.sum((predictions == positive) & (labels == positive))
  fp = np.sum((predictions == positive) & (labels != positive))
  fn = np.sum((predictions != positive) & (labels == positive))
  denominator = 2 * tp + fp + fn
  return float(2 * tp / denominator) if denominator else 0.0


def matthews_corrcoef(predictions, labels) -> float:
  """Matthews correlation (multi-class form of Gorodkin 2004); 0 when undefined."""
  predictions, labels = _labels_pair(predictions, labels)
  classes = np.union1d(predictions, labels)
  confusion = np.zeros((len(classes), len(classes)), np.float64)
  np.add.at(confusion, (np.searchsorted(classes, labels),
                        np.searchsorted(classes, predictions)), 1.0)
  t, p = confusion.sum(axis=1), confusion.sum(axis=0)
  n, c = confusion.sum(), np.trace(confusion)
  denominator = np.sqrt((n * n - p @ p) * (n * n - t @ t))
  return float((c * n - t @ p) / denominator) if denominator > 0 else 0.0


def pearson(predictions, targets) -> float:
  """Pearson correlation of two real vectors; NaN when either is constant."""
  x = np.asarray(predictions, np.float64).reshape(-1)
  y = np.asarray(targets, np.float64).reshape(-1)
  if x.shape != y.shape:
    raise ValueError(f"Expected two vectors of one length; got {x.shape} and {y.shape}.")
  x, y = x - x.mean(), y - y.mean()
  denominator = np.sqrt((x @ x) * (y @ y))
  return float(x @ y / denominator) if denominator > 0 else float("nan")


def glue_scores(task: str, outputs, labels) -> Dict[str, float]:
  """The thesis's metric for a GLUE task (and accuracy for every classification task).

  Args:
    task: 'cola', 'sst2', 'mrpc', 'qqp', 'stsb', 'qnli' or 'rte'.
    outputs: logits ``(N, C)``, or predictions ``(N,)`` for STS-B.
    labels: ``(N,)`` classes, or similarity scores for STS-B.

  Returns:
    ``{metric: value}``, e.g. ``{'matthews': 0.47, 'accuracy': 0.81}``.
  """
  if task not in GLUE_METRICS:
    raise ValueError(f"Unknown GLUE task {task!r}; choose one of {sorted(GLUE_METRICS)}.")
  metric = GLUE_METRICS[task]
  outputs = np.asarray(outputs)
  if metric == "pearson":
    return {"pearson": pearson(outputs.reshape(-1), labels)}
  if outputs.ndim != 2:
    raise ValueError(f"{task} needs logits (N, C); got shape {outputs.shape}.")
  scores = {"accuracy": top_k_accuracy(outputs, labels, 1)}
  labels = np.asarray(labels).astype(np.int64)
  # argmax of a NaN row is the first NaN's class, which may be right: make it wrong.
  predictions = np.where(nonfinite_mask(outputs), (labels + 1) % outputs.shape[1],
                         np.argmax(outputs, axis=1))
  if metric == "f1":
    scores["f1"] = f1_binary(predictions, labels)
  elif metric == "matthews":
    scores["matthews"] = matthews_corrcoef(predictions, labels)
  return scores
