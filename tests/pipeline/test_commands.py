"""One command line: run, study, gessl, visualize and convert under ``bissl-jax``, each with
``--config=`` and ``--workdir=``, and the older entry points still working."""
import json
import os
import subprocess
import sys

import pytest

from bissl_jax import cli

from config_helpers import REPO_ROOT  # noqa: E402

REPO = REPO_ROOT


def _run(args, cwd):
  return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True,
                        timeout=1500, env=dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu"))


def test_every_command_is_listed_and_takes_config_and_workdir(tmp_path):
  proc = _run(["-m", "bissl_jax"], tmp_path)
  for command in ("run", "study", "gessl", "visualize", "convert"):
    assert f"  {command} " in proc.stdout, command
  for command in ("run", "gessl", "study", "visualize"):
    proc = _run(["-m", "bissl_jax", command, "--help"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "--config" in proc.stdout and "--workdir" in proc.stdout, command
    assert proc.stdout.startswith(f"usage: bissl-jax {command}") or command == "visualize"
  gessl_help = _run(["-m", "bissl_jax", "gessl", "--help"], tmp_path).stdout
  assert "configs/digits_gessl.py" in gessl_help and "fewshot.shots" in gessl_help
  study_help = _run(["-m", "bissl_jax", "study", "--help"], tmp_path).stdout
  assert "--results" in study_help and "--part" in study_help


def test_gessl_command_errors_like_run(tmp_path):
  proc = _run(["-m", "bissl_jax", "gessl", "--config.gessl.lamm=3",
               f"--workdir={tmp_path / 'w'}"], tmp_path)
  assert proc.returncode == cli.USER_ERROR_STATUS and "Traceback" not in proc.stderr
  assert "gessl.lamm: unknown field; did you mean 'gessl.lam'" in proc.stderr


def _assert_gessl_comparison_results(workdir):
  """What ``gessl_comparison.run`` writes: both methods, their pretext stages, the split."""
  from bissl_jax.pipeline import gessl_comparison  # pylint: disable=import-outside-toplevel
  cfg = gessl_comparison.load_config(os.path.join(REPO, "configs", "digits_gessl.py"),
                                     "runlocal")
  with open(workdir / "results.json", encoding="utf-8") as f:
    results = json.load(f)
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


# The one end-to-end run of the GeSSL comparison in the suite (it also checks what the
# comparison writes, which tests/evaluation/test_fewshot.py checked with a run of its own).
@pytest.mark.slow
def test_gessl_command_and_the_old_entry_point_give_one_table(tmp_path):
  workdir = tmp_path / "gessl"
  new = _run(["-m", "bissl_jax", "gessl", "--config=configs/digits_gessl.py:runlocal",
              f"--workdir={workdir}"], REPO)
  assert new.returncode == 0, new.stderr[-3000:]
  _assert_gessl_comparison_results(workdir)
  table = new.stdout[new.stdout.index("| Method"):]
  # The old command line on the same workdir reuses the finished runs: the same table.
  old = _run(["-m", "bissl_jax.pipeline.gessl_comparison", "--config",
              "configs/digits_gessl.py", "--config-arg", "runlocal", "--workdir",
              str(workdir)], REPO)
  assert old.returncode == 0, old.stderr[-3000:]
  def scores(text):  # each row without its last cell (the method's seconds)
    return [row.rsplit("|", 2)[0] for row in text[text.index("| Method"):].split("\n")[:4]]
  assert scores(old.stdout) == scores(table)
