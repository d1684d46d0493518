"""The parameter partition of BiSSL: one tree, three top-level groups (SPEC §4).

``params = {'backbone': θ, 'pretext_head': φ_P, 'downstream_head': φ_D}``. Every leaf
belongs to exactly one group; :func:`check_coverage` fails loudly otherwise. Each
level's optimizer is built from this partition with :func:`partition_optimizer`, and
BiSSL's two backbones θ_P and θ_D are moved in and out of trees with
:func:`take_group`/:func:`put_group`.
"""
from typing import Any, Dict, Mapping

import jax
import optax

PyTree = Any

GROUPS = ("backbone", "pretext_head", "downstream_head")


def _check_top_level(tree: PyTree) -> None:
  if not isinstance(tree, Mapping):
    raise ValueError(f"Expected a dict with top-level groups {GROUPS}; got {type(tree).__name__}.")
  unknown = [k for k in tree if k not in GROUPS]
  if unknown:
    raise ValueError(f"Unknown top-level parameter group(s) {unknown}; every leaf must sit "
                     f"under one of {GROUPS}.")


def group_labels(params: PyTree) -> PyTree:
  """Same structure as ``params`` with each leaf replaced by its top-level group name."""
  _check_top_level(params)
  return {group: jax.tree_util.tree_map(lambda _, g=group: g, sub)
          for group, sub in params.items()}


def make_masks(params: PyTree) -> Dict[str, PyTree]:
  """One boolean tree per group in :data:`GROUPS`, True on that group's leaves."""
  labels = group_labels(params)
  return {group: jax.tree_util.tree_map(lambda label, g=group: label == g, labels)
          for group in GROUPS}


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


def partition_optimizer(transforms: Mapping[str, optax.GradientTransformation],
                        params: PyTree) -> optax.GradientTransformation:
  """One optimizer over the whole tree, one transform per group.

  Args:
    transforms: group name → transform. Groups present in ``params`` but absent here
      are frozen (``optax.set_to_zero()``: zero updates, no state).
    params: the tree the optimizer will update (checked for exact coverage once here).

  Returns:
    ``optax.partition`` of the transforms by top-level group.
  """
  unknown = [g for g in transforms if g not in GROUPS]
  if unknown:
    raise ValueError(f"Transforms for unknown group(s) {unknown}; valid groups are {GROUPS}.")
  check_coverage(params, make_masks(params))
  all_transforms = {g: transforms.get(g, optax.set_to_zero()) for g in GROUPS}
  # A callable so the optimizer works on any tree with the same top-level groups.
  return optax.partition(all_transforms, group_labels)


def take_group(tree: PyTree, group: str) -> PyTree:
  """The subtree of ``group``."""
  if group not in GROUPS:
    raise ValueError(f"Unknown group {group!r}; valid groups are {GROUPS}.")
  if group not in tree:
    raise ValueError(f"Group {group!r} is not in this tree (it has {list(tree)}).")
  return tree[group]


def put_group(tree: PyTree, group: str, subtree: PyTree) -> PyTree:
  """A new tree equal to ``tree`` with ``group`` replaced (or added); ``tree`` is untouched."""
  if group not in GROUPS:
    raise ValueError(f"Unknown group {group!r}; valid groups are {GROUPS}.")
  return {**tree, group: subtree}


def merge_groups(**groups: PyTree) -> PyTree:
  """``merge_groups(backbone=θ, downstream_head=φ_D)`` → ``{'backbone': θ, ...}``."""
  _check_top_level(groups)
  return {g: groups[g] for g in GROUPS if g in groups}
