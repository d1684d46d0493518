"""Timing contenders that live in other processes, interleaved with local ones.

Some contenders cannot share a process: the reference PyTorch BiSSL needs its own
Python (torchvision, timm), and each XLA flag set needs its own JAX backend. A
*worker* process builds its contenders once, prints ``ready`` and then answers
commands, one JSON line each, on its own stdout; everything it prints otherwise goes
to its stderr (a log file). While the parent times something else, a worker blocks on
its stdin and uses no CPU, so rounds can alternate between processes as
``common.interleaved_timings`` alternates within one.

Standard library only: the reference's interpreter imports this module too.
"""
import json
import os
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence


class WorkerError(RuntimeError):
  """A worker died or answered with an error; the message ends with its log's tail."""


class Worker:
  """The parent's handle of one worker process.

  Args:
    command: the worker's argv (interpreter first).
    env: extra environment variables (on top of this process's).
    cwd: working directory (default: the repository root, which also goes first on
      the worker's ``PYTHONPATH``).
    startup_timeout: seconds to wait for ``ready`` (building and compiling).
  """

  def __init__(self, command: Sequence[str], env: Optional[Mapping[str, str]] = None,
               cwd: Optional[str] = None, startup_timeout: float = 1800.0):
    self.command = list(command)
    self.log = tempfile.NamedTemporaryFile("w+", prefix="bench_worker_", suffix=".log",
                                           delete=False)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    full_env = dict(os.environ)
    # The worker imports bench.worker_protocol (and, for JAX workers, bissl_jax) from here.
    full_env["PYTHONPATH"] = os.pathsep.join(
        [root] + [p for p in full_env.get("PYTHONPATH", "").split(os.pathsep) if p])
    full_env.update(env or {})
    self.proc = subprocess.Popen(self.command, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                 stderr=self.log, cwd=cwd or root, env=full_env, text=True,
                                 bufsize=1)
    self.info = self._read(startup_timeout)
    if self.info.get("status") != "ready":
      raise WorkerError(f"worker {self.command[:3]} did not start: {self.info}{self.tail()}")

  def tail(self, lines: int = 30) -> str:
    self.log.flush()
    with open(self.log.name, encoding="utf-8", errors="replace") as f:
      text = f.read().splitlines()[-lines:]
    return "\n--- worker log (last lines) ---\n" + "\n".join(text) if text else ""

  def _read(self, timeout: float) -> Dict[str, Any]:
    del timeout  # the blocking read ends when the worker answers or dies
    line = self.proc.stdout.readline()
    if not line:
      self.proc.wait()
      raise WorkerError(f"worker {self.command[:3]} exited with code {self.proc.returncode}"
                        f"{self.tail()}")
    return json.loads(line)

  def call(self, cmd: str, **kwargs) -> Dict[str, Any]:
    """Sends one command and returns the worker's JSON answer."""
    self.proc.stdin.write(json.dumps({"cmd": cmd, **kwargs}) + "\n")
    self.proc.stdin.flush()
    answer = self._read(0)
    if "error" in answer:
      raise WorkerError(f"worker failed on {cmd!r}: {answer['error']}{self.tail()}")
    return answer

  def seconds(self, name: str) -> float:
    """Runs contender ``name`` once in the worker; its wall seconds there."""
    return float(self.call("time", name=name)["seconds"])

  def close(self) -> None:
    if self.proc.poll() is None:
      try:
        self.proc.stdin.write(json.dumps({"cmd": "exit"}) + "\n")
        self.proc.stdin.flush()
        self.proc.wait(timeout=30)
      except (BrokenPipeError, subprocess.TimeoutExpired):
        self.proc.kill()
    self.log.close()
    os.unlink(self.log.name)


def interleaved_seconds(contenders: Mapping[str, Callable[[], float]], rounds: int,
                        warmup: int = 0) -> Dict[str, List[float]]:
  """Like ``common.interleaved_timings``, for thunks that return their own seconds.

  Each thunk runs its contender once (locally or in a worker) and returns the wall
  seconds measured where it ran, so process-to-process messages are not timed.
  """
  for _ in range(warmup):
    for thunk in contenders.values():
      thunk()
  out = {name: [] for name in contenders}
  for _ in range(rounds):
    for name, thunk in contenders.items():
      out[name].append(float(thunk()))
  return out


def serve(contenders: Mapping[str, Callable[[], Any]], *,
          wait: Callable[[Any], Any] = lambda x: x,
          extra: Optional[Mapping[str, Callable[[Dict[str, Any]], Dict[str, Any]]]] = None,
          info: Optional[Mapping[str, Any]] = None) -> None:
  """The worker's loop: announces ``ready`` (with ``info``), then answers commands.

  Commands: ``{"cmd": "time", "name": N}`` runs contender N once and answers its
  seconds (``wait`` blocks on its result, e.g. ``jax.block_until_ready``);
  ``{"cmd": "exit"}`` ends; any other ``cmd`` is looked up in ``extra``.
  """
  out = _protocol_stream()
  out.write(json.dumps({"status": "ready", **dict(info or {})}) + "\n")
  out.flush()
  for line in sys.stdin:
    request = json.loads(line)
    cmd = request.get("cmd")
    try:
      if cmd == "exit":
        break
      if cmd == "time":
        thunk = contenders[request["name"]]
        start = time.perf_counter()
        wait(thunk())
        answer = {"seconds": time.perf_counter() - start}
      else:
        answer = dict((extra or {})[cmd](request))
    except Exception as e:  # pylint: disable=broad-except
      answer = {"error": f"{type(e).__name__}: {e}"}
    out.write(json.dumps(answer) + "\n")
    out.flush()


_PROTOCOL = None


def _protocol_stream():
  """The worker's real stdout for answers; ``print`` goes to stderr from then on."""
  global _PROTOCOL
  if _PROTOCOL is None:
    sys.stdout.flush()
    _PROTOCOL = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
  return _PROTOCOL


def redirect_prints() -> None:
  """Call first in a worker: prints during setup must not reach the protocol."""
  _protocol_stream()


def fail(message: str) -> None:
  """Reports a setup failure to the parent and exits."""
  out = _protocol_stream()
  out.write(json.dumps({"status": "failed", "error": message}) + "\n")
  out.flush()
  sys.exit(1)
