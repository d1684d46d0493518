"""One writer per workdir: a lock file taken when a run starts, released when it ends.

Two runs on one workdir would overwrite each other's outputs, checkpoints and
records without trace. :func:`acquire` creates ``<workdir>/run.lock`` atomically
(a complete file linked into place, so it is never seen half-written) holding the
holder's host, pid, process start time and command. A second run finds it and is
refused with :class:`~bissl_jax.runtime.errors.WorkdirInUseError` naming the first. A lock
whose holder no longer runs on this host (killed with SIGKILL, a crash, a reboot;
the pid gone, or reused by a process that started later) is stale: it is named and
taken over. A lock held on another host cannot be checked from here; the message
says how to remove it.
"""
import json
import os
import socket
import sys
import time
from typing import Optional

from bissl_jax.runtime.errors import WorkdirInUseError

LOCK_FILE = "run.lock"


def _process_start(pid: int) -> Optional[str]:
  """The start time of process ``pid`` in clock ticks since boot (Linux), else None."""
  try:
    with open(f"/proc/{pid}/stat") as f:
      return f.read().rsplit(")", 1)[1].split()[19]  # field 22 of proc(5)
  except (OSError, IndexError):
    return None


def _runs_here(holder: dict) -> bool:
  """Whether the holder's process still runs on this host (the same process, not a reuse)."""
  pid = int(holder.get("pid", -1))
  if pid <= 0:
    return False
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    pass  # it exists, under another user
  started = holder.get("process_start")
  return started is None or _process_start(pid) in (None, started)


def _read(path: str) -> Optional[dict]:
  try:
    with open(path) as f:
      holder = json.load(f)
    return holder if isinstance(holder, dict) else None
  except (OSError, ValueError):
    return None


def describe(holder: dict) -> str:
  return (f"pid {holder.get('pid')} on host {holder.get('host')}, started "
          f"{holder.get('started')}: {holder.get('command')}")


class WorkdirLock:
  """A held lock; :meth:`release` removes it (only if it is still this process's)."""

  def __init__(self, path: str, holder: dict):
    self.path, self.holder = path, holder

  def release(self) -> None:
    current = _read(self.path)
    if current is not None and current.get("pid") == self.holder["pid"] and (
        current.get("host") == self.holder["host"]):
      os.remove(self.path)

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.release()


def acquire(workdir: str) -> WorkdirLock:
  """Takes the lock of ``workdir`` (which must exist) for this process.

  Raises:
    WorkdirInUseError: another live process holds it (the message names it).
  """
  path = os.path.join(workdir, LOCK_FILE)
  me = {"host": socket.gethostname(), "pid": os.getpid(),
        "process_start": _process_start(os.getpid()),
        "started": time.strftime("%Y-%m-%d %H:%M:%S"), "command": " ".join(sys.argv)}
  tmp = f"{path}.{me['host']}.{me['pid']}.tmp"
  with open(tmp, "w") as f:
    json.dump(me, f)
  try:
    for _ in range(5):
      try:
        os.link(tmp, path)  # atomic, and fails if a lock exists
        return WorkdirLock(path, me)
      except FileExistsError:
        holder = _read(path)
      if holder is None:  # vanished meanwhile, or not a lock this code wrote
        if os.path.exists(path) and _read(path) is None:
          print(f"{path} is not a lock file of bissl_jax; replacing it.", flush=True)
          _remove(path)
        continue
      if holder.get("host") == me["host"] and not _runs_here(holder):
        print(f"A stale lock in {workdir} ({describe(holder)}) is left from a run that no "
              f"longer runs; taking it over.", flush=True)
        _remove(path)
        continue
      raise WorkdirInUseError(
          f"--workdir={workdir} is in use by another run ({describe(holder)}). Two runs on "
          f"one workdir would overwrite each other's results. Wait for it to finish, stop "
          f"it, or use another --workdir"
          + ("." if holder.get("host") == me["host"] else
             f"; if that run is gone (it ran on another host), delete {path}."))
    raise WorkdirInUseError(f"Could not take the lock {path}: other runs keep taking it.")
  finally:
    _remove(tmp)


def _remove(path: str) -> None:
  try:
    os.remove(path)
  except FileNotFoundError:
    pass
