"""The parameter partition of BiSSL: one tree, named top-level groups (docs/architecture.md).

``params = {'backbone': θ, 'pretext_head': φ_P, 'downstream_head': φ_D}``, plus
``'lam_rho'`` (λ = softplus(ρ)) in the upper level when λ is learnable. Every leaf
belongs to exactly one group; :func:`check_coverage` fails loudly otherwise.

Which leaves *train* is data: a boolean ``trainable`` tree (from
:meth:`bissl_jax.core.protocols.Model.trainable`) marks frozen leaves, e.g. the base
weights under LoRA adapters. Each level's optimizer is built here from the group
labels (:func:`level_optimizer`, an ``optax.multi_transform``): frozen leaves get
``optax.set_to_zero()`` and no optimizer state. :func:`split`/:func:`merge` separate
the trainable leaves from the frozen ones, so gradients, the proximal term and the
implicit gradient are only ever formed over trainable leaves.
"""
from typing import Dict, Mapping, Optional, Tuple

import jax
import jax.numpy as jnp
import optax

from bissl_jax.types import PyTree


GROUPS = ("backbone", "pretext_head", "downstream_head", "lam_rho")
FROZEN = "frozen"


def _check_top_level(tree: PyTree) -> None:
  if not isinstance(tree, Mapping):
    raise ValueError(f"Expected a dict with top-level groups {GROUPS}; got {type(tree).__name__}.")
  unknown = [k for k in tree if k not in GROUPS]
  if unknown:
    raise ValueError(f"Unknown top-level parameter group(s) {unknown}; every leaf must sit "
                     f"under one of {GROUPS}.")


def all_trainable(params: PyTree) -> PyTree:
  """A ``trainable`` tree with every leaf True."""
  return jax.tree_util.tree_map(lambda _: True, params)


def group_labels(params: PyTree, trainable: Optional[PyTree] = None) -> PyTree:
  """Same structure as ``params``, each leaf replaced by its group name or ``'frozen'``."""
  _check_top_level(params)
  trainable = all_trainable(params) if trainable is None else trainable
  return {group: jax.tree_util.tree_map(lambda _, t, g=group: g if t else FROZEN,
                                        sub, trainable[group])
          for group, sub in params.items()}


def make_masks(params: PyTree) -> Dict[str, PyTree]:
  """One boolean tree per group present in ``params``, True on that group's leaves."""
  labels = group_labels(params)
  return {group: jax.tree_util.tree_map(lambda label, g=group: label == g, labels)
          for group in params}


def _is_prefix(prefix, path) -> bool:
  return len(prefix) <= len(path) and tuple(path[:len(prefix)]) == tuple(prefix)


def check_coverage(params: PyTree, masks: Mapping[str, PyTree]) -> None:
  """Raises ValueError unless every leaf of ``params`` is True in exactly one mask.

  A mask may be a full boolean tree or a prefix of ``params`` (a bool on a subtree
  covers all of its leaves); paths a mask lacks count as not covered.

  Args:
    params: the parameter tree.
    masks: group name → boolean tree.

  Raises:
    ValueError: listing ``jax.tree_util.keystr`` of each leaf covered by zero or by
      more than one group.
  """
  leaves = jax.tree_util.tree_flatten_with_path(params)[0]
  counts = [0] * len(leaves)
  owners = [[] for _ in leaves]
  for group, mask in masks.items():
    for mask_path, covered in jax.tree_util.tree_flatten_with_path(mask)[0]:
      if not bool(covered):
        continue
      for i, (path, _) in enumerate(leaves):
        if _is_prefix(mask_path, path):
          counts[i] += 1
          owners[i].append(group)
  missing = [jax.tree_util.keystr(p) for (p, _), c in zip(leaves, counts) if c == 0]
  doubled = [f"{jax.tree_util.keystr(p)} (in {o})"
             for (p, _), c, o in zip(leaves, counts, owners) if c > 1]
  problems = []
  if missing:
    problems.append(f"covered by no group: {missing}")
  if doubled:
    problems.append(f"covered by more than one group: {doubled}")
  if problems:
    raise ValueError("Parameter partition is not exact; every leaf must belong to exactly "
                     "one of " + str(GROUPS) + ". Leaves " + "; ".join(problems) + ".")


def level_optimizer(transforms: Mapping[str, optax.GradientTransformation], params: PyTree,
                    trainable: Optional[PyTree] = None) -> optax.GradientTransformation:
  """One optimizer over a level's tree: a transform per group, frozen leaves untouched.

  Args:
    transforms: group name → transform, for every group in ``params`` that has a
      trainable leaf. Frozen leaves (``trainable`` False) get
      ``optax.set_to_zero()``: zero updates and no state.
    params: the tree the optimizer will update; its groups are checked against
      ``transforms`` here, so a missing or misspelt group fails at build time.
    trainable: boolean tree shaped like ``params`` (default: all True).

  Returns:
    ``optax.multi_transform`` over the labels of :func:`group_labels`.
  """
  trainable = all_trainable(params) if trainable is None else trainable
  labels = group_labels(params, trainable)
  check_coverage(params, make_masks(params))
  used = set(jax.tree_util.tree_leaves(labels)) - {FROZEN}
  unknown = sorted(set(transforms) - set(GROUPS))
  if unknown:
    raise ValueError(f"Transforms for unknown group(s) {unknown}; valid groups are {GROUPS}.")
  lacking = sorted(used - set(transforms))
  if lacking:
    raise ValueError(f"No optimizer for the trainable group(s) {lacking}; pass a transform "
                     f"for each, or mark their leaves frozen.")
  # In GROUPS order, not the set's: the order of the groups' updates in the compiled
  # program must not depend on Python's string hashing, or every process lowers a
  # different program and a persistent compilation cache never hits.
  all_transforms = {g: transforms[g] for g in GROUPS if g in used}
  all_transforms[FROZEN] = optax.set_to_zero()
  # Labels are computed from the structure, so the optimizer works on any tree with
  # the same paths (e.g. traced parameters inside jit).
  return optax.multi_transform(all_transforms, lambda p: group_labels(p, trainable))


def split(tree: PyTree, trainable: PyTree) -> Tuple[PyTree, PyTree]:
  """``(trainable part, frozen part)``, each with None where the other has a leaf.

  Differentiate with respect to the first part and close over the second: no
  gradient is ever formed for a frozen leaf.
  """
  flat, treedef = jax.tree_util.tree_flatten(tree)
  if jax.tree_util.tree_structure(trainable) != treedef:
    raise ValueError("The trainable mask must have the structure of the parameters; "
                     "build it with model.trainable(params) for these params.")
  keep = jax.tree_util.tree_leaves(trainable)
  train = [x if k else None for x, k in zip(flat, keep)]
  frozen = [None if k else x for x, k in zip(flat, keep)]
  return treedef.unflatten(train), treedef.unflatten(frozen)


def merge(train: PyTree, frozen: PyTree) -> PyTree:
  """Inverse of :func:`split`."""
  is_none = lambda x: x is None
  a, treedef = jax.tree_util.tree_flatten(train, is_leaf=is_none)
  b = jax.tree_util.tree_leaves(frozen, is_leaf=is_none)
  return treedef.unflatten([x if y is None else y for x, y in zip(a, b)])


def zeros_for_frozen(train_grads: PyTree, frozen: PyTree) -> PyTree:
  """A full gradient tree: ``train_grads`` on trainable leaves, zeros on frozen ones."""
  return merge(train_grads, jax.tree_util.tree_map(jnp.zeros_like, frozen))


def fill_frozen(train: PyTree, like: PyTree) -> PyTree:
  """A full tree from a trainable part, with zeros shaped as in ``like`` where it has None."""
  return jax.tree_util.tree_map(lambda t, x: jnp.zeros_like(x) if t is None else t,
                                train, like, is_leaf=lambda x: x is None)


def zeros_on_frozen(tree: PyTree, trainable: PyTree) -> PyTree:
  """``tree`` with the leaves that ``trainable`` marks False set to zero."""
  return jax.tree_util.tree_map(lambda x, t: x if t else jnp.zeros_like(x), tree, trainable)
