"""Orbax checkpoints: resumable in-stage state and exported stage outputs.

Two kinds of directory:

* **Run checkpoints** (:class:`RunCheckpointer`): an orbax ``CheckpointManager``
  holding numbered steps of a stage's whole state (parameters, optimizer states,
  counters) plus a JSON ``extra`` record (data-stack positions, histories). The
  pipeline resumes from the latest one.
* **Stage outputs** (:func:`export`, :func:`load_export`): one directory per finished
  stage with the model variables (``{'params', 'batch_stats'}``) and a JSON ``meta``
  record (stage name, architecture, metrics). A later stage, a single-stage run or
  another user loads them. On one host they are stored as host (NumPy) arrays, so
  they load on any device count; run checkpoints are restored into the current
  topology through their template.

Both are atomic: orbax writes into a temporary directory and renames it when the
write is complete, so an interrupted save never leaves a checkpoint that looks
finished. Saves are synchronous, so a checkpoint exists on disk before training
continues.

Orbax's standard handler stores arrays only: typed PRNG keys are stored as their
key data and Python/NumPy scalars as 0-d arrays; a restore against a template puts
both back.
"""
import os
from typing import Any, Optional, Tuple

import jax
import numpy as np
import orbax.checkpoint as ocp

PyTree = Any
EXPORT_FORMAT = "bissl_jax.stage_output/1"


def _is_key(x) -> bool:
  return isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def encode(tree: PyTree) -> PyTree:
  """Makes ``tree`` storable: PRNG keys → key data, scalars → 0-d NumPy arrays."""
  def leaf(x):
    if _is_key(x):
      return jax.random.key_data(x)
    if isinstance(x, (bool, int, float, np.number, np.bool_)):
      return np.asarray(x)
    return x
  return jax.tree_util.tree_map(leaf, tree)


def decode(tree: PyTree, template: PyTree) -> PyTree:
  """Inverse of :func:`encode` given a template with the original leaf types."""
  def leaf(x, t):
    if _is_key(t):
      return jax.random.wrap_key_data(x, impl=jax.random.key_impl(t))
    if isinstance(t, (bool, int, float)):
      return type(t)(np.asarray(x).item())
    if isinstance(t, (np.number, np.bool_)):
      return np.asarray(x).astype(t.dtype)[()]
    return x
  return jax.tree_util.tree_map(leaf, tree, template)


def _abstract(tree: PyTree) -> PyTree:
  """Shape/dtype (and sharding) structs of an encoded tree, the restore target."""
  def leaf(x):
    if isinstance(x, jax.Array):
      return ocp.utils.to_shape_dtype_struct(x)
    x = np.asarray(x)
    return jax.ShapeDtypeStruct(x.shape, x.dtype)
  return jax.tree_util.tree_map(leaf, encode(tree))


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
                                          item_names=("state", "extra"))

  def latest_step(self) -> Optional[int]:
    """The newest complete step, or None."""
    return self._manager.latest_step()

  def all_steps(self):
    return list(self._manager.all_steps())

  def save(self, step: int, state: PyTree, extra: Optional[dict] = None) -> None:
    """Saves ``state`` (any pytree of arrays) and a JSON-serialisable ``extra`` as ``step``."""
    self._manager.save(int(step), args=ocp.args.Composite(
        state=ocp.args.StandardSave(encode(state)), extra=ocp.args.JsonSave(extra or {})),
        force=True)
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
        state=ocp.args.StandardRestore(_abstract(template)), extra=ocp.args.JsonRestore()))
    return decode(restored["state"], template), dict(restored["extra"] or {})

  def close(self) -> None:
    self._manager.close()


def export(directory: str, variables: PyTree, meta: dict) -> None:
  """Writes a finished stage's model variables and metadata (atomic; overwrites).

  Args:
    directory: the output directory.
    variables: ``{'params': ..., 'batch_stats': ...}`` (any pytree of arrays).
    meta: JSON-serialisable description (stage, arch, metrics, ...).
  """
  meta = dict(meta, format=EXPORT_FORMAT)
  variables = encode(variables)
  if jax.process_count() == 1:
    # Host arrays carry no sharding, so the export loads on any number of devices.
    variables = jax.device_get(variables)
  checkpointer = ocp.Checkpointer(ocp.CompositeCheckpointHandler())
  checkpointer.save(os.path.abspath(directory), args=ocp.args.Composite(
      state=ocp.args.StandardSave(variables), meta=ocp.args.JsonSave(meta)),
      force=True)
  checkpointer.close()


def is_export(directory: str) -> bool:
  """True if ``directory`` holds a complete stage output written by :func:`export`."""
  return (os.path.isdir(os.path.join(directory, "state"))
          and os.path.isdir(os.path.join(directory, "meta")))


def load_export(directory: str, template: Optional[PyTree] = None) -> Tuple[PyTree, dict]:
  """Loads a stage output.

  Args:
    directory: a directory written by :func:`export`.
    template: optional pytree giving the structure, dtypes and shardings; without it
      the variables come back as nested dicts of arrays.

  Returns:
    ``(variables, meta)``.
  """
  directory = os.path.abspath(directory)
  if not is_export(directory):
    raise FileNotFoundError(
        f"{directory} is not a stage output of bissl_jax (expected 'state' and 'meta' "
        f"sub-directories written by bissl_jax.pipeline.checkpoint.export).")
  checkpointer = ocp.Checkpointer(ocp.CompositeCheckpointHandler())
  target = ocp.args.StandardRestore(None if template is None else _abstract(template))
  restored = checkpointer.restore(directory, args=ocp.args.Composite(
      state=target, meta=ocp.args.JsonRestore()))
  checkpointer.close()
  state = restored["state"]
  if template is not None:
    state = decode(state, template)
  return state, dict(restored["meta"])
