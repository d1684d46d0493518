"""Splitting a parameter tree by a ``Model.trainable`` mask, for optimizers and solvers.

A frozen leaf (False in the mask) gets no optimizer state, no proximal term, no
implicit gradient and no M-FAC block. The cheapest way for the core to honour that
is to *split* the tree: the trainable leaves are the variables that optimizers,
solvers and M-FAC see, and the frozen ones are closed over as constants::

  train, frozen = partition(params, mask)
  loss_of_train = lambda t: pretext_loss(combine(t, frozen), ...)
  v, info = implicit_grad(loss_of_train, train, outer_grad_train, lam=..., ...)

Differentiating with respect to ``train`` alone also skips the weight gradients of
the frozen base network (the backward pass still runs through its activations),
which is most of a LoRA model's backward cost. Both halves keep the full tree
structure with ``None`` in place of the other half's leaves; ``None`` is an empty
subtree to ``jax.tree_util``, so tree maps, ``tree_math`` and the solvers act on the
present leaves only.
"""
from typing import Any, Tuple

import jax
import jax.numpy as jnp
import optax

PyTree = Any

_is_none = lambda x: x is None


def _check_mask(params: PyTree, mask: PyTree) -> None:
  if jax.tree_util.tree_structure(params) != jax.tree_util.tree_structure(mask):
    raise ValueError("The trainable mask must have the structure of the parameters; "
                     "build it with model.trainable(params) for these params.")


def partition(params: PyTree, mask: PyTree) -> Tuple[PyTree, PyTree]:
  """``(trainable, frozen)``: ``params`` with None in place of the other half's leaves."""
  _check_mask(params, mask)
  train = jax.tree_util.tree_map(lambda p, m: p if m else None, params, mask)
  frozen = jax.tree_util.tree_map(lambda p, m: None if m else p, params, mask)
  return train, frozen


def combine(trainable: PyTree, frozen: PyTree) -> PyTree:
  """Inverse of :func:`partition`: one full tree, taking each leaf from where it is."""
  return jax.tree_util.tree_map(lambda t, f: f if t is None else t, trainable, frozen,
                                is_leaf=_is_none)


def zeros_on_frozen(tree: PyTree, mask: PyTree) -> PyTree:
  """``tree`` with its frozen leaves set to zero (e.g. a full-tree implicit gradient)."""
  return jax.tree_util.tree_map(lambda x, m: x if m else jnp.zeros_like(x), tree, mask)


def fill_frozen(trainable: PyTree, like: PyTree) -> PyTree:
  """A full tree from a trainable half, with zeros (shaped as in ``like``) for frozen leaves."""
  return jax.tree_util.tree_map(lambda t, x: jnp.zeros_like(x) if t is None else t,
                                trainable, like, is_leaf=_is_none)


def masked_optimizer(tx: optax.GradientTransformation, mask: PyTree
                     ) -> optax.GradientTransformation:
  """``tx`` on the trainable leaves and ``optax.set_to_zero()`` on the frozen ones.

  ``optax.multi_transform`` gives ``tx`` a masked view of the parameters, so its
  state (momenta) exists for trainable leaves only; frozen leaves get zero updates
  and a ``MaskedNode`` in the state.
  """
  labels = jax.tree_util.tree_map(lambda m: "train" if m else "frozen", mask)
  return optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()}, labels)
