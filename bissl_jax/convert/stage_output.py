"""The stage-output format: a finished stage's model variables plus a JSON record.

One directory per finished stage (``<stage dir>/output``)::

  DIR/state/   orbax tree {'params', 'batch_stats'}
  DIR/meta/    JSON record: stage name, architecture, scores, ``format``

The pipeline writes these; later stages, single-stage runs, the converter
(``--to-torch``) and the visualisation read them. On one host they are stored as
host (NumPy) arrays, so they load on any device count. Writes are atomic: orbax
writes into a temporary directory and renames it when complete.

**Integrity.** :func:`export` records a SHA-256 checksum of the variables' bytes
(:func:`tree_checksum`) in ``meta``; :func:`load_export` verifies it and raises
:class:`CorruptOutputError` when what is read back differs (a flipped byte in
compressed data can decode silently into other values). Outputs written before the
checksum existed load unchecked.

Orbax's standard handler stores arrays only: typed PRNG keys are stored as their key
data and Python/NumPy scalars as 0-d arrays (:func:`encode`); a restore against a
template puts both back (:func:`decode`). The in-stage checkpoints of
``bissl_jax.pipeline.checkpoint`` use the same encoding.

This module sits below the pipeline: it imports nothing of it.
"""
import hashlib
import os
from typing import Optional, Tuple

import jax
import numpy as np
import orbax.checkpoint as ocp

from bissl_jax.types import PyTree

EXPORT_FORMAT = "bissl_jax.stage_output/1"


class CorruptOutputError(ValueError):
  """A stage output does not read back as it was written."""


def _whole_in_every_process(tree: PyTree) -> bool:
  """True if every process holds every value of ``tree`` (one process, or replicated)."""
  return jax.process_count() == 1 or all(
      not isinstance(x, jax.Array) or x.is_fully_addressable or x.is_fully_replicated
      for x in jax.tree_util.tree_leaves(tree))


def tree_checksum(tree: PyTree) -> Optional[str]:
  """SHA-256 over every leaf's path, dtype, shape and bytes.

  Typed PRNG keys are hashed as their key data (:func:`encode`), so a tree and its
  restored copy hash alike. With several processes a leaf spread over other hosts'
  devices cannot be read here: then None, unless every such leaf is replicated
  (each process holds a whole copy, as the stages' states are).
  """
  if not _whole_in_every_process(tree):
    return None
  digest = hashlib.sha256()
  leaves, _ = jax.tree_util.tree_flatten_with_path(jax.device_get(encode(tree)))
  for path, leaf in leaves:
    x = np.ascontiguousarray(np.asarray(leaf))
    digest.update(f"{jax.tree_util.keystr(path)}|{x.dtype.str}|{x.shape}|".encode())
    digest.update(x.tobytes())
  return digest.hexdigest()


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


def abstract(tree: PyTree) -> PyTree:
  """Shape/dtype (and sharding) structs of an encoded tree, the restore target."""
  def leaf(x):
    if isinstance(x, jax.Array):
      return ocp.utils.to_shape_dtype_struct(x)
    x = np.asarray(x)
    return jax.ShapeDtypeStruct(x.shape, x.dtype)
  return jax.tree_util.tree_map(leaf, encode(tree))


def export(directory: str, variables: PyTree, meta: dict) -> None:
  """Writes a finished stage's model variables and metadata (atomic; overwrites).

  Args:
    directory: the output directory.
    variables: ``{'params': ..., 'batch_stats': ...}`` (any pytree of arrays).
    meta: JSON-serialisable description (stage, arch, metrics, ...).
  """
  meta = dict(meta, format=EXPORT_FORMAT)
  variables = encode(variables)
  if _whole_in_every_process(variables):
    # Host arrays carry no sharding, so the export loads on any number of devices and
    # processes. Across processes every one holds the same values, and orbax writes
    # host arrays from process 0 alone.
    variables = jax.device_get(variables)
    meta["checksum"] = tree_checksum(variables)
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

  Raises:
    CorruptOutputError: the variables' checksum differs from the recorded one.
    NonFiniteError: they hold NaN/Inf.
  """
  directory = os.path.abspath(directory)
  if not is_export(directory):
    raise FileNotFoundError(
        f"{directory} is not a stage output of bissl_jax (expected 'state' and 'meta' "
        f"sub-directories written by bissl_jax.pipeline.checkpoint.export).")
  checkpointer = ocp.Checkpointer(ocp.CompositeCheckpointHandler())
  target = ocp.args.StandardRestore(None if template is None else abstract(template))
  restored = checkpointer.restore(directory, args=ocp.args.Composite(
      state=target, meta=ocp.args.JsonRestore()))
  checkpointer.close()
  state, meta = restored["state"], dict(restored["meta"])
  saved = meta.get("checksum")
  if saved is not None and tree_checksum(state) not in (None, saved):
    raise CorruptOutputError(f"the stage output {directory} does not read back as it was "
                             f"written (its checksum differs): it is damaged.")
  check_finite(state, f"the stage output {directory}")
  if template is not None:
    state = decode(state, template)
  return state, meta


def load_export_meta(directory: str) -> Tuple[None, dict]:
  """``(None, meta)`` of a stage output, without reading its arrays."""
  directory = os.path.abspath(directory)
  if not is_export(directory):
    raise FileNotFoundError(f"{directory} is not a stage output of bissl_jax.")
  checkpointer = ocp.Checkpointer(ocp.CompositeCheckpointHandler())
  restored = checkpointer.restore(directory, args=ocp.args.Composite(
      meta=ocp.args.JsonRestore()))
  checkpointer.close()
  return None, dict(restored["meta"])


def nonfinite_leaves(tree: PyTree, limit: int = 5) -> list:
  """Paths (``jax.tree_util.keystr``) of up to ``limit`` leaves holding NaN or Inf."""
  bad = []
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    x = np.asarray(leaf)
    if np.issubdtype(x.dtype, np.inexact) and not np.isfinite(x).all():
      bad.append(jax.tree_util.keystr(path))
      if len(bad) >= limit:
        break
  return bad


def check_finite(tree: PyTree, what: str) -> None:
  """Raises NonFiniteError naming ``what`` and its first non-finite leaves, if any.

  Loaded weights are checked at load time, so NaN weights are blamed on the file,
  not on the learning rate of the stage that would read them.
  """
  from bissl_jax.runtime.errors import NonFiniteError  # pylint: disable=g-import-not-at-top
  bad = nonfinite_leaves(jax.device_get(tree))
  if bad:
    raise NonFiniteError(
        f"{what} holds NaN/Inf weights (e.g. {', '.join(bad)}): the checkpoint is corrupt "
        f"or was saved from a diverged run; no learning rate of this run is to blame. "
        f"Re-create or re-convert it, or point the config at another checkpoint.")
