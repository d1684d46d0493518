"""The GeSSL comparison end to end: ``bissl-jax gessl`` as 1 process with 4 devices and
as 2 processes with 2 devices each (``jax.distributed`` over localhost), and the older
entry point reusing the first run.

Both launches pretrain both methods, extract every split's features over the mesh
(each process its rows of every batch, every process receiving all features), fit
the linear probe and draw the few-shot episodes. They must give the same scores:
the pretraining differs between the topologies only by the rounding of its
cross-process reductions, which moves no probe prediction and no episode's answer
(measured: every score, intervals included, equal in every digit). Only process 0
writes the results and prints the table.
"""
import json
import os
import subprocess
import sys

import pytest

import multiprocess_run as launch

CONFIG = "--config=configs/digits_gessl.py:runlocal"
# A probe of 60 steps instead of runlocal's 2, so that its accuracy is not chance's.
ARGS = ("--config.probe.epochs=60",)
GESSL = ("-m", "bissl_jax", "gessl")
FAST_COMPILE = {"JAX_DISABLE_MOST_OPTIMIZATIONS": "1"}


def _gessl(workdir, processes, devices):
  procs = launch.start(str(workdir), ARGS, processes=processes, devices=devices,
                       config=CONFIG, command=GESSL, extra_env=FAST_COMPILE)
  codes = launch.wait(procs, timeout=1200)
  logs = [launch.read_log(str(workdir), i) for i in range(processes)]
  assert codes == [0] * processes, "\n---\n".join(log[-3000:] for log in logs)
  with open(workdir / "results.json", encoding="utf-8") as f:
    return json.load(f), logs


def _assert_gessl_comparison_results(workdir, results):
  """What ``gessl_comparison.run`` writes: both methods, their pretext stages, the split."""
  from bissl_jax.pipeline import gessl_comparison  # pylint: disable=import-outside-toplevel
  cfg = gessl_comparison.load_config(os.path.join(launch.REPO, "configs", "digits_gessl.py"),
                                     "runlocal")
  assert set(results["summary"]) == {"simclr", "simclr+gessl"} == set(
      gessl_comparison.methods(cfg))
  # Pretraining ran in the pipeline's pretext stage: exports and metric logs per method.
  for method in results["summary"]:
    assert (workdir / method / "pretext_seed0" / "output").is_dir()
    assert any((workdir / method).glob("metrics*"))
  # Only the training classes' images were pretrained on.
  assert 32 <= results["pretext_images"] < 96
  assert not set(results["train_classes"]) & set(results["held_out_classes"])
  for stats in results["summary"].values():
    assert set(stats) == {"linear_probe", "5way_1shot", "5way_5shot"}
    assert all(0.0 <= s["mean"] <= 1.0 for s in stats.values())
  assert (workdir / "results.md").read_text().count("|") > 10


def _table_rows(text):
  """The printed table's rows without their last cell (the method's seconds)."""
  return [row.rsplit("|", 2)[0] for row in text[text.index("| Method"):].split("\n")[:4]]


@pytest.mark.slow
def test_gessl_comparison_gives_one_table_on_one_and_on_two_processes(tmp_path):
  one, (log,) = _gessl(tmp_path / "one", processes=1, devices=4)
  _assert_gessl_comparison_results(tmp_path / "one", one)
  # The probe learned something (10 classes: chance is about 0.1).
  assert all(s["linear_probe"]["mean"] > 0.2 for s in one["summary"].values()), one

  two, logs = _gessl(tmp_path / "two", processes=2, devices=2)
  _assert_gessl_comparison_results(tmp_path / "two", two)
  assert two["per_seed"] == one["per_seed"]
  assert _table_rows(logs[0]) == _table_rows(log)
  assert "| Method" not in logs[1] and "seed 0:" not in logs[1]  # process 0 reports

  # The older command line on the same workdir reuses the finished runs: the same table.
  old = subprocess.run(
      [sys.executable, "-m", "bissl_jax.pipeline.gessl_comparison", "--config",
       "configs/digits_gessl.py", "--config-arg", "runlocal", "--set", "probe.epochs=60",
       "--workdir", str(tmp_path / "one")], cwd=launch.REPO, capture_output=True,
      text=True, timeout=900,
      env=launch.process_env(0, 0, processes=1, devices=4, extra_env=FAST_COMPILE))
  assert old.returncode == 0, old.stderr[-3000:]
  assert _table_rows(old.stdout) == _table_rows(log)
