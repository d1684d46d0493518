"""One command line: run, study, gessl, visualize and convert under ``bissl-jax``, each with
``--config=`` and ``--workdir=``, and the older entry points still working."""
import os
import subprocess
import sys

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


# The GeSSL comparison's end-to-end run (the new command, the old entry point, and
# two processes): tests/pipeline/test_multiprocess_gessl.py.
