"""Run logging: JSON lines, TensorBoard (tensorboardX) and progress bars.

* ``<workdir>/metrics.jsonl``: one JSON object per logged step,
  ``{"stage": ..., "step": ..., "time": ..., <metric>: <float>, ...}``.
* ``<workdir>/tensorboard/``: the same scalars as ``<stage>/<metric>``.
* Progress: a tqdm bar with rate and ETA on a terminal; elsewhere (CI, files) plain
  lines every ~10% with steps/s, images/s and ETA. The rate and ETA leave out the
  first step of a session, which includes XLA compilation. A ``done`` line is printed
  only for a stage that ran to its end.

Only process 0 writes files in multi-host runs.
"""
import json
import math
import os
import sys
import time
from typing import Mapping, Optional

import jax
import numpy as np
from bissl_jax.runtime import mesh as parallel


def to_float(value) -> float:
  """A host float from a Python/NumPy/JAX scalar or the mean of an array."""
  return float(np.mean(np.asarray(jax.device_get(value), dtype=np.float64)))


class MetricLogger:
  """Writes scalar metrics to ``metrics.jsonl`` and TensorBoard.

  Args:
    workdir: the run directory.
    tensorboard: also write a TensorBoard event file.
  """

  def __init__(self, workdir: str, *, tensorboard: bool = True):
    self.enabled = parallel.is_writer()
    self.path = os.path.join(workdir, "metrics.jsonl")
    self._writer = None
    if self.enabled:
      os.makedirs(workdir, exist_ok=True)
      if tensorboard:
        from tensorboardX import SummaryWriter  # imported lazily: optional heavy import
        self._writer = SummaryWriter(os.path.join(workdir, "tensorboard"))

  def write(self, stage: str, step: int, metrics: Mapping[str, object]) -> dict:
    """Logs ``metrics`` (scalars or arrays, averaged) for ``stage`` at ``step``.

    Returns:
      The record written, with host floats.
    """
    record = {"stage": stage, "step": int(step), "time": time.time()}
    record.update({k: to_float(v) for k, v in metrics.items()})
    if self.enabled:
      with open(self.path, "a") as f:
        f.write(json.dumps(record) + "\n")
      if self._writer is not None:
        for key, value in record.items():
          if key not in ("stage", "step", "time") and math.isfinite(value):
            self._writer.add_scalar(f"{stage}/{key}", value, int(step))
    return record

  def forget_after(self, stage: str, step: int) -> int:
    """Drops the records of ``stage`` past ``step`` (they are about to be redone).

    A stage resumed from its checkpoint at ``step`` (after a crash or a hard kill)
    recomputes the steps after it; this keeps one record per step in
    ``metrics.jsonl``. TensorBoard event files are append-only and keep both.

    A line that is not a JSON record (cut short by a kill or a full disk) is
    named and dropped too, so the next record never lands on its end.

    Returns:
      The number of records dropped.
    """
    if not self.enabled or not os.path.exists(self.path):
      return 0
    with open(self.path, errors="replace") as f:
      lines = [line for line in f if line.strip()]
    kept, damaged = [], []
    for number, line in enumerate(lines, start=1):
      try:
        record = json.loads(line)
        redone = record["stage"] == stage and record["step"] > step
      except (ValueError, KeyError, TypeError):
        damaged.append(number)
        continue
      if not redone:
        kept.append(line if line.endswith("\n") else line + "\n")
    if damaged:
      print(f"[{stage}] {self.path}: dropped {len(damaged)} damaged line(s) "
            f"(line {', '.join(map(str, damaged[:5]))}: a write cut short).", flush=True)
    if len(kept) != len(lines) or any(not line.endswith("\n") for line in lines):
      tmp = self.path + ".tmp"
      with open(tmp, "w") as f:
        f.writelines(kept)
      os.replace(tmp, self.path)
    return len(lines) - len(kept)

  def flush(self) -> None:
    if self._writer is not None:
      self._writer.flush()

  def close(self) -> None:
    if self._writer is not None:
      self._writer.close()
      self._writer = None


def read_metrics(workdir: str, stage: Optional[str] = None) -> list:
  """The records of ``metrics.jsonl`` (optionally of one stage)."""
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  with open(path) as f:
    records = [json.loads(line) for line in f if line.strip()]
  return [r for r in records if stage is None or r["stage"] == stage]


def _format_seconds(seconds: float) -> str:
  if not math.isfinite(seconds):
    return "?"
  seconds = int(round(seconds))
  return f"{seconds // 3600:d}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


class Progress:
  """A progress display for ``total`` steps with rate, images/s and ETA.

  Uses tqdm when stderr is a terminal, plain printed lines otherwise.

  Args:
    total: the number of steps of the stage.
    desc: a label, e.g. ``'bissl seed 0'``.
    initial: steps already done (after a resume).
    items_per_step: images per step, for the images/s figure.
    unit: the step's name ('step', 'alt', 'epoch').
    use_tqdm: force tqdm on/off (default: on a terminal only).
  """

  def __init__(self, total: int, desc: str, *, initial: int = 0, items_per_step: int = 0,
               unit: str = "step", use_tqdm: Optional[bool] = None):
    self.total, self.desc, self.unit = int(total), desc, unit
    self.count = self.start_count = int(initial)
    self.items_per_step = items_per_step
    self.enabled = parallel.is_writer()
    self._start = self._last_print = time.time()
    self._next_print = self.count + max(1, self.total // 10)
    self._first_done = None  # (count, time) after the first step: the compile step
    use_tqdm = sys.stderr.isatty() if use_tqdm is None else use_tqdm
    self._bar = None
    if self.enabled and use_tqdm:
      from tqdm.auto import tqdm
      self._bar = tqdm(total=self.total, initial=self.count, desc=desc, unit=unit,
                       dynamic_ncols=True, leave=True)
    elif self.enabled:
      # The session's first step compiles; the ETA is only shown once it is known.
      print(f"[{desc}] start: {self.count}/{self.total} {unit}s (compiling…)", flush=True)

  @property
  def rate(self) -> float:
    """Steps per second after the first step of this session (which includes compiling).

    Until a second step has finished, the rate of the first one is reported.
    """
    origin_count, origin_time = self.start_count, self._start
    if self._first_done is not None and self.count > self._first_done[0]:
      origin_count, origin_time = self._first_done
    elapsed = time.time() - origin_time
    return (self.count - origin_count) / elapsed if elapsed > 0 else 0.0

  def update(self, n: int = 1, **postfix) -> None:
    """Advances by ``n`` steps; ``postfix`` scalars are shown next to the bar."""
    self.count += n
    if self._first_done is None:
      self._first_done = (self.count, time.time())
    if not self.enabled:
      return
    shown = {k: f"{to_float(v):.4g}" for k, v in postfix.items()}
    if self.items_per_step:
      shown["img/s"] = f"{self.rate * self.items_per_step:.1f}"
    if self._bar is not None:
      self._bar.update(n)
      if shown:
        self._bar.set_postfix(shown, refresh=False)
      return
    now = time.time()
    if self.count >= self._next_print or self.count >= self.total or now - self._last_print > 30:
      self._next_print = self.count + max(1, self.total // 10)
      self._last_print = now
      rate = self.rate
      if self.count == self._first_done[0] and self.count < self.total:
        timing = f"first {self.unit} compiled in {_format_seconds(now - self._start)}"
      else:
        eta = (self.total - self.count) / rate if rate > 0 else float("inf")
        timing = f"{rate:.2f} {self.unit}/s | ETA {_format_seconds(eta)}"
      extras = " | ".join(f"{k} {v}" for k, v in shown.items())
      print(f"[{self.desc}] {self.count}/{self.total} {self.unit}s "
            f"({100.0 * self.count / max(self.total, 1):.0f}%) | {timing}"
            + (f" | {extras}" if extras else ""), flush=True)

  def close(self, completed: bool = True) -> None:
    """Ends the display; the ``done`` line only when ``completed`` (not on a stop)."""
    if self._bar is not None:
      self._bar.close()
      self._bar = None
    elif self.enabled and completed:
      print(f"[{self.desc}] done: {self.count}/{self.total} {self.unit}s in "
            f"{_format_seconds(time.time() - self._start)}", flush=True)
    self.enabled = False  # closing twice prints nothing more

  def __enter__(self):
    return self

  def __exit__(self, exc_type, *exc):
    self.close(completed=exc_type is None)
