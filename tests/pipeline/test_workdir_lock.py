"""One writer per workdir: a second run is refused naming the first; stale locks are taken over."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from bissl_jax.runtime.errors import WorkdirInUseError
from bissl_jax.pipeline import workdir_lock

from config_helpers import REPO_ROOT  # noqa: E402

ROOT = REPO_ROOT


def test_a_second_writer_is_refused_naming_the_first(tmp_path):
  with workdir_lock.acquire(str(tmp_path)) as lock:
    holder = json.load(open(lock.path))
    assert holder["pid"] == os.getpid() and holder["host"]
    with pytest.raises(WorkdirInUseError, match=f"pid {os.getpid()} on host"):
      workdir_lock.acquire(str(tmp_path))
  assert not os.path.exists(lock.path)  # released
  workdir_lock.acquire(str(tmp_path)).release()


def _dead_pid():
  child = subprocess.Popen([sys.executable, "-c", "pass"])
  child.wait()
  return child.pid


def test_a_lock_whose_holder_is_gone_is_taken_over(tmp_path, capsys):
  path = os.path.join(str(tmp_path), workdir_lock.LOCK_FILE)
  import socket
  json.dump({"host": socket.gethostname(), "pid": _dead_pid(), "started": "earlier",
             "command": "killed run"}, open(path, "w"))
  with workdir_lock.acquire(str(tmp_path)):
    assert json.load(open(path))["pid"] == os.getpid()
  assert "stale lock" in capsys.readouterr().out
  # A pid reused by a process that started later is no holder either.
  json.dump({"host": socket.gethostname(), "pid": os.getpid(), "process_start": "1",
             "started": "earlier", "command": "killed run"}, open(path, "w"))
  workdir_lock.acquire(str(tmp_path)).release()
  # Another host's lock cannot be checked from here: refused, with how to remove it.
  json.dump({"host": "elsewhere", "pid": 1, "command": "x"}, open(path, "w"))
  with pytest.raises(WorkdirInUseError, match="delete"):
    workdir_lock.acquire(str(tmp_path))


def _command(workdir, *extra):
  return [sys.executable, "-m", "experiments.main", "--config=configs/digits_simclr.py:runlocal",
          f"--workdir={workdir}", "--config.seeds=(0,)", *extra]


def _env():
  return dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")


def test_a_second_run_on_a_held_workdir_exits_2_before_compute(tmp_path):
  workdir = str(tmp_path / "run")
  os.makedirs(workdir)
  with workdir_lock.acquire(workdir):
    second = subprocess.run(_command(workdir), cwd=ROOT, env=_env(), capture_output=True,
                            text=True, timeout=300)
  assert second.returncode == 2, second.stderr[-2000:]
  assert f"is in use by another run (pid {os.getpid()}" in second.stderr
  assert "Traceback" not in second.stderr and "start:" not in second.stdout
  assert not os.path.exists(os.path.join(workdir, "config.json"))  # wrote nothing


def _wait_for(predicate, timeout, what):
  end = time.time() + timeout
  while time.time() < end:
    if predicate():
      return
    time.sleep(0.2)
  raise AssertionError(f"timed out waiting for {what}")


@pytest.mark.slow  # one tiny pretext stage started twice, killed, and resumed (1-3 min)
def test_kill_the_writer_while_a_second_is_refused_then_resume(tmp_path):
  workdir = str(tmp_path / "run")
  ckpt = os.path.join(workdir, "pretext", "ckpt")
  command = _command(workdir, "--config.stages=pretext", "--config.pretext.epochs=2000")
  log = open(tmp_path / "first.log", "w")  # a file: a full pipe would stall the run
  first = subprocess.Popen(command, cwd=ROOT, env=_env(), stdout=log, stderr=subprocess.STDOUT)
  try:
    _wait_for(lambda: os.path.isdir(ckpt) and any(n.isdigit() for n in os.listdir(ckpt)),
              300, "the first checkpoint")
    assert first.poll() is None, open(tmp_path / "first.log").read()[-3000:]
    second = subprocess.run(command, cwd=ROOT, env=_env(), capture_output=True, text=True,
                            timeout=300)
    assert second.returncode == 2 and f"pid {first.pid}" in second.stderr, second.stderr
    first.send_signal(signal.SIGKILL)
  finally:
    first.kill()
    first.wait()
    log.close()
  # The rerun takes the stale lock over and resumes; it is then stopped like any run.
  with open(tmp_path / "rerun.log", "w") as log:
    rerun = subprocess.Popen(command, cwd=ROOT, env=_env(), stdout=log,
                             stderr=subprocess.STDOUT)
    try:
      _wait_for(lambda: "resuming at step" in open(tmp_path / "rerun.log").read(), 300,
                "the rerun to resume")
      rerun.send_signal(signal.SIGTERM)
      assert rerun.wait(timeout=300) == 130
    finally:
      rerun.kill()
      rerun.wait()
  out = open(tmp_path / "rerun.log").read()
  assert "stale lock" in out and "Traceback" not in out, out[-3000:]
  assert not os.path.exists(os.path.join(workdir, workdir_lock.LOCK_FILE))
