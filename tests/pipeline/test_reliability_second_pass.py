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

from bissl_jax.evaluation import metrics
from bissl_jax.evaluation import text_metrics
from bissl_jax.runtime.errors import NonFiniteError
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


# ------------------------------------------ 3. the whole state is finite before a save

def _stats_stage(directory, poison_at):
  """The toy stage, its state carrying a statistic that becomes inf after step ``poison_at``."""
  from test_stage_loop import _stage, _toy_step
  key = jax.random.key(0)

  def step(state, i, batch):
    new, metrics = _toy_step(state, batch["x"], jax.random.fold_in(key, i))
    var = jnp.where(i + 1 >= poison_at, jnp.inf, new.batch_stats["var"])
    return new.replace(batch_stats={"var": var}), metrics
  return _stage(directory, step=step)


def _stats_fresh():
  from bissl_jax.core.state import LevelState
  return LevelState(jnp.zeros(2), {"var": jnp.ones(3)}, {}, jnp.zeros((), jnp.int32))


def test_nonfinite_statistics_are_never_checkpointed(tmp_path):
  from bissl_jax.pipeline import checkpoint, stage_loop
  from test_stage_loop import _steps
  directory = str(tmp_path)
  with pytest.raises(NonFiniteError, match=r"statistics|batch_stats") as err:
    stage_loop.run_stage(_stats_stage(directory, poison_at=8), _stats_fresh())
  assert "['var'] (3 of 3 entries, inf)" in str(err.value)
  assert err.value.field == "toy.lr"
  assert _steps(directory) == [6]  # the epoch ending at step 9 was not saved
  ckpt = checkpoint.RunCheckpointer(os.path.join(directory, "ckpt"))
  try:
    state, _ = ckpt.restore(_stats_fresh(), 6)
  finally:
    ckpt.close()
  assert np.all(np.isfinite(np.asarray(state.batch_stats["var"])))


def test_a_checkpoint_with_nonfinite_statistics_is_set_aside(tmp_path, capsys):
  from bissl_jax.pipeline import checkpoint, stage_loop
  directory = str(tmp_path)
  with pytest.raises(NonFiniteError):
    stage_loop.run_stage(_stats_stage(directory, poison_at=8), _stats_fresh())
  ckpt = checkpoint.RunCheckpointer(os.path.join(directory, "ckpt"))
  good, extra = ckpt.restore(_stats_fresh(), 6)
  # Written by older code (no check before saving): step 7 with an inf variance.
  ckpt.save(7, good.replace(batch_stats={"var": jnp.full(3, jnp.inf)}), dict(extra, steps=7))
  ckpt.close()
  result = stage_loop.run_stage(_stats_stage(directory, poison_at=10 ** 6), _stats_fresh())
  out = capsys.readouterr().out
  assert "checkpoint step 7" in out and "Non-finite values in the state" in out, out
  assert "falling back to step 6" in out and result.resumed_from == 6


def test_finetune_record_is_checked_once_it_holds_an_epoch():
  from bissl_jax.pipeline import stage_loop, supervised
  fresh = {"level": jnp.zeros(2), "best": jnp.zeros(2),
           "record": {"best_score": -math.inf, "best_loss": math.inf, "best_epoch": -1}}
  assert stage_loop.is_finite(supervised._checked_finetune_state(fresh))
  diverged = dict(fresh, record={"best_score": 0.5, "best_loss": math.nan, "best_epoch": 1})
  assert not stage_loop.is_finite(supervised._checked_finetune_state(diverged))


# -------------------------------------------------------- the divergence message's blame

def test_a_huge_lam_is_blamed_not_the_learning_rates():
  from bissl_jax.pipeline import bissl_stage
  with pytest.raises(NonFiniteError, match="config.bissl.lam=1e\\+30") as err:
    bissl_stage.blame_lam_if_unstable(3, lam=1e30, lower_lr=0.5, momentum=0.9)
  assert err.value.field == "bissl.lam" and err.value.suggestion == pytest.approx(3.8)
  from bissl_jax import cli
  advice = cli.branch_advice(err.value, ["bissl-jax run", "--workdir=/tmp/w"],
                             digits_simclr.get_config("runlocal"))
  assert advice.endswith("--config.bissl.lam=3.8")
  # Heavy-ball on λ/2·x² with step η: x_{k+1} = (1 + β − ηλ) x_k − β x_{k−1} grows
  # exactly when ηλ > 2(1 + β); check the bound against that recursion.
  for eta_lam, grows in ((3.7, False), (3.9, True)):
    x = [1.0, 1.0]
    for _ in range(400):
      x.append((1 + 0.9 - eta_lam) * x[-1] - 0.9 * x[-2])
    assert (abs(x[-1]) > 1.0) == grows
  bissl_stage.blame_lam_if_unstable(3, lam=3.7 / 0.5, lower_lr=0.5, momentum=0.9)
  bissl_stage.blame_lam_if_unstable(3, lam=0.001, lower_lr=1.0, momentum=0.9)  # the paper's
  # A far too large LR with an ordinary λ is the LR's fault (tests/pipeline/test_provenance.py).
  bissl_stage.blame_lam_if_unstable(3, lam=0.001, lower_lr=1e30, momentum=0.9)


def test_the_branch_command_survives_being_pasted_into_bash(tmp_path):
  import subprocess
  from bissl_jax import cli
  err = NonFiniteError("diverged", field="finetune.lr")
  argv = ["python -m experiments.main", "--config.seeds=(0,)",
          f"--workdir={tmp_path}/my run", "--config.data.downstream_dataset=digits"]
  config = override(digits_simclr.get_config("runlocal"), **{"finetune.lr": 1e10})
  command = cli.branch_advice(err, argv=argv, config=config).splitlines()[-1].strip()
  args = command.split(" ", 3)[3]  # after "python -m experiments.main"
  echoed = subprocess.run(["bash", "-c", "printf '%s\\n' " + args], capture_output=True,
                          text=True, check=True).stdout.splitlines()
  assert echoed == ["--config.seeds=(0,)", "--config.data.downstream_dataset=digits",
                    f"--workdir={tmp_path}/my run-branch1",
                    f"--branch_from={tmp_path}/my run", "--config.finetune.lr=1e+09"]
