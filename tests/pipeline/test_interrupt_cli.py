"""Ctrl-C and SIGTERM on the real entry point: the stage saves, says how to resume, resumes.

One subprocess run of ``experiments.main`` (the digits smoke size with a longer
pretext stage) gets SIGINT during pretraining; a rerun of the same command announces
the resume and gets SIGTERM. Neither prints a traceback or a ``done`` line for the
stopped stage.
"""
import os
import signal
import subprocess
import sys
import time

import pytest
from config_helpers import REPO_ROOT

REPO = REPO_ROOT


def _start(workdir):
  cmd = [sys.executable, "-m", "experiments.main", f"--workdir={workdir}",
         "--config=configs/digits_simclr.py:runlocal", "--config.pretext.epochs=200"]
  env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_DISABLE_MOST_OPTIMIZATIONS="1")
  return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)


def _wait_for(predicate, proc, timeout=300):
  deadline = time.time() + timeout
  while time.time() < deadline:
    if predicate():
      return
    if proc.poll() is not None:
      raise AssertionError(f"exited early: {proc.communicate()}")
    time.sleep(0.2)
  proc.kill()
  raise AssertionError("timed out")


def _pretext_records(workdir):
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return 0
  with open(path) as f:
    return sum('"pretext/seed0"' in line for line in f)


@pytest.mark.slow  # two subprocess runs, each compiling the pretext step (about a minute)
def test_sigint_then_sigterm_save_and_resume(tmp_path):
  workdir = str(tmp_path / "run")
  proc = _start(workdir)
  _wait_for(lambda: _pretext_records(workdir) >= 2, proc)
  proc.send_signal(signal.SIGINT)
  out, err = proc.communicate(timeout=300)
  assert proc.returncode == 130, (out, err)
  assert "SIGINT received: stopping after the current step" in out
  assert "[pretext/seed0] interrupted: step" in out and "rerun the same command" in out
  assert "[pretext/seed0] done" not in out
  assert "Traceback" not in err and "Rerun the same command" in err
  saved = sorted(int(s) for s in os.listdir(os.path.join(workdir, "seed0", "pretext", "ckpt"))
                 if s.isdigit())
  assert saved and saved[-1] >= 2

  proc = _start(workdir)
  _wait_for(lambda: _pretext_records(workdir) >= saved[-1] + 2, proc)
  proc.send_signal(signal.SIGTERM)
  out, err = proc.communicate(timeout=300)
  assert proc.returncode == 130, (out, err)
  assert f"[pretext/seed0] resuming at step {saved[-1]} of 400 from" in out
  assert "SIGTERM received" in out and "[pretext/seed0] interrupted: step" in out
  assert "Traceback" not in err


def _records(workdir, stage):
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return 0
  with open(path) as f:
    return sum(f'"stage": "{stage}"' in line for line in f)


# Every other stage of the comparison, made long enough to be interrupted mid-way.
STAGES = [
    ("finetune/baseline/seed0", "--config.finetune.epochs=200", "seed0/baseline/finetune/ckpt"),
    ("head_warmup/seed0", "--config.head_warmup.epochs=200", "seed0/bissl/head_warmup/ckpt"),
    ("bissl/seed0", "--config.bissl.alternations=400", "seed0/bissl/bissl/ckpt"),
]


@pytest.mark.slow  # two subprocess runs per stage, each compiling the stages before it
@pytest.mark.parametrize("stage, override, ckpt", STAGES, ids=[s[0].split("/")[0] for s in STAGES])
def test_sigint_saves_and_resumes_every_stage(tmp_path, stage, override, ckpt):
  workdir = str(tmp_path / "run")
  cmd = [sys.executable, "-m", "experiments.main", f"--workdir={workdir}",
         "--config=configs/digits_simclr.py:runlocal", override]
  env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_DISABLE_MOST_OPTIMIZATIONS="1")
  start = lambda: subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, text=True)
  proc = start()
  _wait_for(lambda: _records(workdir, stage) >= 2, proc, timeout=600)
  proc.send_signal(signal.SIGINT)
  out, err = proc.communicate(timeout=300)
  assert proc.returncode == 130, (out[-2000:], err[-2000:])
  assert f"[{stage}] interrupted: " in out and "is saved in" in out
  assert f"[{stage}] done" not in out
  assert "Traceback" not in err and "Rerun the same command" in err
  saved = sorted(int(s) for s in os.listdir(os.path.join(workdir, ckpt)) if s.isdigit())
  assert saved and saved[-1] >= 2, saved
  proc = start()
  _wait_for(lambda: _records(workdir, stage) >= saved[-1] + 1, proc, timeout=600)
  proc.send_signal(signal.SIGINT)
  out, _ = proc.communicate(timeout=300)
  assert f"[{stage}] resuming at " in out and f" {saved[-1]} of " in out, out[-2000:]
