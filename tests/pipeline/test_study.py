"""The few-label study: paired statistics, label subsets, report, resume and determinism."""
import contextlib
import io
import json
import os

import numpy as np
import pytest
from scipy import stats

from bissl_jax.evaluation import metrics
from bissl_jax.pipeline import results as results_lib
from bissl_jax.pipeline import run
from bissl_jax.pipeline import study
from bissl_jax.pipeline import study_report
from bissl_jax.pipeline.datasets import labels_per_class_subset
from configs import digits_simclr
from configs import study_digits
from config_helpers import REPO_ROOT


# ----------------------------------------------------------------------------- statistics

@pytest.mark.parametrize("n", [2, 5, 9])
def test_paired_difference_matches_scipy(n):
  rng = np.random.default_rng(n)
  control = rng.uniform(0.8, 0.95, n)
  treated = control + rng.normal(0.01, 0.02, n)
  got = metrics.paired_difference(treated, control)
  ref = stats.ttest_rel(treated, control)
  low, high = ref.confidence_interval(0.95)
  np.testing.assert_allclose(got["mean"], np.mean(treated - control), rtol=1e-12)
  np.testing.assert_allclose([got["low"], got["high"]], [low, high], rtol=1e-10)
  np.testing.assert_allclose(got["std"], np.std(treated - control, ddof=1), rtol=1e-12)
  assert got["n"] == n and got["wins"] == int(np.sum(treated > control))
  # The 90% interval of the same pairs is narrower and inside the 95% one.
  narrow = metrics.paired_difference(treated, control, confidence=0.9)
  assert low < narrow["low"] < narrow["high"] < high


def test_paired_difference_edge_cases():
  one = metrics.paired_difference([0.9], [0.8])
  assert one["n"] == 1 and np.isnan(one["low"]) and np.isclose(one["mean"], 0.1)
  with pytest.raises(ValueError, match="equally long"):
    metrics.paired_difference([0.9, 0.8], [0.8])


# ----------------------------------------------------------------------------- subsets

def test_labels_per_class_subset_is_balanced_nested_and_seeded():
  labels = np.repeat(np.arange(4), [30, 30, 30, 3])  # class 3 has fewer than asked
  five = labels_per_class_subset(labels, 5, seed=0)
  ten = labels_per_class_subset(labels, 10, seed=0)
  assert np.bincount(labels[five]).tolist() == [5, 5, 5, 3]
  assert np.bincount(labels[ten]).tolist() == [10, 10, 10, 3]
  assert set(five) <= set(ten)                      # nested within one seed
  np.testing.assert_array_equal(five, labels_per_class_subset(labels, 5, seed=0))
  assert not np.array_equal(five, labels_per_class_subset(labels, 5, seed=1))
  with pytest.raises(ValueError, match=">= 1"):
    labels_per_class_subset(labels, 0, seed=0)


def test_epochs_for_gives_at_least_the_steps():
  assert study.epochs_for(175, 50, 32, default=10) == 175     # 1 step per epoch
  assert study.epochs_for(175, 250, 32, default=10) == 25     # 7 steps per epoch
  assert study.epochs_for(175, 1150, 32, default=10) == 10    # never fewer than the default
  assert study.epochs_for(None, 1150, 32, default=3) == 3
  with pytest.raises(ValueError, match="fewer than the batch"):
    study.epochs_for(10, 20, 32, default=1)


# ----------------------------------------------------------------------------- report

def _record(labels, seed, base, bissl, devices=1):
  series = {"cg_residual": [0.5, 2.0], "v_ig_norm": [2.0, 3.0], "v_norm": [1.0, 1.0],
            "cg_min_curvature": [0.5, -1.0], "theta_distance": [0.1, 0.2]}
  return {"labels_per_class": labels, "seed": seed, "devices": devices, "metric": "top1",
          "variants": [], "train_examples": 1000 if labels == study.ALL else 10 * labels,
          "test": {"baseline": base, "bissl": bissl},
          "labels": {"baseline": "Only FT", "bissl": "BiSSL+FT"},
          "solver": {"bissl": series}, "wall_time_s": 1.0}


def test_report_tables_and_verdicts(tmp_path):
  records = [_record(5, s, 0.50, 0.60 + 0.01 * s) for s in range(3)]          # clearly better
  records += [_record(study.ALL, s, 0.90, 0.90 + (-1) ** s * 0.01) for s in range(3)]
  records += [_record(5, s, 0.51, 0.60 + 0.01 * s, devices=8) for s in range(3)]
  paired = study_report.paired_table(study_report.by_cell(records))
  assert study_report.verdict(paired[5]["bissl"]) == "better"
  assert study_report.verdict(paired[study.ALL]["bissl"]) == "no detectable difference"
  devices, drift = study_report.sensitivity_table(records)
  assert devices == 8 and np.isclose(drift[5]["baseline"]["max_abs"], 0.01)
  assert np.isclose(drift[5]["bissl"]["max_abs"], 0.0)
  solver = study_report.solver_table(records)["bissl"]
  assert solver["alternations"] == 12 and solver["share_above_1"] == 0.5
  assert solver["min_curvature"] == -1.0 and np.isclose(solver["ratio_median"], 2.5)
  text = study_report.write_report(records, str(tmp_path / "results.md"))
  assert "| 5 | 50.0 ± 0.0 | 61.0 ± 1.0 | 3 |" in text
  assert "+11.0 [" in text and "3/3 better" in text
  assert "5, on 8 simulated devices" in text and "up to 1.0 points" in text
  assert os.path.getsize(tmp_path / "results_accuracy.png") > 1000


def test_residual_share_counts_only_solves_of_the_hessian_system():
  """A residual above 1 means something only for a solve of the damped Hessian system:
  not for first order (v itself), the curvature-model solvers (their own model, solved
  exactly) or the penalty method (no solve); a preconditioned MINRES solves it."""
  cfg = study_digits.get_config()
  pipelines = ["baseline", "bissl"] + [f"bissl_{v}" for v in cfg.pipeline.bissl_variants]
  expected = ["bissl", "bissl_cg", "bissl_minres", "bissl_minres_mfac", "bissl_neumann"]
  assert sorted(study_report.hessian_system_pipelines(pipelines, cfg)) == expected
  # Without the config, from the names (a preconditioned variant is not named by solver).
  assert sorted(study_report.hessian_system_pipelines(
      [p for p in pipelines if p != "bissl_minres_mfac"])) == [
          e for e in expected if e != "bissl_minres_mfac"]


def test_raw_data_csvs_recompute_the_report_tables(tmp_path):
  """The CSVs next to the report hold every value the tables are computed from."""
  import csv
  records = [_record(5, s, 0.50 + 0.02 * s, 0.60 + 0.01 * s * s) for s in range(3)]
  records += [_record(study.ALL, s, 0.90, 0.91 - 0.01 * s) for s in range(3)]
  path = str(tmp_path / "results.md")
  text = study_report.write_report(records, path)
  assert "results_cells.csv" in text and "results_solves.csv" in text
  with open(tmp_path / "results_cells.csv") as f:
    cells = list(csv.DictReader(f))
  assert len(cells) == 2 * len(records)
  for labels, key in (("5", 5), ("all", study.ALL)):
    rows = [r for r in cells if r["labels_per_class"] == labels]
    by = {m: {int(r["seed"]): float(r["test"]) for r in rows if r["method"] == m}
          for m in ("baseline", "bissl")}
    seeds = sorted(by["baseline"])
    # The paired interval, recomputed from the CSV alone with SciPy, is the report's.
    ref = stats.ttest_rel([by["bissl"][s] for s in seeds], [by["baseline"][s] for s in seeds])
    got = study_report.paired_table(study_report.by_cell(records))[key]["bissl"]
    np.testing.assert_allclose([got["low"], got["high"]], ref.confidence_interval(0.95),
                               rtol=1e-9)
  with open(tmp_path / "results_solves.csv") as f:
    solves = list(csv.DictReader(f))
  assert len(solves) == 2 * len(records)            # two alternations per cell
  residuals = [float(r["cg_residual"]) for r in solves]
  assert np.mean(np.asarray(residuals) > 1) == study_report.solver_table(records)["bissl"][
      "share_above_1"]


# ----------------------------------------------------------------------------- end to end

def _tiny_study():
  config = study_digits.get_config("runlocal")
  config.study.seeds = (0,)
  config.study.labels_per_class = (5, study.ALL)
  # One cheap variant in a second pass: a finished cell gains a row, nothing else reruns.
  config.pipeline.bissl_variants = {"first_order": {"solver": "first_order"}}
  config.study.variant_passes = ((), ("first_order",))
  return config


class Stop(KeyboardInterrupt):
  """Ctrl-C in the middle of the second cell's BiSSL stage."""


def _without_times(record):
  return {k: v for k, v in record.items() if "wall_time" not in k and k != "checksum"}


def _quiet(fn, *args, **kwargs):
  with contextlib.redirect_stdout(io.StringIO()):
    return fn(*args, **kwargs)


@pytest.mark.slow  # three tiny studies and two tiny comparisons (about a minute)
def test_study_resumes_cell_by_cell_and_reruns_bit_identically(tmp_path):
  config = _tiny_study()
  killed, fresh = str(tmp_path / "killed"), str(tmp_path / "fresh")
  first, second = (os.path.join(killed, c.name) for c in study.grid(config.study))
  calls = []

  def stop_in_second_cell(done, state, metrics):
    calls.append(done)
    if len(calls) == config.pipeline.bissl.alternations + 3:  # cell 2, alternation 3
      raise Stop()

  with pytest.raises(Stop):
    _quiet(study.run_study, config, killed, bissl_callback=stop_in_second_cell)
  assert os.path.exists(os.path.join(first, study.CELL_RECORD))
  assert not os.path.exists(os.path.join(second, study.CELL_RECORD))
  first_log = open(os.path.join(first, "metrics.jsonl")).read()
  first_mtime = os.path.getmtime(os.path.join(first, study.CELL_RECORD))

  resumed_from = []
  records = _quiet(study.run_study, config, killed, results_path=str(tmp_path / "r.md"),
                   bissl_callback=lambda done, *_: resumed_from.append(done))
  # Only the unfinished BiSSL stages ran: cell 2's from its Ctrl-C checkpoint
  # (alternation 3), then the first_order variant of both cells in the second pass.
  assert resumed_from[0] == 4
  assert len(resumed_from) == 1 + 2 * config.pipeline.bissl.alternations
  assert len(records) == 2 and all(r["variants"] == ["first_order"] for r in records)
  # The first cell's pipeline stages were not recomputed: its log only gained the variant.
  log = open(os.path.join(first, "metrics.jsonl")).read()
  assert log.startswith(first_log)
  assert all("first_order" in json.loads(l)["stage"]
             for l in log[len(first_log):].splitlines() if l.strip())
  assert os.path.getmtime(os.path.join(first, study.CELL_RECORD)) > first_mtime
  assert "| 5 |" in open(tmp_path / "r.md").read()

  # An uninterrupted study in a fresh directory: the same bits in every cell.
  again = _quiet(study.run_study, config, fresh)
  assert [_without_times(r) for r in again] == [_without_times(r) for r in records]
  for cell in study.grid(config.study):
    a = results_lib.read_json(os.path.join(killed, cell.name, "results.json"))
    b = results_lib.read_json(os.path.join(fresh, cell.name, "results.json"))
    assert _without_times(a) == _without_times(b)


@pytest.mark.slow  # two tiny comparisons (the compiled steps are shared with the test above)
def test_pipeline_reruns_give_identical_results_json(tmp_path):
  config = digits_simclr.get_config("runlocal")
  config.seeds = (0,)
  a = _quiet(run, config, str(tmp_path / "a"))
  b = _quiet(run, config, str(tmp_path / "b"))
  assert _without_times(a) | {"plots": None} == _without_times(b) | {"plots": None}
  with open(tmp_path / "a" / "results.json") as fa, open(tmp_path / "b" / "results.json") as fb:
    assert _without_times(json.load(fa)) == _without_times(json.load(fb))


def test_labels_per_class_subsets_the_downstream_split_only():
  from bissl_jax.config_validation import ConfigError, validate_config
  from bissl_jax.pipeline import load_data
  config = digits_simclr.get_config("runlocal")
  config.data.max_train_examples = None
  config.data.labels_per_class = 3
  config.seed = 1
  splits, pretext_set = load_data(config, need_pretext=True, need_downstream=True)
  assert np.bincount(splits["train"].labels).tolist() == [3] * 10
  assert len(pretext_set) == 1150                 # every training image, unlabelled
  full, _ = load_data(digits_simclr.get_config(""), need_pretext=False, need_downstream=True)
  keep = labels_per_class_subset(full["train"].labels, 3, seed=1)
  np.testing.assert_array_equal(splits["train"].labels, full["train"].labels[keep])
  assert len(splits["test"]) == len(full["test"])
  config.data.labels_per_class = 0
  with pytest.raises(ConfigError, match="labels_per_class"):
    validate_config(config)


def test_study_command_line_runs_its_report_part(tmp_path):
  # The entry point itself (flags, signal handlers, error boundary), on an empty study:
  # it must write the report page and exit 0, without a traceback.
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  root = REPO_ROOT
  out = tmp_path / "results.md"
  proc = subprocess.run(
      [sys.executable, "-m", "experiments.study", "--part=report",
       f"--workdir={tmp_path / 'study'}", f"--results={out}"],
      cwd=root, capture_output=True, text=True, timeout=300,
      env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert "Traceback" not in proc.stderr
  assert out.exists()
