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
"""
import os
from typing import Any, Optional, Tuple

import orbax.checkpoint as ocp

from bissl_jax.convert.stage_output import (  # noqa: F401  (the pipeline's output format)
    EXPORT_FORMAT, abstract, decode, encode, export, is_export, load_export)

PyTree = Any
# The checkpoint item holding data-iterator states (Grain's, JSON), kept apart from
# ``extra`` so a loader's state format never mixes with the stage's own record.
ITERATORS = "iterators"


class RunCheckpointer:
  """Numbered, resumable checkpoints of one stage (wraps ``ocp.CheckpointManager``).

  Args:
    directory: where the steps live; created if missing.
    max_to_keep: how many recent steps to keep.
  """

  def __init__(self, directory: str, *, max_to_keep: int = 2):
    self.directory = os.path.abspath(directory)
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep, create=True, enable_async_checkpointing=False,
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
    ``iterators``' states (JSON, see :meth:`restore_iterators`) as ``step``."""
    self._manager.save(int(step), args=ocp.args.Composite(**{
        "state": ocp.args.StandardSave(encode(state)),
        "extra": ocp.args.JsonSave(extra or {}),
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
    """
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"No checkpoint in {self.directory}.")
    restored = self._manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract(template)), extra=ocp.args.JsonRestore()))
    return decode(restored["state"], template), dict(restored["extra"] or {})

  def restore_iterators(self, step: Optional[int] = None) -> dict:
    """The data-iterator states saved with ``step`` (default: latest); ``{}`` if none."""
    step = self.latest_step() if step is None else step
    if step is None or not os.path.isdir(os.path.join(self.directory, str(step), ITERATORS)):
      return {}  # none saved (or a checkpoint from before iterator states were kept)
    restored = self._manager.restore(step, args=ocp.args.Composite(**{
        ITERATORS: ocp.args.JsonRestore()}))
    return dict(restored[ITERATORS] or {})

  def close(self) -> None:
    self._manager.close()
