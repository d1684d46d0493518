"""SIGINT/SIGTERM as requests that the stage loop honours between steps.

The first signal is recorded and the running (or next) stage stops after its current
step, saving it; a second one raises ``KeyboardInterrupt`` at once. While a stage's
first step of a session compiles (nothing unsaved), a signal exits at once with status
130 (:mod:`bissl_jax.pipeline.compile_watch`).
"""
import contextlib
import signal
import threading

from bissl_jax.pipeline import compile_watch


class StopRequested(KeyboardInterrupt):
  """A SIGINT/SIGTERM asked the running stage to stop after its current step."""


# Signals received and not yet honoured (process-wide): a handler only records them,
# so no signal can be lost inside a callback that swallows exceptions (JAX's
# garbage-collection hook) or interrupt XLA's compiler half-way.
_PENDING_STOP: list = []


def _record_signal(signum, frame) -> None:
  del frame
  if _PENDING_STOP:
    raise KeyboardInterrupt(f"{signal.Signals(signum).name} received twice")
  _PENDING_STOP.append(signum)
  print(f"\n{signal.Signals(signum).name} received: stopping after the current step and "
        f"saving it (send it again to stop at once).", flush=True)


def install_stop_handlers() -> None:
  """Makes SIGINT/SIGTERM of the whole process requests that every stage loop honours.

  The first signal is recorded and the running (or next) stage stops after its
  current step, saving it; a second one raises ``KeyboardInterrupt`` at once. While
  a stage's first step of a session compiles (nothing unsaved), a signal exits at
  once with status 130 (:mod:`bissl_jax.pipeline.compile_watch`). The entry points
  call this once; :func:`run_stage` installs the same handlers while it runs.
  """
  if threading.current_thread() is threading.main_thread():
    for sig in (signal.SIGINT, signal.SIGTERM):
      signal.signal(sig, _record_signal)
    compile_watch.enable()  # a signal during a first step's compilation stops at once


@contextlib.contextmanager
def deferred_signals(name: str):
  """Turns the first SIGINT/SIGTERM into a request the loop reads between steps.

  Yields a function that returns True once a stop was requested (also one received
  before this stage started). A signal never interrupts a step half-way (or XLA's
  compiler, or a checkpoint write); a second signal raises ``KeyboardInterrupt`` at
  once. Outside the main thread signals cannot be caught, and the function always
  returns False.
  """
  del name
  if threading.current_thread() is not threading.main_thread():
    yield lambda: False
    return
  previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
  for sig in previous:
    signal.signal(sig, _record_signal)
  try:
    yield lambda: bool(_PENDING_STOP)
  finally:
    for sig, old in previous.items():
      signal.signal(sig, old)


def take_pending() -> bool:
  """Whether a stop was requested; the request is consumed (honoured by the caller)."""
  if _PENDING_STOP:
    _PENDING_STOP.clear()
    return True
  return False
