"""Wall time counts every invocation, also those killed before they could record it."""
import os
import signal
import subprocess
import sys

from bissl_jax.pipeline import invocation_clock
from bissl_jax.pipeline import results as results_lib

from config_helpers import REPO_ROOT  # noqa: E402

ROOT = REPO_ROOT

KILLED = r"""
import os, signal, sys, time
from bissl_jax.pipeline import invocation_clock
invocation_clock.InvocationClock(sys.argv[1], time.time(), interval=0.05)
time.sleep(1.0)
os.kill(os.getpid(), signal.SIGKILL)  # no finally, no atexit: what a kill -9 leaves
"""


def test_killed_invocations_count_towards_the_wall_time(tmp_path):
  workdir = str(tmp_path)
  for _ in range(3):
    proc = subprocess.run([sys.executable, "-c", KILLED, workdir], cwd=ROOT,
                          env=dict(os.environ, PYTHONPATH=ROOT), timeout=120)
    assert proc.returncode == -signal.SIGKILL
  entries = results_lib.read_json(os.path.join(workdir, results_lib.WALL_TIMES_FILE))[
      "invocations"]
  assert len(entries) == 3 and not any(e["finished"] for e in entries)
  assert all(0.8 <= e["seconds"] <= 2.0 for e in entries), entries  # up to the last beat
  clock = {"now": 100.0}
  last = invocation_clock.InvocationClock(workdir, 40.0, now=lambda: clock["now"])
  entries = last.finish(True)
  total = results_lib.wall_times(entries)["wall_time_s"]
  assert total == sum(e["seconds"] for e in entries[:3]) + 60.0
  assert total >= 60.0 + 3 * 0.8
