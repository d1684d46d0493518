"""Random search of fine-tuning hyperparameters (BiSSL paper §4.2.1, Appendix B.2).

The paper samples 100 (learning rate, weight decay) pairs log-uniformly, LR in
[1e-4, 1] and weight decay in [1e-5, 1e-2], fine-tunes one model per pair and keeps
the pair with the best validation score; the chosen pair is then retrained with
several seeds and reported on test. Here the choice is automatic: the highest
best-epoch validation score, ties broken by the lower validation loss (the paper
sometimes overrode the top pair by hand to trade a little accuracy for a lower
loss; that judgement is not automated). The thesis's GPT experiments (§7.1.2) use a
fixed grid instead (8 learning rates × 4 weight decays): :func:`grid_configs`, given
to :func:`random_search` as ``pairs``.
"""
import itertools
import math
import os
from typing import Callable, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np

from bissl_jax.pipeline.results import read_record, write_json


class Trial(NamedTuple):
  """One fine-tuning run of the search."""
  lr: float
  weight_decay: float
  val_score: float
  val_loss: float


class SearchResult(NamedTuple):
  """The chosen pair and every trial, in sampling order."""
  lr: float
  weight_decay: float
  trials: List[Trial]


def sample_configs(num_configs: int, *, lr_range: Tuple[float, float],
                   wd_range: Tuple[float, float], seed: int) -> List[Tuple[float, float]]:
  """``num_configs`` (lr, weight decay) pairs, each log-uniform in its range.

  Args:
    num_configs: how many pairs.
    lr_range: ``(low, high)`` of the learning rate.
    wd_range: ``(low, high)`` of the weight decay.
    seed: NumPy seed; the same seed gives the same pairs.

  Returns:
    A list of ``(lr, weight_decay)`` floats.
  """
  rng = np.random.default_rng(seed)
  log_lr = rng.uniform(math.log(lr_range[0]), math.log(lr_range[1]), size=num_configs)
  log_wd = rng.uniform(math.log(wd_range[0]), math.log(wd_range[1]), size=num_configs)
  return [(float(math.exp(a)), float(math.exp(b))) for a, b in zip(log_lr, log_wd)]


def grid_configs(lrs: Sequence[float], weight_decays: Sequence[float]
                 ) -> List[Tuple[float, float]]:
  """Every (lr, weight decay) pair of the two lists, learning rate outermost."""
  return [(float(lr), float(wd)) for lr, wd in itertools.product(lrs, weight_decays)]


def select(trials: Sequence[Trial]) -> Trial:
  """The trial with the highest validation score; ties go to the lower validation loss.

  A diverged trial (a non-finite score or validation loss: a score from NaN outputs
  is no score) never wins unless every trial diverged.
  """
  def key(t: Trial):
    finite = math.isfinite(t.val_score) and math.isfinite(t.val_loss)
    return (finite, t.val_score if finite else -math.inf, -t.val_loss if finite else 0.0)
  return max(trials, key=key)


def random_search(evaluate: Callable[[float, float], Tuple[float, float]], *,
                  num_configs: int, lr_range: Tuple[float, float],
                  wd_range: Tuple[float, float], seed: int,
                  record_path: Optional[str] = None,
                  pairs: Optional[Sequence[Tuple[float, float]]] = None) -> SearchResult:
  """Runs ``evaluate(lr, wd) -> (val_score, val_loss)`` on sampled pairs and picks one.

  With ``record_path`` every finished trial is appended to a JSON file, and a rerun
  skips the trials already there (the search resumes after an interruption).

  Args:
    evaluate: fine-tunes one model and returns its best validation score and the
      validation loss at that epoch.
    num_configs: number of sampled pairs.
    lr_range: LR range, sampled log-uniformly.
    wd_range: weight-decay range, sampled log-uniformly.
    seed: sampling seed.
    record_path: optional JSON file of finished trials.
    pairs: the (lr, wd) pairs to try, e.g. :func:`grid_configs`; None samples
      ``num_configs`` from the ranges.

  Returns:
    The :class:`SearchResult`.
  """
  if pairs is None:
    pairs = sample_configs(num_configs, lr_range=lr_range, wd_range=wd_range, seed=seed)
  done = load_trials(record_path) if record_path else []
  trials: List[Trial] = []
  for i, (lr, wd) in enumerate(pairs):
    if i < len(done) and math.isclose(done[i].lr, lr) and math.isclose(done[i].weight_decay, wd):
      trials.append(done[i])
      continue
    score, loss = evaluate(lr, wd)
    trials.append(Trial(lr, wd, float(score), float(loss)))
    if record_path:
      _save_trials(record_path, trials)
  best = select(trials)
  return SearchResult(best.lr, best.weight_decay, trials)


def load_trials(path: str) -> List[Trial]:
  """Trials saved by :func:`random_search` (empty if the file does not exist)."""
  record = read_record(path, "search") if path else None
  try:
    return [Trial(**t) for t in (record or {}).get("trials", [])]
  except TypeError:  # valid JSON of another shape: start the search afresh
    print(f"[search] {path} holds no trials; ignoring it.", flush=True)
    return []


def _save_trials(path: str, trials: Sequence[Trial]) -> None:
  # Atomic: a crash never leaves a half-written record.
  write_json(path, {"trials": [t._asdict() for t in trials],
                    "best": select(trials)._asdict()})
