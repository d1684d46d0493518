"""Starts one pipeline run as several CPU processes on this machine (``jax.distributed``).

Every process runs the same ``python -m experiments.main`` command with
``JAX_COORDINATOR_ADDRESS=localhost:PORT``, ``BISSL_JAX_NUM_PROCESSES`` and
``BISSL_JAX_PROCESS_ID`` (docs/scale.md, "How to launch") and ``devices`` CPU devices
(``--xla_force_host_platform_device_count``). Used by
tests/pipeline/test_multiprocess_run.py; also a script::

  python tests/multiprocess_run.py WORKDIR [--config=... --config.<field>=...]

which runs 2 processes x 2 devices and prints each process's output.
"""
import json
import os
import socket
import subprocess
import sys
from typing import Optional, Sequence

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = "--config=configs/digits_simclr.py:runlocal"
# Its sitecustomize lets every process, not only process 0, write the compilation cache.
CACHING = os.path.join(REPO, "tests", "every_process_caches")


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def process_env(port: int, process_id: int, processes: int, devices: int,
                extra_env: Optional[dict] = None) -> dict:
  """The environment of process ``process_id`` of ``processes`` (CPU, ``devices`` each)."""
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=os.pathsep.join((REPO, CACHING)),
             XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
  if processes > 1:
    env.update(JAX_COORDINATOR_ADDRESS=f"localhost:{port}",
               BISSL_JAX_NUM_PROCESSES=str(processes), BISSL_JAX_PROCESS_ID=str(process_id))
  env.update(extra_env or {})
  return env


def start(workdir: str, args: Sequence[str] = (), *, processes: int = 2, devices: int = 2,
          extra_env: Optional[dict] = None, log_dir: Optional[str] = None,
          config: str = CONFIG, command: Sequence[str] = ("-m", "experiments.main")) -> list:
  """Starts the processes; each one's stdout and stderr go to ``log_dir/p<i>.log``.
  ``command`` is what follows the interpreter (e.g. ``-m bissl_jax gessl``)."""
  port = free_port()
  log_dir = log_dir or workdir + ".logs"
  os.makedirs(log_dir, exist_ok=True)
  cmd = [sys.executable, *command, f"--workdir={workdir}", config, *args]
  procs = []
  for i in range(processes):
    log = open(os.path.join(log_dir, f"p{i}.log"), "a")  # pylint: disable=consider-using-with
    procs.append(subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                                  env=process_env(port, i, processes, devices, extra_env)))
    log.close()
  return procs


def wait(procs: list, timeout: float) -> list:
  """The exit statuses; kills every process still running after ``timeout`` seconds."""
  try:
    for p in procs:
      p.wait(timeout=timeout)
  except subprocess.TimeoutExpired:
    pass
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
  return [p.returncode for p in procs]


def read_log(workdir: str, i: int, log_dir: Optional[str] = None) -> str:
  with open(os.path.join(log_dir or workdir + ".logs", f"p{i}.log")) as f:
    return f.read()


def stage_output(log: str) -> str:
  """The ``output`` path that a stage-only run prints (its JSON record, last)."""
  return json.loads(log[log.rindex("\n{"):])["output"]


# Metric fields that measure the clock, not the computation.
_CLOCK_KEYS = ("time", "per_s", "img_s", "steps_s", "elapsed")


def last_rows(workdir: str, stage_prefix: str) -> dict:
  """The last metrics row of every (stage, step) whose stage starts with the prefix
  (a resumed stage logs some steps twice), without the wall-clock fields."""
  rows = {}
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    for r in map(json.loads, f):
      if str(r.get("stage", "")).startswith(stage_prefix):
        rows[(r["stage"], r["step"])] = {k: v for k, v in r.items()
                                         if not any(t in k for t in _CLOCK_KEYS)}
  return rows


if __name__ == "__main__":
  status = wait(start(sys.argv[1], sys.argv[2:]), timeout=3600)
  for index in range(2):
    print(f"===== process {index} (exit {status[index]})\n" + read_log(sys.argv[1], index))
  sys.exit(max(abs(s) for s in status))
