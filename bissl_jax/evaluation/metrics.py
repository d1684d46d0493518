"""Evaluation metrics, computed on the host with NumPy over a whole split.

Gather the model outputs of the entire evaluation set first and call these once:
accuracies and mAP are not averages of per-shard values (mAP is not decomposable
at all). Accuracies are fractions in [0, 1], not percentages.

A prediction with any non-finite score (a diverged model's NaN or inf logits) is
never right: it counts as wrong in the accuracies and ranks last (after every
finite score, its positives after its negatives) in average precision, so a
diverged model cannot score well (:func:`nonfinite_rows` counts such predictions).
"""
import math
from typing import Optional, Sequence

import numpy as np


def _check_scores(logits: np.ndarray, labels: np.ndarray):
  logits, labels = np.asarray(logits), np.asarray(labels)
  if logits.ndim != 2 or labels.shape != logits.shape[:1]:
    raise ValueError(f'Expected logits (N, C) and labels (N,), got '
                     f'{logits.shape} and {labels.shape}.')
  if labels.size and (labels.min() < 0 or labels.max() >= logits.shape[1]):
    raise ValueError(f'Labels must lie in [0, {logits.shape[1]}); got range '
                     f'[{labels.min()}, {labels.max()}] (unlabelled data '
                     'cannot be scored).')
  return logits, labels.astype(np.int64)


def nonfinite_mask(scores) -> np.ndarray:
  """``(N,)`` bool: True for the rows of ``(N, C)`` scores with any NaN or infinite entry."""
  scores = np.asarray(scores)
  if scores.ndim == 1:
    return ~np.isfinite(scores)
  return ~np.all(np.isfinite(scores.reshape(scores.shape[0], -1)), axis=1)


def nonfinite_rows(scores) -> int:
  """How many predictions (rows) of ``scores`` hold a NaN or infinite score."""
  return int(np.sum(nonfinite_mask(scores)))


def top_k_accuracy(logits, labels, k: int) -> float:
  """Share of examples whose true class is among the k highest scores.

  Ties rank the lower class index first (a stable descending sort), so a
  constant output is not rewarded for every class at once. A row with any
  non-finite score counts as wrong (every comparison with NaN is False, so it
  would otherwise count as right).

  Args:
    logits: (N, C) scores.
    labels: (N,) class indices.
    k: 1 <= k <= C.

  Returns:
    The accuracy as a float in [0, 1].
  """
  logits, labels = _check_scores(logits, labels)
  if not 1 <= k <= logits.shape[1]:
    raise ValueError(f'k={k} must lie in [1, {logits.shape[1]}].')
  true_score = np.take_along_axis(logits, labels[:, None], axis=1)
  class_ids = np.arange(logits.shape[1])[None, :]
  ahead = (logits > true_score) | ((logits == true_score)
                                   & (class_ids < labels[:, None]))
  right = (ahead.sum(axis=1) < k) & ~nonfinite_mask(logits)
  return float(np.mean(right))


def accuracy_metrics(logits, labels) -> dict[str, float]:
  """``{'top1', 'top5'}`` accuracies; 'top5' only when there are ≥ 5 classes."""
  metrics = {'top1': top_k_accuracy(logits, labels, 1)}
  if np.shape(logits)[1] >= 5:
    metrics['top5'] = top_k_accuracy(logits, labels, 5)
  return metrics


def average_precision_11point(scores, targets,
                              ignore: Optional[np.ndarray] = None) -> float:
  """PASCAL VOC2007 11-point interpolated average precision of one class.

  Ranks examples by descending score (stable for ties), then averages, over
  recall thresholds t = 0, 0.1, ..., 1, the best precision reached at a recall
  of at least t (0 where recall t is never reached) - the VOC2007 devkit's
  ``VOCevalcls``. The thresholds are ``np.arange(0, 1.1, 0.1)`` as in the usual
  Python ports and the BiSSL reference code; in floating point 0.3, 0.6 and
  0.7 come out a hair above the decimal, so a recall of exactly 3/10 does not
  reach t = 0.3 (a rare edge case, kept for comparability with those codes).

  Args:
    scores: (N,) scores for the class.
    targets: (N,) 1/True for positives, 0/False for negatives.
    ignore: optional (N,) bool; True drops the example from the evaluation
      (VOC's "difficult" ground truth, 0 in the devkit's {-1, 0, 1} labels).

  Returns:
    The AP in [0, 1], or NaN when no (kept) example is positive. Non-finite scores
    rank last, their positives after their negatives (the worst order).
  """
  scores = np.asarray(scores, np.float64).reshape(-1)
  positive = np.asarray(targets).reshape(-1) > 0
  if ignore is not None:
    keep = ~np.asarray(ignore, bool).reshape(-1)
    scores, positive = scores[keep], positive[keep]
  num_positive = positive.sum()
  if num_positive == 0:
    return math.nan
  bad = ~np.isfinite(scores)
  # lexsort: last key first; finite by descending score, then bad negatives, bad positives.
  order = np.lexsort((np.where(bad, 0.0, -scores), bad & positive, bad))
  ranked = positive[order]
  true_pos = np.cumsum(ranked)
  recall = true_pos / num_positive
  precision = true_pos / np.arange(1, len(ranked) + 1)
  interpolated = []
  for threshold in np.arange(0.0, 1.1, 0.1):
    reached = precision[recall >= threshold]
    interpolated.append(reached.max() if reached.size else 0.0)
  return float(sum(interpolated) / 11.0)  # A perfect ranking gives exactly 1.


def mean_average_precision_11point(scores, targets,
                                   ignore: Optional[np.ndarray] = None
                                   ) -> float:
  """Mean over classes of :func:`average_precision_11point` (multi-label VOC07).

  Args:
    scores: (N, C) scores.
    targets: (N, C) multi-hot targets.
    ignore: optional (N, C) bool, e.g. ``ArrayDataset.difficult``: entries
      where a class is present only through "difficult" objects, which VOC
      leaves out of the evaluation.

  Returns:
    The mAP in [0, 1]. Classes without positives are skipped; NaN if all are.
  """
  scores, targets = np.asarray(scores), np.asarray(targets)
  if scores.ndim != 2 or scores.shape != targets.shape:
    raise ValueError(f'Expected scores and targets of one (N, C) shape, got '
                     f'{scores.shape} and {targets.shape}.')
  if ignore is not None and np.shape(ignore) != scores.shape:
    raise ValueError(f'ignore must be (N, C) like scores, got '
                     f'{np.shape(ignore)}.')
  scores = np.where(nonfinite_mask(scores)[:, None], np.nan, scores)  # whole row wrong
  aps = np.array([average_precision_11point(
      scores[:, c], targets[:, c], None if ignore is None else ignore[:, c])
                  for c in range(scores.shape[1])])
  if np.all(np.isnan(aps)):
    return math.nan
  return float(np.nanmean(aps))


def classification_metrics(scores, labels, *, multilabel: bool,
                           ignore: Optional[np.ndarray] = None
                           ) -> dict[str, float]:
  """The paper's metrics for one split, with 'score' the selection metric.

  Single-label: top1 (and top5), score = top1. Multi-label: map (11-point),
  score = map.
  """
  if multilabel:
    value = mean_average_precision_11point(scores, labels, ignore)
    return {'map': value, 'score': value}
  metrics = accuracy_metrics(scores, labels)
  return {**metrics, 'score': metrics['top1']}


def summarize(values: Sequence[float]) -> dict[str, float]:
  """Mean ± std over seeds.

  The std is the sample standard deviation (ddof=1), the usual choice for
  "mean ± std over 10 seeds"; it is reported as 0.0 for a single value.

  Returns:
    ``{'mean', 'std', 'n'}``.
  """
  values = np.asarray(values, np.float64).reshape(-1)
  if values.size == 0:
    raise ValueError('summarize needs at least one value.')
  std = float(np.std(values, ddof=1)) if values.size > 1 else 0.0
  return {'mean': float(values.mean()), 'std': std, 'n': int(values.size)}


def paired_difference(treated: Sequence[float], control: Sequence[float], *,
                      confidence: float = 0.95) -> dict[str, float]:
  """Mean of ``treated − control`` over paired runs, with its t confidence interval.

  Pairs are matched by position (one seed each). The interval is
  ``mean ± t_{n−1}((1+confidence)/2) · sd / sqrt(n)`` (sd with ddof=1); with one
  pair it is (nan, nan).

  Returns:
    ``{'mean', 'std', 'n', 'low', 'high', 'wins'}``; ``wins`` counts the pairs with
    ``treated > control``.
  """
  from scipy import stats  # pylint: disable=import-outside-toplevel  (only the study needs it)
  treated = np.asarray(treated, np.float64).reshape(-1)
  control = np.asarray(control, np.float64).reshape(-1)
  if treated.shape != control.shape or not treated.size:
    raise ValueError(f'paired_difference needs two equally long, non-empty lists; got '
                     f'{treated.size} and {control.size} values.')
  diff = treated - control
  out = summarize(diff)
  n = out['n']
  half = (float(stats.t.ppf(0.5 + confidence / 2, n - 1)) * out['std'] / math.sqrt(n)
          if n > 1 else float('nan'))
  out.update(low=out['mean'] - half, high=out['mean'] + half,
             wins=int(np.sum(diff > 0)))
  return out
