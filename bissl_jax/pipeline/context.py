"""What every pipeline stage shares: config, model, pretext task, mesh, logger.

A :class:`StageContext` is built once per :func:`bissl_jax.pipeline.run` call. The
stages' jitted step functions live in a process-wide cache keyed by everything
they close over (model, task, image size, mesh, hyperparameters), so every seed,
pipeline and search trial, and later runs in the same process, reuse the same
compiled executables.
"""
import dataclasses
import os
from typing import Any, Callable, Dict

import jax
import numpy as np

from bissl_jax import parallel
from bissl_jax.pipeline import logging as plog


_FUNCTION_CACHE: Dict[Any, Any] = {}


@dataclasses.dataclass
class StageContext:
  """Shared, read-only state of one pipeline run.

  Attributes:
    config: the validated pipeline config.
    workdir: the run directory.
    model: the :class:`bissl_jax.models.BisslModel`.
    task: the pretext task.
    mesh: the 1-D device mesh the batches are split over.
    logger: the metric logger.
    image_size: input side in pixels.
    multilabel: the downstream task is multi-label (mAP, sigmoid loss).
    num_classes: downstream classes.
  """
  config: Any
  workdir: str
  model: Any
  task: Any
  mesh: Any
  logger: plog.MetricLogger
  image_size: int
  multilabel: bool
  num_classes: int

  def cached(self, key, build: Callable[[], Any]):
    """A process-wide cached ``build()`` for ``key`` and this context's static parts.

    ``key`` must name every other value ``build`` closes over.
    """
    mesh_key = (tuple(d.id for d in self.mesh.devices.flat), self.mesh.axis_names)
    full_key = (key, self.model, self.task, self.image_size, self.multilabel, mesh_key)
    if full_key not in _FUNCTION_CACHE:
      _FUNCTION_CACHE[full_key] = build()
    return _FUNCTION_CACHE[full_key]

  def path(self, *parts: str) -> str:
    return os.path.join(self.workdir, *parts)

  def shard(self, tree, batch_axis: int = 0):
    """Places a host batch on the mesh, split along ``batch_axis``."""
    return parallel.shard_batch(tree, self.mesh, batch_axis)

  def replicate(self, tree):
    return parallel.replicate(tree, self.mesh)


def check_size(num_examples: int, batch_size: int, field: str, what: str) -> int:
  """Steps per epoch (remainder dropped); raises if the set is smaller than a batch."""
  if num_examples < batch_size:
    raise ValueError(
        f"config.{field}={batch_size} exceeds the {num_examples} images of {what}: "
        f"set config.{field} to at most {num_examples}.")
  return num_examples // batch_size


def nonfinite(value) -> bool:
  """True if any entry of a host/device array is NaN or infinite."""
  return not bool(np.all(np.isfinite(np.asarray(jax.device_get(value)))))


def new_stack(num_examples: int, batch_size: int, *, seed: int, state=None):
  """A :class:`bissl_jax.data.BatchStack`, optionally resumed from a JSON ``state``."""
  from bissl_jax.data import BatchStack, StackState
  if state is not None:
    state = StackState(int(state["epoch"]), int(state["cursor"]))
  return BatchStack(num_examples, batch_size, seed=seed, state=state)


def stack_to_json(stack) -> dict:
  """A stack's position as a JSON record ``{'epoch', 'cursor'}``."""
  return {"epoch": int(stack.state.epoch), "cursor": int(stack.state.cursor)}
