"""Tests for bissl_jax.evaluation.metrics against hand-computed and devkit-style values."""
import math

import numpy as np
import pytest

from bissl_jax.evaluation import metrics


def test_top_k_hand_computed():
  logits = np.array([[0.1, 0.5, 0.2, 0.9, 0.0, 0.3],   # label 3: rank 0
                     [0.8, 0.1, 0.7, 0.6, 0.5, 0.55],  # label 4: rank 4
                     [0.2, 0.3, 0.1, 0.0, 0.6, 0.5],   # label 2: rank 4
                     [0.9, 0.8, 0.7, 0.6, 0.5, 0.4]])  # label 5: rank 5
  labels = np.array([3, 4, 2, 5])
  assert metrics.top_k_accuracy(logits, labels, 1) == 0.25
  assert metrics.top_k_accuracy(logits, labels, 4) == 0.25
  assert metrics.top_k_accuracy(logits, labels, 5) == 0.75
  assert metrics.top_k_accuracy(logits, labels, 6) == 1.0
  assert metrics.accuracy_metrics(logits, labels) == {'top1': 0.25,
                                                      'top5': 0.75}
  assert set(metrics.accuracy_metrics(logits[:, :4], labels % 4)) == {'top1'}


def test_top_k_ties_follow_stable_sort():
  # Constant outputs: only class 0 counts as the top-1 prediction.
  logits = np.zeros((4, 3))
  assert metrics.top_k_accuracy(logits, np.array([0, 1, 2, 0]), 1) == 0.5
  rng = np.random.default_rng(0)
  logits = rng.integers(0, 3, size=(200, 7)).astype(float)  # many ties
  labels = rng.integers(0, 7, size=200)
  order = np.argsort(-logits, axis=1, kind='stable')
  for k in (1, 3, 5):
    expected = np.mean([labels[i] in order[i, :k] for i in range(200)])
    assert metrics.top_k_accuracy(logits, labels, k) == pytest.approx(expected)


def _voc07_devkit_ap(out, gt):
  """VOCevalcls.m (VOC2007 devkit) transcribed: gt in {-1, 0 (difficult), 1}."""
  si = np.argsort(-out, kind='stable')
  tp = np.cumsum(gt[si] > 0)
  fp = np.cumsum(gt[si] < 0)
  rec = tp / np.sum(gt > 0)
  prec = tp / np.maximum(fp + tp, 1e-300)  # difficult-first rows give 0/0
  ap = 0.0
  for t in np.arange(0, 1.1, 0.1):
    p = prec[rec >= t]
    ap += (p.max() if p.size else 0.0) / 11
  return ap


def test_ap_hand_computed():
  # Ranking: +, -, +, -, -, +  (3 positives)
  # recall/precision after each: 1/3 @ 1, 1/3 @ 1/2, 2/3 @ 2/3, 2/3 @ 1/2,
  # 2/3 @ 2/5, 1 @ 1/2. Interpolated precision: t ≤ 1/3 → 1 (4 thresholds
  # 0,.1,.2,.3), 1/3 < t ≤ 2/3 → 2/3 (.4,.5,.6), t > 2/3 → 1/2 (.7,.8,.9,1).
  scores = np.array([0.9, 0.8, 0.7, 0.6, 0.5, 0.4])
  targets = np.array([1, 0, 1, 0, 0, 1])
  expected = (4 * 1 + 3 * (2 / 3) + 4 * 0.5) / 11
  assert metrics.average_precision_11point(scores, targets) == pytest.approx(
      expected)
  # Ignoring the first negative lifts the second positive's precision to 1.
  ignore = np.array([0, 1, 0, 0, 0, 0], bool)
  expected = (7 * 1 + 4 * 0.6) / 11  # recall 1 first reached at precision 3/5
  assert metrics.average_precision_11point(scores, targets, ignore) == (
      pytest.approx(expected))


def test_ap_matches_devkit_on_random_data():
  rng = np.random.default_rng(3)
  for trial in range(20):
    n = 60
    scores = np.round(rng.normal(size=n), 1)  # rounding creates ties
    gt = rng.choice([-1, 0, 1], size=n, p=[0.6, 0.1, 0.3])
    if not np.any(gt > 0):
      continue
    ours = metrics.average_precision_11point(scores, gt > 0, ignore=gt == 0)
    assert ours == pytest.approx(_voc07_devkit_ap(scores, gt)), trial


def test_map_perfect_ranking_is_one_and_skips_empty_classes():
  rng = np.random.default_rng(1)
  targets = rng.random((50, 6)) < 0.3
  targets[:, 5] = False  # no positives: skipped, not counted as 0
  scores = targets + 0.1 * rng.random((50, 6))
  assert metrics.mean_average_precision_11point(scores, targets) == 1.0
  worst = metrics.mean_average_precision_11point(-scores, targets)
  assert worst < 1.0
  per_class = [metrics.average_precision_11point(-scores[:, c], targets[:, c])
               for c in range(5)]
  assert worst == pytest.approx(np.mean(per_class))
  assert math.isnan(metrics.mean_average_precision_11point(
      scores, np.zeros_like(targets)))
  assert metrics.classification_metrics(scores, targets, multilabel=True) == {
      'map': 1.0, 'score': 1.0}


def test_summarize_uses_sample_std():
  out = metrics.summarize([1.0, 2.0, 3.0, 4.0])
  assert out['mean'] == 2.5 and out['n'] == 4
  assert out['std'] == pytest.approx(math.sqrt(5 / 3))  # ddof=1
  assert metrics.summarize([0.7]) == {'mean': 0.7, 'std': 0.0, 'n': 1}
  with pytest.raises(ValueError):
    metrics.summarize([])


def test_label_validation():
  with pytest.raises(ValueError, match='unlabelled'):
    metrics.top_k_accuracy(np.zeros((2, 3)), np.array([0, -1]), 1)
  with pytest.raises(ValueError, match='k=4'):
    metrics.top_k_accuracy(np.zeros((2, 3)), np.array([0, 1]), 4)
