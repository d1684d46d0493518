"""Repeated SIGTERM/SIGINT at random times never lose a run or change its result.

A tiny stage loop (``signal_stress_stage.py``) runs in a subprocess that is sent
SIGTERM or SIGINT at a random moment after its handlers are installed (during the
first step's XLA compilation, inside a step, between steps, during a checkpoint
write), 20 times each, every run resuming the previous one's directory. Each must
exit cleanly (status 130; one that had already finished may exit 0 or by the
signal during interpreter shutdown; never a crash such as a segfault), and the
finished run must equal an uninterrupted one bit for bit. The stage is long enough
(about 8 s of steps) that the 40 signals all land before it finishes.
"""
import os
import random
import signal
import subprocess
import sys
import time

import pytest
from config_helpers import TESTS_DIR

HERE = TESTS_DIR
SCRIPT = os.path.join(HERE, "signal_stress_stage.py")
ENV = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=os.path.dirname(HERE))


def _start(directory):
  return subprocess.Popen([sys.executable, SCRIPT, directory], env=ENV, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _final(out):
  return next(l.split()[1] for l in out.splitlines() if l.startswith("final "))


@pytest.mark.slow  # 41 short subprocesses (about a minute on 2 cores)
def test_random_sigterm_and_sigint_always_resume_identically(tmp_path):
  reference = _start(str(tmp_path / "reference"))
  out, err = reference.communicate(timeout=120)
  assert reference.returncode == 0, err
  expected = _final(out)

  directory = str(tmp_path / "killed")
  rng = random.Random(0)
  kills = [signal.SIGTERM] * 20 + [signal.SIGINT] * 20
  rng.shuffle(kills)
  finished, interrupted = None, 0
  for i, signum in enumerate(kills):
    proc = _start(directory)
    assert proc.stdout.readline().strip() == "ready"
    time.sleep(rng.uniform(0.0, 0.5))
    proc.send_signal(signum)
    out, err = proc.communicate(timeout=120)
    done = "final " in out  # finished before the signal (it then lands in the exit)
    assert proc.returncode == 130 or (done and proc.returncode in (0, -signum)), (
        i, signum, proc.returncode, err[-2000:])
    assert "Traceback" not in err and "Exception ignored" not in err, (i, err[-2000:])
    interrupted += proc.returncode == 130
    if done:
      finished = _final(out)
  assert interrupted >= 35  # nearly every signal stopped a running stage
  proc = _start(directory)
  out, err = proc.communicate(timeout=120)
  assert proc.returncode == 0, err[-2000:]
  assert _final(out) == expected
  if finished is not None:
    assert finished == expected


REPO = os.path.dirname(HERE)


def _start_cli(workdir):
  cmd = [sys.executable, "-m", "experiments.main", f"--workdir={workdir}",
         "--config=configs/digits_simclr.py:runlocal", "--config.pretext.epochs=50"]
  return subprocess.Popen(cmd, cwd=REPO, env=dict(ENV, JAX_DISABLE_MOST_OPTIMIZATIONS="1"),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _signal_after_line(proc, marker, signum, delay):
  seen = []
  for line in proc.stdout:
    seen.append(line)
    if marker in line:
      time.sleep(delay)
      proc.send_signal(signum)
      break
  out, err = proc.communicate(timeout=300)
  return "".join(seen) + out, err


@pytest.mark.slow  # two runs of the real entry point up to its first compilations
def test_a_signal_during_compilation_exits_cleanly(tmp_path):
  workdir = str(tmp_path / "run")
  # While the context is built (the model's init compiles) and the pretext step compiles.
  for marker, signum in (("bissl-jax: backend", signal.SIGTERM),
                         ("(compiling", signal.SIGINT)):
    proc = _start_cli(workdir)
    out, err = _signal_after_line(proc, marker, signum, 0.2)
    assert proc.returncode == 130, (marker, proc.returncode, err[-3000:])
    assert "Fatal Python error" not in err and "Segmentation" not in err
    assert "Traceback" not in err and "Exception ignored" not in err, err[-3000:]
    assert f"{signal.Signals(signum).name} received" in out
