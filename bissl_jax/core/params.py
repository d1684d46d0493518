"""The whole parameter tree of a run: the model's groups and the downstream task's head.

A model initialises the backbone θ and the pretext head φ_P
(:meth:`bissl_jax.core.protocols.Model.init`); the downstream task initialises the
head it applies, φ_D (:meth:`bissl_jax.core.protocols.DownstreamTask.init_head`),
from the key the model's schedule reserves for it (``model.head_rng``), so a task
with its own head (a detector, a segmentation decoder) needs no change to any model,
and the trees of the built-in tasks are the ones written before the tasks owned
their heads.
"""
from typing import Any, Tuple

import jax

from bissl_jax.types import PyTree


def head_rng(model: Any, rng: jax.Array) -> jax.Array:
  """The downstream head's key: ``model.head_rng(rng)``, or a fold of ``rng`` for a
  model that does not reserve one."""
  fn = getattr(model, "head_rng", None)
  return fn(rng) if fn is not None else jax.random.fold_in(rng, 0x4EAD)


def init_params(model: Any, downstream: Any, rng: jax.Array, image_size: int
                ) -> Tuple[PyTree, PyTree]:
  """``(params, batch_stats)`` with all three groups: the model's backbone and pretext
  head, and ``downstream.init_head``'s head (``{}`` for a task without one)."""
  params, batch_stats = model.init(rng, image_size)
  init_head = getattr(downstream, "init_head", None)
  head = {} if init_head is None else init_head(head_rng(model, rng), params, batch_stats)
  return {**params, "downstream_head": head}, batch_stats
