"""M-FAC's block rules: which parameter leaves share one curvature block.

A rule maps a leaf's path (the tuple of its key names, e.g.
``('layer1_0', 'conv1', 'kernel')``) to a block id; leaves with the same id form one
block, None excludes a leaf. The named rules and what they mean are documented in
:mod:`bissl_jax.implicit.solvers.mfac` (``'per_leaf'``, ``'per_module'``,
``'per_layer'``, ``'global'``).
"""
import re
from typing import Callable, Hashable, List, Optional, Tuple, Union

import jax
import numpy as np

from bissl_jax.types import PyTree

BlockRule = Union[str, Callable[[Tuple[str, ...]], Optional[Hashable]]]

BLOCK_RULES = ("per_leaf", "per_module", "per_layer", "global")

# A path key naming one layer of a network (see mfac's module docstring).
LAYER_KEY = re.compile(r"^(layer\d+_\d+|blocks?_\d+|layers?_\d+|h_\d+)$")


def _key_name(entry) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(entry, attr):
      return str(getattr(entry, attr))
  return str(entry)


def leaf_paths(tree: PyTree) -> List[Tuple[str, ...]]:
  """The key names of every leaf of ``tree``, in ``tree_leaves`` order."""
  return [tuple(_key_name(e) for e in path)
          for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def per_layer_block(path: Tuple[str, ...]) -> Tuple[str, ...]:
  """The ``'per_layer'`` block of a leaf path (see the module docstring)."""
  for i, key in enumerate(path):
    if LAYER_KEY.match(key):
      return path[:i + 1]
  return path[:-1]


def rule_fn(blocks: BlockRule) -> Callable[[Tuple[str, ...]], Optional[Hashable]]:
  """The function ``path -> block id`` of a named rule (a callable is its own)."""
  if callable(blocks):
    return blocks
  if blocks == "per_leaf":
    return lambda path: path
  if blocks == "per_module":  # the leaves of one module: a LoRA adapter's A and B
    return lambda path: path[:-1]
  if blocks == "per_layer":
    return per_layer_block
  if blocks == "global":
    return lambda path: "global"
  raise ValueError(f"Unknown M-FAC block rule {blocks!r}; use one of {BLOCK_RULES} or a "
                   f"callable mapping a leaf path (tuple of key names) to a block id.")


def mask_leaves(mask: Optional[PyTree], treedef, n: int) -> List[bool]:
  """``mask`` as one Python bool per leaf of ``treedef`` (None: all ``n`` kept)."""
  if mask is None:
    return [True] * n
  try:
    leaves = treedef.flatten_up_to(mask)
  except (ValueError, TypeError) as e:
    raise ValueError(f"The M-FAC mask must have the structure of v; {e}") from e
  out = []
  for leaf in leaves:
    if isinstance(leaf, jax.core.Tracer):
      raise ValueError("The M-FAC mask must be concrete Python bools (it fixes the "
                       "blocks at trace time); pass it from outside jit, e.g. "
                       "model.trainable(params) evaluated eagerly.")
    out.append(bool(np.asarray(leaf)))
  return out


def block_assignment(tree: PyTree, blocks: BlockRule = "per_leaf",
                     mask: Optional[PyTree] = None) -> Tuple[List[Optional[int]], int]:
  """Block index of every leaf of ``tree`` (None: excluded) and the number of blocks.

  Blocks are numbered in order of first appearance among the leaves.
  """
  leaves, treedef = jax.tree_util.tree_flatten(tree)
  keep = mask_leaves(mask, treedef, len(leaves))
  rule = rule_fn(blocks)
  index = {}
  ids: List[Optional[int]] = []
  for path, kept in zip(leaf_paths(tree), keep):
    block = rule(path) if kept else None
    if block is not None and block not in index:
      index[block] = len(index)
    ids.append(None if block is None else index[block])
  return ids, len(index)
