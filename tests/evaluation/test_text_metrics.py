"""GLUE metrics against scikit-learn and SciPy."""
import numpy as np
import pytest
import scipy.stats
from sklearn import metrics as skm

from bissl_jax.evaluation import text_metrics as tm


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_binary_metrics_match_sklearn(seed):
  r = np.random.default_rng(seed)
  labels = r.integers(0, 2, 200)
  preds = np.where(r.random(200) < 0.7, labels, 1 - labels)
  assert tm.accuracy(preds, labels) == pytest.approx(skm.accuracy_score(labels, preds))
  assert tm.f1_binary(preds, labels) == pytest.approx(skm.f1_score(labels, preds))
  assert tm.matthews_corrcoef(preds, labels) == pytest.approx(
      skm.matthews_corrcoef(labels, preds), abs=1e-12)


def test_multiclass_matthews_matches_sklearn():
  r = np.random.default_rng(3)
  labels, preds = r.integers(0, 4, 300), r.integers(0, 4, 300)
  preds[:150] = labels[:150]
  assert tm.matthews_corrcoef(preds, labels) == pytest.approx(
      skm.matthews_corrcoef(labels, preds), abs=1e-12)


def test_degenerate_cases_follow_sklearn():
  labels = np.array([0, 1, 1, 0])
  constant = np.zeros(4, int)
  assert tm.matthews_corrcoef(constant, labels) == skm.matthews_corrcoef(labels, constant) == 0
  assert tm.f1_binary(constant, labels) == skm.f1_score(labels, constant, zero_division=0) == 0
  assert np.isnan(tm.pearson(np.ones(4), np.arange(4)))


def test_pearson_matches_scipy():
  r = np.random.default_rng(4)
  x = r.normal(size=100)
  y = 0.6 * x + r.normal(size=100)
  assert tm.pearson(x, y) == pytest.approx(scipy.stats.pearsonr(x, y)[0], abs=1e-12)


def test_glue_scores_per_task():
  r = np.random.default_rng(5)
  labels = r.integers(0, 2, 50)
  logits = r.normal(size=(50, 2))
  preds = logits.argmax(1)
  assert tm.glue_scores("cola", logits, labels) == pytest.approx(
      {"accuracy": skm.accuracy_score(labels, preds),
       "matthews": skm.matthews_corrcoef(labels, preds)})
  assert tm.glue_scores("qqp", logits, labels)["f1"] == pytest.approx(skm.f1_score(labels, preds))
  assert set(tm.glue_scores("rte", logits, labels)) == {"accuracy"}
  scores = r.uniform(0, 5, 50)
  noisy = scores + r.normal(size=50)
  assert tm.glue_scores("stsb", noisy[:, None], scores)["pearson"] == pytest.approx(
      scipy.stats.pearsonr(noisy, scores)[0], abs=1e-12)
  got = tm.glue_scores("stsb", 2 * scores + 1, scores)["pearson"]
  assert got == pytest.approx(1.0)
  with pytest.raises(ValueError, match="Unknown GLUE task"):
    tm.glue_scores("mnli", logits, labels)
