"""Whole pipeline runs as 2 CPU processes x 2 devices, coordinated by ``jax.distributed``.

The offline default at the smoke size (one seed) runs as 2 processes with 2 devices
each (tests/multiprocess_run.py starts them over localhost). A second 2-process job is
killed (SIGKILL, both processes) during BiSSL after its first checkpoint, started
again, and must finish with the uninterrupted job's results to the last bit. Only
process 0 prints the table. Against 1 process with 4 devices the runs differ by the
rounding of the cross-process reductions (docs/scale.md, "Across processes"): the
pretext steps are compared within that measured floor. A process killed alone makes
the other stop with a message within the heartbeat timeout instead of waiting forever.
"""
import json
import os
import signal
import time

import pytest

import multiprocess_run as launch

# Compile with XLA's optimisations off (the same in every run): faster here.
FAST_COMPILE = {"JAX_DISABLE_MOST_OPTIMIZATIONS": "1"}
ARGS = ("--config.seeds=(0,)", "--config.bissl.checkpoint_every=1")
_VARIES = ("wall_time_s", "resumed_wall_time_s", "checksum")  # not results
# Measured (docs/scale.md): 1 process x 4 devices against 2 x 2, relative differences of
# the pretext metrics: <= 1.5e-6 at the first two steps, <= 2e-3 by the fourth.
FIRST_STEPS_FLOOR, PRETEXT_FLOOR = 1e-5, 1e-2


def _results(workdir):
  with open(os.path.join(workdir, "results.json")) as f:
    record = json.load(f)
  return {k: v for k, v in record.items() if k not in _VARIES}


def _table(log):
  lines = log.splitlines()
  start = next(i for i, line in enumerate(lines) if line.startswith("| Pipeline"))
  return lines[start:start + 5]


def _pretext_records(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return {r["step"]: r for r in map(json.loads, f) if r["stage"] == "pretext/seed0"}


def _wait_for(ready, procs, workdir, timeout=900):
  deadline = time.time() + timeout
  while time.time() < deadline and not ready():
    if any(p.poll() is not None for p in procs):  # show why: the logs go with tmp_path
      launch.wait(procs, timeout=1)  # the others are killed
      tails = [launch.read_log(workdir, i)[-3000:] for i in range(len(procs))]
      raise AssertionError(f"a process exited before the kill: {[p.poll() for p in procs]}\n"
                           + "\n---\n".join(tails))
    time.sleep(0.5)
  assert ready(), "timed out"


def _saved_steps(directory):
  return [n for n in os.listdir(directory) if n.isdigit()] if os.path.isdir(directory) else []


@pytest.mark.slow  # two 2-process jobs and a 1-process pretext stage (many minutes here)
@pytest.mark.skipif(
    not os.environ.get("BISSL_JAX_WHOLE_MULTIPROCESS_RUN"),
    reason="opt-in (BISSL_JAX_WHOLE_MULTIPROCESS_RUN=1): over 20 minutes on a 2-core "
           "machine, and not yet seen to pass (docs/scale.md, 'Across processes')")
def test_two_processes_killed_mid_bissl_resume_to_the_uninterrupted_results(tmp_path):
  whole, killed, one = (str(tmp_path / name) for name in ("whole", "killed", "one"))
  assert launch.wait(launch.start(whole, ARGS, extra_env=FAST_COMPILE), timeout=2400) == [0, 0]

  procs = launch.start(killed, ARGS, extra_env=FAST_COMPILE)
  ckpt = os.path.join(killed, "seed0", "bissl", "bissl", "ckpt")
  _wait_for(lambda: _saved_steps(ckpt), procs, killed)  # a complete BiSSL checkpoint (of 4)
  for p in procs:
    p.send_signal(signal.SIGKILL)
  assert launch.wait(procs, timeout=60) == [-signal.SIGKILL] * 2
  assert not os.path.exists(os.path.join(killed, "results.json"))
  assert launch.wait(launch.start(killed, ARGS, extra_env=FAST_COMPILE),
                     timeout=2400) == [0, 0]
  logs = [launch.read_log(killed, i) for i in range(2)]
  assert "[bissl/seed0] resuming at alt" in logs[0]
  assert _results(killed) == _results(whole)  # every metric, to the last bit
  assert _table(logs[0]) == _table(launch.read_log(whole, 0))
  assert "| Pipeline" not in logs[1]  # process 1 computes, process 0 reports

  # 1 process x 4 devices: the same batches and keys, other reduction order.
  assert launch.wait(launch.start(one, ARGS + ("--config.stages=pretext",), processes=1,
                                  devices=4, extra_env=FAST_COMPILE), timeout=1200) == [0]
  mine, theirs = _pretext_records(one), _pretext_records(whole)
  assert sorted(mine) == sorted(theirs) and mine
  for step, record in mine.items():
    floor = FIRST_STEPS_FLOOR if step <= 2 else PRETEXT_FLOOR
    for key in ("loss", "grad_norm"):
      assert record[key] == pytest.approx(theirs[step][key], rel=floor), (step, key)


@pytest.mark.slow  # two processes start and compile until one is killed (about a minute)
def test_a_process_killed_alone_stops_the_other_with_a_message(tmp_path):
  workdir = str(tmp_path / "run")
  procs = launch.start(workdir, ARGS, extra_env=dict(FAST_COMPILE,
                                                     BISSL_JAX_HEARTBEAT_TIMEOUT="5"))
  _wait_for(lambda: os.path.exists(os.path.join(workdir, "config.json")), procs, workdir,
            timeout=300)
  procs[1].send_signal(signal.SIGKILL)
  started = time.time()
  status = launch.wait(procs, timeout=120)
  assert status[1] == -signal.SIGKILL
  assert status[0] not in (0, None) and time.time() - started < 100, status
  log = launch.read_log(workdir, 0)
  assert ("another task died" in log  # JAX's coordination service (heartbeats)
          or "lost contact with another process" in log), log[-3000:]
