"""Each invocation's wall time, written as it runs, so a killed invocation still counts.

``<workdir>/wall_times.json`` lists one ``{'seconds', 'finished'}`` entry per
invocation of a comparison run (``results.wall_times`` adds them up). An entry
written only when an invocation ends is lost when it is killed (SIGKILL, an
out-of-memory kill, a power cut): after five killed invocations the reported total
was the last one's alone. :class:`InvocationClock` writes its entry when the
invocation starts and a heartbeat thread rewrites its elapsed time every
``interval`` seconds (atomically), so a killed invocation counts up to its last
heartbeat; :meth:`InvocationClock.finish` writes the final time.
"""
import os
import threading
import time
from typing import Callable, List

from bissl_jax.pipeline import results as results_lib

HEARTBEAT_S = 10.0


class InvocationClock:
  """The running invocation's entry in ``wall_times.json``.

  Args:
    workdir: the run directory (one writer: the workdir is locked).
    start: when the invocation started (``now()`` seconds).
    interval: seconds between heartbeats.
    now: the clock (``time.time``).
  """

  def __init__(self, workdir: str, start: float, *, interval: float = HEARTBEAT_S,
               now: Callable[[], float] = lambda: time.time()):
    self._path = os.path.join(workdir, results_lib.WALL_TIMES_FILE)
    self._start, self._now = start, now
    record = results_lib.read_record(self._path, "wall times") or {}
    self._entries: List[dict] = list(record.get("invocations", []))
    self._entries.append({"seconds": 0.0, "finished": False})
    self._lock = threading.Lock()
    self._write(False)
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._beat, args=(interval,), daemon=True,
                                    name="invocation-clock")
    self._thread.start()

  def _write(self, finished: bool) -> None:
    with self._lock:
      self._entries[-1] = {"seconds": float(self._now() - self._start),
                           "finished": bool(finished)}
      results_lib.write_json(self._path, {"invocations": self._entries})

  def _beat(self, interval: float) -> None:
    while not self._stop.wait(interval):
      try:
        self._write(False)
      except OSError:
        pass  # a full disk: the final write reports it

  def finish(self, finished: bool) -> List[dict]:
    """Stops the heartbeat, writes the final time; returns every invocation's entry."""
    self._stop.set()
    self._thread.join()
    self._write(finished)
    return list(self._entries)
