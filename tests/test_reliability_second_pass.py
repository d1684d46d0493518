"""Reliability, second pass: no silent wrong result from a diverged model or a damaged file.

Each test here failed on the code before the fix it covers: NaN outputs scored as
right, a diverged evaluation reported, a search ranking a diverged trial first.
"""
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bissl_jax import metrics
from bissl_jax import text_metrics
from bissl_jax.errors import NonFiniteError
from bissl_jax.pipeline import search
from config_helpers import override
from configs import digits_simclr


# ------------------------------------------------------ 1. non-finite predictions

def test_nan_logits_are_never_counted_right():
  # Every comparison with NaN is False, so a NaN row used to have "nothing ahead".
  assert metrics.accuracy_metrics(np.full((10, 10), np.nan), np.arange(10)) == {
      "top1": 0.0, "top5": 0.0}
  logits = np.eye(4)[[0, 1, 2, 3]].astype(float)  # all four right
  logits[1, 3] = np.inf   # one infinite entry: the whole row is wrong
  logits[2, 0] = np.nan
  assert metrics.top_k_accuracy(logits, np.arange(4), 1) == 0.5
  assert metrics.nonfinite_rows(logits) == 2


def test_nonfinite_scores_rank_last_in_average_precision():
  # Two positives; one scored inf, which a descending sort used to rank first.
  scores = np.array([np.inf, 0.9, 0.1])
  targets = np.array([1, 0, 1])
  # Worst order: 0.9 (neg), 0.1 (pos), then the non-finite positive last.
  ranked = np.array([0, 1, 1])
  precision = np.cumsum(ranked) / np.arange(1, 4)
  recall = np.cumsum(ranked) / 2
  expected = np.mean([precision[recall >= t].max() if np.any(recall >= t) else 0.0
                      for t in np.arange(0, 1.1, 0.1)])
  assert metrics.average_precision_11point(scores, targets) == pytest.approx(expected)
  # A multi-label row with one NaN entry is wrong in every class.
  full = np.array([[5.0, np.nan], [0.0, 0.0]])
  assert metrics.mean_average_precision_11point(full, np.array([[1, 0], [0, 1]])) == (
      pytest.approx((0.5 + 1.0) / 2))


def test_glue_metrics_count_nan_rows_wrong():
  labels = np.array([0, 1, 1, 0])
  nan = np.full((4, 2), np.nan)
  scores = text_metrics.glue_scores("mrpc", nan, labels)
  assert scores["accuracy"] == 0.0 and scores["f1"] == 0.0
  assert text_metrics.glue_scores("cola", nan, labels)["matthews"] <= 0.0


def test_search_never_selects_a_trial_with_a_nonfinite_validation_loss():
  # A diverged trial's score from NaN outputs (0.549) must not beat a healthy 0.145.
  trials = [search.Trial(1e10, 1e-4, 0.549, math.nan), search.Trial(0.05, 1e-4, 0.145, 2.1)]
  assert search.select(trials).lr == 0.05
  only = [search.Trial(1.0, 1e-4, 0.3, math.inf)]
  assert search.select(only).lr == 1.0  # every trial diverged: still returns one


def _diverged_backbone(ctx):
  params, stats = ctx.init_variables(jax.random.key(0))
  stats = jax.tree_util.tree_map(lambda x: jnp.full_like(x, jnp.inf), stats["backbone"])
  return {"params": params["backbone"], "batch_stats": stats}


def test_a_nonfinite_test_evaluation_stops_the_run_without_a_record(tmp_path, monkeypatch):
  from bissl_jax.pipeline import build_context, comparison, load_data, supervised
  config = override(digits_simclr.get_config("runlocal"), **{"finetune.epochs": 1})
  splits, _ = load_data(config, need_pretext=False, need_downstream=True)
  ctx = build_context(config, str(tmp_path))
  backbone = _diverged_backbone(ctx)

  def finetune(ctx, backbone, splits, **kwargs):  # its BatchNorm variances became inf
    head = supervised.fresh_head(ctx, 0)
    return supervised.FinetuneResult({"backbone": backbone["params"], "downstream_head": head},
                                     backbone["batch_stats"], 0.1, 2.0, 1)

  monkeypatch.setattr(supervised, "finetune", finetune)
  directory = str(tmp_path / "ft")
  with pytest.raises(NonFiniteError, match="non-finite predictions") as err:
    comparison.finetune_and_evaluate(ctx, backbone, splits, pipeline="baseline", lr=1e10,
                                     weight_decay=0.0, seed=0, directory=directory)
  assert err.value.field == "finetune.lr"
  assert not os.path.exists(os.path.join(directory, "evaluation.json"))
  scores = supervised.evaluate(ctx, {"backbone": backbone["params"],
                                     "downstream_head": supervised.fresh_head(ctx, 0)},
                               backbone["batch_stats"], splits["test"])
  assert scores["nonfinite"] == len(splits["test"]) and scores["top1"] == 0.0
