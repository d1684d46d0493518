"""Orbax checkpoints: resumable in-stage state, and the stage outputs.

Two kinds of directory:

* **Run checkpoints** (:class:`RunCheckpointer`): an orbax ``CheckpointManager``
  holding numbered steps of a stage's whole state (parameters, optimizer states,
  counters) plus a JSON ``extra`` record (data-stack positions, histories). The
  stage loop (:mod:`bissl_jax.pipeline.stage_loop`) resumes from the latest one.
* **Stage outputs** (:func:`export`, :func:`load_export`, :func:`is_export`): one
  directory per finished stage with the model variables and a JSON ``meta`` record.
  The format lives in :mod:`bissl_jax.convert.stage_output` (below the pipeline, so
  the converter reads it without importing the pipeline); it is named here too
  because it is the pipeline's output.

Both are atomic: orbax writes into a temporary directory and renames it when the
write is complete, so an interrupted save never leaves a checkpoint that looks
finished. Saves are synchronous, so a checkpoint exists on disk before training
continues. Run checkpoints are restored into the current topology through their
template.

**Integrity.** Each saved step records a SHA-256 checksum of its state's bytes
(``checksum``) and one of the whole step (``record_checksum``: that checksum, the
``extra`` record - step counter, data-stack cursors, config fingerprint - and the
data iterators' states) in its ``extra`` record, written in the same atomic save.
:meth:`RunCheckpointer.restore_good` verifies both (a step written before
``record_checksum`` existed is checked on its state alone); a step whose checksum differs, that cannot be read
(truncated data, a missing ``_METADATA``, garbage JSON) or that fails the caller's
check (non-finite parameters) is named, moved aside to ``<directory>.corrupt/`` and
the previous step is tried; at least two steps are kept, so one bad write never
loses the run.
"""
import hashlib
import json
import os
import shutil
import time
from typing import Callable, Optional, Tuple

import jax
import orbax.checkpoint as ocp

from bissl_jax.convert.stage_output import (  # noqa: F401  (the pipeline's output format)
    EXPORT_FORMAT, abstract, decode, encode, export, is_export, load_export, tree_checksum)
from bissl_jax.runtime import mesh as parallel
from bissl_jax.types import PyTree

# The checkpoint item holding data-iterator states (Grain's, JSON), kept apart from
# ``extra`` so a loader's state format never mixes with the stage's own record.
ITERATORS = "iterators"


# The record's own checksums: never part of what they cover.
_CHECKSUM_KEYS = ("checksum", "record_checksum")


def record_checksum(state_checksum: Optional[str], extra: dict, iterators: dict) -> str:
  """SHA-256 of a step's state checksum, ``extra`` (less its checksums) and iterators.

  Computed on the JSON text (sorted keys), so a record and its read-back copy hash
  alike.
  """
  body = {"state": state_checksum,
          "extra": {k: v for k, v in extra.items() if k not in _CHECKSUM_KEYS},
          "iterators": iterators or {}}
  text = json.dumps(json.loads(json.dumps(body, sort_keys=True)), sort_keys=True)
  return hashlib.sha256(text.encode()).hexdigest()


class CorruptCheckpointError(ValueError):
  """A saved step does not read back as it was written."""


def _restore_target(template: PyTree) -> PyTree:
  """The restore target: ``template``'s shapes and dtypes; across processes, every
  array replicated over the whole mesh.

  A template built in one process sits on a local device; restored there, its arrays
  would be committed to it, and JAX cannot move a committed array to the other
  processes' devices on CPU and GPU ("does not support cross-host device transfers").
  The stages' states are replicated, so that is where they are restored.
  """
  target = abstract(template)
  if jax.process_count() == 1:
    return target
  everywhere = parallel.replicated(parallel.make_mesh())

  def leaf(s):
    sharding = getattr(s, "sharding", None)
    if sharding is not None and sharding.is_fully_addressable:
      return jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=everywhere)
    return s
  return jax.tree_util.tree_map(leaf, target)


class RunCheckpointer:
  """Numbered, resumable checkpoints of one stage (wraps ``ocp.CheckpointManager``).

  Args:
    directory: where the steps live; created if missing.
    max_to_keep: how many recent steps to keep.
  """

  def __init__(self, directory: str, *, max_to_keep: int = 2):
    self.directory = os.path.abspath(directory)
    self._max_to_keep = max(2, int(max_to_keep))  # one bad step never loses the run
    self._iterators = None  # (step, iterator states) of the last restore
    self._open()

  def _open(self) -> None:
    options = ocp.CheckpointManagerOptions(
        max_to_keep=self._max_to_keep, create=True, enable_async_checkpointing=False,
        cleanup_tmp_directories=True)
    self._manager = ocp.CheckpointManager(self.directory, options=options,
                                          item_names=("state", "extra", ITERATORS))

  def latest_step(self) -> Optional[int]:
    """The newest complete step, or None."""
    return self._manager.latest_step()

  def all_steps(self):
    return list(self._manager.all_steps())

  def save(self, step: int, state: PyTree, extra: Optional[dict] = None,
           iterators: Optional[dict] = None) -> None:
    """Saves ``state`` (any pytree of arrays), a JSON ``extra`` and the data
    ``iterators``' states (JSON, see :meth:`restore_iterators`) as ``step``.

    The state's checksum (:func:`tree_checksum`) and the whole step's
    (:func:`record_checksum`) are stored with ``extra`` and checked (and removed
    from it) on restore.
    """
    self._iterators = None  # a step number may be written again
    checksum = tree_checksum(state)
    extra = dict(extra or {}, checksum=checksum)
    if checksum is not None:
      extra["record_checksum"] = record_checksum(checksum, extra, iterators or {})
    self._manager.save(int(step), args=ocp.args.Composite(**{
        "state": ocp.args.StandardSave(encode(state)),
        "extra": ocp.args.JsonSave(extra),
        ITERATORS: ocp.args.JsonSave(iterators or {})}), force=True)
    self._manager.wait_until_finished()

  def restore(self, template: PyTree, step: Optional[int] = None) -> Tuple[PyTree, dict]:
    """Restores ``step`` (default: latest) into the structure of ``template``.

    Args:
      template: a pytree with the saved structure (e.g. a freshly initialised state);
        its arrays' shapes, dtypes and shardings are used, not their values.
      step: the step to restore.

    Returns:
      ``(state, extra)``.

    Raises:
      FileNotFoundError: there is no step.
      CorruptCheckpointError: the step's checksum does not match its bytes.
    """
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"No checkpoint in {self.directory}.")
    items = dict(state=ocp.args.StandardRestore(_restore_target(template)),
                 extra=ocp.args.JsonRestore())
    if self._has_iterators(step):  # read in the same call: one restore per step
      items[ITERATORS] = ocp.args.JsonRestore()
    restored = self._manager.restore(step, args=ocp.args.Composite(**items))
    state, extra = decode(restored["state"], template), dict(restored["extra"] or {})
    iterators = dict(restored[ITERATORS] or {}) if ITERATORS in items else {}
    self._iterators = (step, iterators)  # what restore_iterators(step) hands out
    whole = extra.pop("record_checksum", None)
    saved = extra.pop("checksum", None)
    if saved is not None and saved != tree_checksum(state):
      raise CorruptCheckpointError("its checksum does not match the bytes read back")
    if whole is not None and whole != record_checksum(saved, extra, iterators):
      raise CorruptCheckpointError(
          "its record (step counter, data positions, iterator states) does not match "
          "its checksum")
    return state, extra

  def restore_good(self, template: PyTree, *, check: Optional[Callable[[PyTree], None]] = None,
                   name: str = "checkpoint") -> Optional[Tuple[int, PyTree, dict]]:
    """The newest step that reads back intact (and passes ``check``), else None.

    A bad step (unreadable, checksum mismatch, or ``check(state)`` raising) is
    named on stdout and moved to ``<directory>.corrupt/<step>-<time>``, and the
    previous step is tried.

    Args:
      template: as for :meth:`restore`.
      check: ``check(state)`` raises if the restored state must not be resumed
        (e.g. non-finite parameters).
      name: label of the messages.

    Returns:
      ``(step, state, extra)`` or None if no step is good.
    """
    for step in sorted(self.all_steps(), reverse=True):
      try:
        state, extra = self.restore(template, step)
        if check is not None:
          check(state)
        return step, state, extra
      except Exception as err:  # pylint: disable=broad-except  (any unreadable step)
        first = (str(err).splitlines() or [""])[0]
        reason = f"{type(err).__name__}: {first[:160]}{'…' if len(first) > 160 else ''}"
        moved = self._quarantine(step)
        older = [s for s in self.all_steps() if s < step]
        print(f"[{name}] checkpoint step {step} in {self.directory} is unusable ({reason}); "
              f"moved it to {moved}; "
              + (f"falling back to step {max(older)}." if older else
                 "no earlier step is left, so the stage starts afresh."), flush=True)
    return None

  def _quarantine(self, step: int) -> str:
    """Moves a bad step out of the manager's sight; returns where it went."""
    target = os.path.join(self.directory + ".corrupt", f"{step}-{int(time.time() * 1000)}")
    # Several processes read the same step: all have failed on it before process 0 moves it.
    parallel.sync_processes(f"quarantine {self.directory} {step}: looked")
    if parallel.is_writer():
      os.makedirs(os.path.dirname(target), exist_ok=True)
      shutil.move(os.path.join(self.directory, str(step)), target)
    parallel.sync_processes(f"quarantine {self.directory} {step}: moved")
    self.close()
    self._open()  # the manager caches its list of steps
    return target

  def restore_iterators(self, step: Optional[int] = None) -> dict:
    """The data-iterator states saved with ``step`` (default: latest); ``{}`` if none."""
    step = self.latest_step() if step is None else step
    if step is None or not self._has_iterators(step):
      return {}  # none saved (or a checkpoint from before iterator states were kept)
    if self._iterators is not None and self._iterators[0] == step:
      return dict(self._iterators[1])  # read (and checked) by restore
    restored = self._manager.restore(step, args=ocp.args.Composite(**{
        ITERATORS: ocp.args.JsonRestore()}))
    return dict(restored[ITERATORS] or {})

  def _has_iterators(self, step: int) -> bool:
    return os.path.isdir(os.path.join(self.directory, str(step), ITERATORS))

  def close(self) -> None:
    # The manager cleans leftover temporary directories in a background thread
    # started when it opens, and its close() does not wait for it: a stage stopped
    # right at its start would exit under that thread (a traceback at shutdown).
    await_cleanup = getattr(self._manager, "_maybe_await_cleanup_tmp_directory", None)
    if await_cleanup is not None:
      await_cleanup()
    self._manager.close()
