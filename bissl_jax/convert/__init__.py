"""Pretrained weights: PyTorch checkpoints in and out, and converted directories.

A *converted directory* (written by ``python -m bissl_jax.convert --from-torch``)::

  DIR/variables/       orbax StandardCheckpointer tree {'params', 'batch_stats'}
  DIR/conversion.json  arch, cifar_stem, width_multiplier, head widths, provenance

:func:`load_pretrained` reads such a directory, a pipeline stage output or ``.pth``
files; :func:`load_pretext_model` (the pipeline's ``pretext.checkpoint`` field) adds
freshly initialised pretext heads where the weights lack them. torch is needed only
for ``.pth`` files.

Modules: :mod:`.torch` (ResNet state-dict layout), :mod:`.stage_output` (the
pipeline's stage-output format), :mod:`.pretext_weights` (weights for the pretext
stage). This package imports nothing of ``bissl_jax.pipeline``.
"""
import datetime
import hashlib
import json
import os
from typing import Any, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from bissl_jax.convert import stage_output
from bissl_jax.convert.pretext_weights import load_pretext_model  # noqa: F401
from bissl_jax.convert.torch import (  # noqa: F401  (re-exported API)
    checked_layout, expected_layout, flax_to_numpy, flax_to_torch, guess_arch,
    load_state_dict, save_torch, strip_prefix, torch_to_flax)
from bissl_jax.types import PyTree

METADATA_FILE = "conversion.json"
VARIABLES_DIR = "variables"
FORMAT = "bissl_jax.convert/1"


def _head_widths(params: PyTree, name: str) -> Optional[str]:
  """'256-256-256' from a converted tree's Dense kernels, or None without that head."""
  head = params.get("pretext_head", {}).get(name)
  if head is None:
    return None
  widths = [np.shape(head[m]["kernel"])[-1] for m in
            sorted((m for m in head if m.startswith("dense_")),
                   key=lambda m: int(m.split("_")[-1]))]
  return "-".join(map(str, widths))


def _sha256(path: str) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      digest.update(chunk)
  return digest.hexdigest()


def file_provenance(paths: Sequence[str]) -> list:
  """[{'path', 'sha256', 'bytes'}] for the source files of a conversion."""
  return [{"path": os.path.abspath(p), "sha256": _sha256(p),
           "bytes": os.path.getsize(p)} for p in paths]


def save_converted(directory: Union[str, os.PathLike], params: PyTree,
                   batch_stats: PyTree, *, arch: str, cifar_stem: bool = False,
                   width_multiplier: float = 1.0,
                   provenance: Optional[Mapping[str, Any]] = None,
                   overwrite: bool = False) -> str:
  """Writes variables (orbax) and a metadata JSON to ``directory``.

  Args:
    directory: created if needed; an existing conversion there needs ``overwrite``.
    params, batch_stats: e.g. from :func:`torch_to_flax`.
    arch, cifar_stem, width_multiplier: the backbone they belong to.
    provenance: extra JSON-serialisable facts (source files, prefix, ...).
    overwrite: replace an existing conversion.

  Returns:
    The absolute directory path.
  """
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  directory = os.path.abspath(os.fspath(directory))
  target = os.path.join(directory, VARIABLES_DIR)
  if os.path.exists(target) and not overwrite:
    raise FileExistsError(f"{target} exists; pass overwrite=True (--overwrite) to "
                          "replace it")
  os.makedirs(directory, exist_ok=True)
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(target, {"params": params, "batch_stats": batch_stats},
                      force=overwrite)
  metadata = {
      "format": FORMAT, "arch": arch, "cifar_stem": bool(cifar_stem),
      "width_multiplier": float(width_multiplier),
      "projector": _head_widths(params, "projector"),
      "predictor": _head_widths(params, "predictor"),
      "created": datetime.datetime.now(datetime.timezone.utc).isoformat(
          timespec="seconds"),
      "provenance": dict(provenance or {}),
  }
  with open(os.path.join(directory, METADATA_FILE), "w") as f:
    json.dump(metadata, f, indent=2, sort_keys=True)
  return directory


def is_converted_dir(path: Union[str, os.PathLike]) -> bool:
  """True if ``path`` was written by :func:`save_converted`."""
  return os.path.isfile(os.path.join(os.fspath(path), METADATA_FILE))


def load_variables(directory: Union[str, os.PathLike], *, arch: Optional[str] = None,
                   cifar_stem: Optional[bool] = None,
                   width_multiplier: Optional[float] = None
                   ) -> Tuple[PyTree, PyTree, dict]:
  """Reads a converted directory or a pipeline stage output, checking its metadata.

  Args:
    directory: written by :func:`save_converted`, or a stage output of
      ``bissl_jax.pipeline`` (e.g. BiSSL's ``output`` directory).
    arch, cifar_stem, width_multiplier: expected backbone options; None (or absent
      from the metadata) skips a check. Shapes are checked later, on conversion.

  Returns:
    ``(params, batch_stats, metadata)`` with numpy leaves.
  """
  directory = os.path.abspath(os.fspath(directory))
  if is_converted_dir(directory):
    import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
    with open(os.path.join(directory, METADATA_FILE)) as f:
      metadata = json.load(f)
    with ocp.StandardCheckpointer() as checkpointer:
      tree = checkpointer.restore(os.path.join(directory, VARIABLES_DIR))
  elif stage_output.is_export(directory):
    tree, metadata = stage_output.load_export(directory)
  else:
    raise FileNotFoundError(
        f"{directory} is neither a converted directory (no {METADATA_FILE}) nor a "
        "bissl_jax stage output; create one with python -m bissl_jax.convert "
        "--from-torch ckpt.pth --arch ARCH --out DIR")
  for name, wanted in (("arch", arch), ("cifar_stem", cifar_stem),
                       ("width_multiplier", width_multiplier)):
    if wanted is not None and metadata.get(name, wanted) != wanted:
      raise ValueError(f"{directory} holds {name}={metadata.get(name)!r} but "
                       f"{name}={wanted!r} was asked for; convert again or change "
                       "the model config")
  return tree["params"], tree.get("batch_stats", {}), metadata


def _split_sources(path) -> list:
  if isinstance(path, (str, os.PathLike)):
    return [p.strip() for p in os.fspath(path).split(",") if p.strip()]
  return [os.fspath(p) for p in path]


def load_pretrained(path: Union[str, os.PathLike, Sequence[Union[str, os.PathLike]]],
                    *, arch: str, cifar_stem: bool = False,
                    width_multiplier: float = 1.0, prefix: Optional[str] = None,
                    projector=None, predictor=None) -> Tuple[PyTree, PyTree]:
  """Pretrained ``(params, batch_stats)`` from a converted directory or ``.pth`` files.

  Args:
    path: a converted directory (or a pipeline stage output); a ``.pth`` file; or
      several ``.pth`` files (a list or one comma-separated string, e.g. the
      reference's backbone and head files).
    arch, cifar_stem, width_multiplier: the model the weights must fit.
    prefix: for ``.pth`` files, see :func:`strip_prefix`.
    projector, predictor: widths ('256-256-256') that heads in the weights must have,
      or None to accept whatever they carry; heads they lack are left out.

  Returns:
    ``(params, batch_stats)`` as from :func:`torch_to_flax`; both pass the same
    validation whichever form ``path`` has.
  """
  sources = _split_sources(path)
  if len(sources) == 1 and os.path.isdir(sources[0]):
    params, batch_stats, _ = load_variables(sources[0], arch=arch)
    # Through the PyTorch layout, so a directory gets exactly the .pth checks.
    state_dict = flax_to_numpy(params, batch_stats, arch=arch)
    return torch_to_flax(state_dict, arch=arch, cifar_stem=cifar_stem,
                         width_multiplier=width_multiplier, prefix="",
                         projector=projector, predictor=predictor)
  return torch_to_flax(sources, arch=arch, cifar_stem=cifar_stem,
                       width_multiplier=width_multiplier, prefix=prefix,
                       projector=projector, predictor=predictor)
