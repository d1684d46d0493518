"""A stop signal that lands while a stage compiles its first step stops the run at once.

XLA's compiler holds the main thread in C++ for as long as it takes (minutes for a
large unrolled solve), and Python signal handlers only run between bytecodes, so a
stop request recorded by :func:`bissl_jax.pipeline.stage_loop.install_stop_handlers`
would wait for the whole compilation. CPython's C-level handler also writes every
signal number to the *wakeup fd* at once; a watcher thread reads it, and while
:func:`nothing_unsaved` marks a first step of a session (nothing computed since the
last checkpoint, so nothing to save), it says so and exits with status 130. Rerunning
the same command resumes from the last checkpoint, as after any interrupt.
"""
import contextlib
import os
import signal
import socket
import threading
from typing import Iterator, Optional

INTERRUPTED_STATUS = 130
_STATE: dict = {"active": None, "sockets": None, "cleanups": []}


def _watch(reader: socket.socket) -> None:
  while True:
    try:
      data = reader.recv(1)
    except OSError:
      return
    if not data:
      return
    active: Optional[str] = _STATE["active"]
    if data[0] in (signal.SIGINT, signal.SIGTERM) and active is not None:
      print(f"\n{signal.Signals(data[0]).name} received while {active} compiles its first "
            f"step: nothing is unsaved, stopping now. Rerun the same command (same "
            f"--workdir) to resume.", flush=True)
      for cleanup in list(_STATE["cleanups"]):  # e.g. release the workdir's lock
        try:
          cleanup()
        except Exception:  # pylint: disable=broad-except  (exiting anyway)
          pass
      os._exit(INTERRUPTED_STATUS)  # the main thread is inside the compiler


def enable() -> None:
  """Starts the watcher (once; main thread only, after the stop handlers are installed)."""
  if _STATE["sockets"] is not None or threading.current_thread() is not threading.main_thread():
    return
  reader, writer = socket.socketpair()
  writer.setblocking(False)
  signal.set_wakeup_fd(writer.fileno(), warn_on_full_buffer=False)
  threading.Thread(target=_watch, args=(reader,), daemon=True, name="compile-watch").start()
  _STATE["sockets"] = (reader, writer)


@contextlib.contextmanager
def nothing_unsaved(stage: str) -> Iterator[None]:
  """While inside, a SIGINT/SIGTERM exits at once (if :func:`enable` was called)."""
  _STATE["active"] = stage
  try:
    yield
  finally:
    _STATE["active"] = None


@contextlib.contextmanager
def cleanup_on_exit(fn) -> Iterator[None]:
  """While inside, a prompt exit calls ``fn()`` first (what a ``finally`` would do)."""
  _STATE["cleanups"].append(fn)
  try:
    yield
  finally:
    _STATE["cleanups"].remove(fn)
