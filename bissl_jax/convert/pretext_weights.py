"""Pretrained weights for the pretext stage: any supported file, completed to the model.

The pipeline's ``pretext.checkpoint`` field (skip pretext pretraining, start from
these weights) accepts a stage output of bissl_jax, a converted directory or PyTorch
``.pth`` files. Pretext heads the weights lack are taken from a fresh initialisation;
heads they carry must match the configured widths.
"""
import os
from typing import Any, Mapping, Optional, Tuple

import jax
import numpy as np

from bissl_jax.convert import stage_output
from bissl_jax.models.resnet import TAIL_KEY
from bissl_jax.types import PyTree


def _shapes(tree):
  return jax.tree_util.tree_map(np.shape, tree)


def _split_at_boundary(loaded: PyTree, fresh: PyTree) -> PyTree:
  """A whole ResNet's tree moved to a model whose backbone ends early.

  A converted or exported ResNet holds every stage under ``backbone``; a model built
  with ``model.backbone_ends_at`` before res5 keeps the later stages in
  ``pretext_head['backbone_tail']`` under the same names (as detectron2's C4 models load
  res5 from the pretrained ResNet). Those stages move there; anything else is unchanged.
  """
  tail = fresh.get("pretext_head", {}).get(TAIL_KEY)
  backbone = loaded.get("backbone", {})
  moved = sorted(set(tail or {}) & set(backbone))
  if not moved or TAIL_KEY in loaded.get("pretext_head", {}):
    return loaded
  head = dict(loaded.get("pretext_head", {}))
  head[TAIL_KEY] = {name: backbone[name] for name in moved}
  kept = {name: leaf for name, leaf in backbone.items() if name not in moved}
  return dict(loaded, backbone=kept, pretext_head=head)


def load_pretext_model(path: str, *, arch: str, cifar_stem: bool, width_multiplier: float,
                       fresh_params: PyTree, fresh_stats: PyTree,
                       head_specs: Optional[Mapping[str, Any]] = None,
                       field: str = "pretext.checkpoint") -> Tuple[PyTree, PyTree]:
  """``(params, batch_stats)``, each ``{'backbone', 'pretext_head'}``, from ``path``.

  Args:
    path: a stage output (read directly) or anything
      :func:`bissl_jax.convert.load_pretrained` reads (converted directory, ``.pth``).
    arch, cifar_stem, width_multiplier: the backbone the weights must fit.
    fresh_params, fresh_stats: a fresh ``model.init``; supplies the pretext heads the
      weights lack and the shapes the heads they carry must have.
    head_specs: the configured head widths by name (``{'projector': '256-256-256'}``),
      quoted when a head does not match.
    field: the config field that named ``path``, for messages.

  Returns:
    ``(params, batch_stats)`` with the loaded backbone and pretext heads.

  Raises:
    ValueError: a loaded head does not match the configured one.
  """
  if stage_output.is_export(path):
    variables, _ = stage_output.load_export(path)
    params, stats = variables["params"], variables["batch_stats"]
  else:
    from bissl_jax import convert  # pylint: disable=g-import-not-at-top  (package of this module)
    params, stats = convert.load_pretrained(os.fspath(path), arch=arch, cifar_stem=cifar_stem,
                                            width_multiplier=width_multiplier)
  params, stats = _split_at_boundary(params, fresh_params), _split_at_boundary(stats, fresh_stats)
  fresh_heads = fresh_params["pretext_head"]
  loaded_heads = params.get("pretext_head", {})
  specs = dict(head_specs or {})
  for name, head in loaded_heads.items():
    if _shapes(head) != _shapes(fresh_heads.get(name)):
      raise ValueError(
          f"The {name} in {field}={path!r} does not match config.model.{name}="
          f"{specs.get(name)!r}; set that field to the checkpoint's layer widths.")
  missing = sorted(set(fresh_heads) - set(loaded_heads))
  if missing:
    print(f"{field} has no {', '.join(missing)}: initialising it afresh.", flush=True)
  head = dict(fresh_heads, **loaded_heads)
  head_stats = dict(fresh_stats["pretext_head"], **stats.get("pretext_head", {}))
  return ({"backbone": params["backbone"], "pretext_head": head},
          {"backbone": stats["backbone"], "pretext_head": head_stats})
