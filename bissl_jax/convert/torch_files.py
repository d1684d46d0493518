"""Reading PyTorch state-dict files: the optional torch import, tensors as NumPy, checks.

torch is imported only here, and only where a ``.pth`` file or torch tensors are read or
written, so the library installs and runs without it. Every file is checked before
anything is built from it (a pickle that is not plain tensors, NaN or inf values), and
wrapper prefixes (DDP, ``torch.compile``) and a BYOL model's target copies are stripped.
"""
import collections
import os
import pickle
import re
from typing import Any, Mapping, Optional, Sequence, Tuple, Union

import jax
import numpy as np

StateDictSource = Union[Mapping[str, Any], str, os.PathLike]

# Copies of the online network that a whole BYOL model carries (its EMA target);
# BiSSL re-copies the target from the online network, so they are never needed.
_TARGET_PREFIXES = ("backbone_target.", "projector_target.")
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DDP / DataParallel, torch.compile


def import_torch():
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError(
        "Reading or writing PyTorch checkpoints needs torch, an optional extra: "
        "pip install -e '.[torch]' (or convert the checkpoint on a machine with "
        "torch: python -m bissl_jax.convert --from-torch ckpt.pth --out DIR)") from e
  return torch


def to_numpy(value, key: str) -> np.ndarray:
  if type(value).__module__.startswith("torch"):
    value = value.detach().cpu()
    if value.is_floating_point():
      value = value.float()  # numpy has no bfloat16; the Flax model is float32
    # Copy: .numpy() shares memory with the module, and jnp.asarray may alias it on
    # CPU, so later in-place updates in torch (running stats) would leak into Flax.
    return np.array(value.numpy(), copy=True)
  if isinstance(value, (np.ndarray, jax.Array, np.generic, int, float)):
    return np.array(value, copy=True)
  raise ValueError(f"{key}: expected a tensor or array, got {type(value).__name__}")


# torch.save writes a zip archive (since 1.6) or, in the legacy format, a pickle.
_ZIP_MAGIC, _PICKLE_PROTOCOL_OP = b"PK\x03\x04", 0x80


def _not_a_checkpoint(path: str, why: str) -> str:
  return (f"{path}: not a PyTorch checkpoint ({why}). Expected a file written by "
          "torch.save(model.state_dict(), path); it may be truncated or another format.")


def check_torch_file(path: str) -> None:
  """Raises ValueError unless ``path`` starts like a file of ``torch.save``."""
  with open(path, "rb") as f:
    head = f.read(4)
  if not head:
    raise ValueError(_not_a_checkpoint(path, "the file is empty"))
  if head != _ZIP_MAGIC and head[0] != _PICKLE_PROTOCOL_OP:
    raise ValueError(_not_a_checkpoint(path, f"it starts with {head!r}, neither a zip "
                                             "archive nor a pickle"))


def check_values(state_dict: Mapping[str, np.ndarray], keys: Sequence[str]) -> None:
  """Raises ValueError if a tensor of ``keys`` is not finite or a running variance is < 0.

  Converted weights are checked here so that NaN weights are blamed on the file,
  not on a learning rate of the run that reads them.
  """
  bad = [k for k in keys if np.issubdtype(np.asarray(state_dict[k]).dtype, np.floating)
         and not np.isfinite(state_dict[k]).all()]
  if bad:
    raise ValueError(f"the checkpoint holds NaN/Inf values in {first_keys(bad)}: it is "
                     "corrupt or was saved from a diverged run; re-export it.")
  negative = [k for k in keys if k.endswith("running_var") and (state_dict[k] < 0).any()]
  if negative:
    raise ValueError(f"the checkpoint has negative BatchNorm running variances in "
                     f"{first_keys(negative)}: a variance is never negative, so the file "
                     "is corrupt; re-export it.")


def _load_one(source) -> dict:
  if isinstance(source, Mapping):
    raw = source
  else:
    path = os.fspath(source)
    if not os.path.isfile(path):
      raise FileNotFoundError(f"no PyTorch checkpoint at {path!r}")
    check_torch_file(path)
    try:
      raw = import_torch().load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
      raise ValueError(
          f"{path}: torch.load(weights_only=True) refused it ({e}). Only plain state "
          "dicts are read, never arbitrary pickles; re-save the weights alone with "
          "torch.save(model.state_dict(), path)") from e
    except Exception as e:  # pylint: disable=broad-except  (EOFError, RuntimeError, ...)
      raise ValueError(_not_a_checkpoint(path, f"torch.load failed: {type(e).__name__}: "
                                               f"{str(e).splitlines()[0] if str(e) else ''}")
                       ) from e
    if not isinstance(raw, Mapping):
      raise ValueError(f"{path}: expected a state dict, got {type(raw).__name__}")
  # Training checkpoints often wrap the weights as {'state_dict': ..., 'epoch': ...}.
  if "state_dict" in raw and isinstance(raw["state_dict"], Mapping):
    raw = raw["state_dict"]
  return {str(k): to_numpy(v, str(k)) for k, v in raw.items()}


def load_state_dict(sources: Union[StateDictSource, Sequence[StateDictSource]]
                    ) -> "collections.OrderedDict[str, np.ndarray]":
  """Reads one or several state dicts into one dict of float32/int numpy arrays.

  Args:
    sources: a mapping of torch tensors or numpy arrays, a ``.pth`` path, or a list
      of these (e.g. the BiSSL reference's separate backbone and head files).

  Returns:
    The merged state dict, keys unchanged. A key present in two sources is an error.
  """
  if isinstance(sources, (Mapping, str, os.PathLike)):
    sources = [sources]
  merged = collections.OrderedDict()
  for source in sources:
    for key, value in _load_one(source).items():
      if key in merged:
        raise ValueError(f"{key} appears in more than one of the given checkpoints")
      merged[key] = value
  return merged


def strip_prefix(state_dict: Mapping[str, Any], prefix: Optional[str] = None
                 ) -> Tuple["collections.OrderedDict[str, Any]", list]:
  """Selects the backbone/head keys of a state dict and drops wrapper prefixes.

  Args:
    state_dict: keys as saved.
    prefix: ``None`` (auto): strip ``module.``/``_orig_mod.`` where every key has it,
      then ``backbone.`` and ``head.`` (a whole BiSSL-reference model), and drop a
      BYOL model's ``backbone_target.*``/``projector_target.*``. A string: keep only
      the keys under it, stripped, and ignore the rest. ``''``: keys as they are.

  Returns:
    ``(selected, ignored)``: the renamed state dict and the original keys dropped.
  """
  items = list(state_dict.items())
  ignored = []
  if prefix is None:
    for wrapper in _WRAPPER_PREFIXES:
      while items and all(k.startswith(wrapper) for k, _ in items):
        items = [(k[len(wrapper):], v) for k, v in items]
    kept = []
    for k, v in items:
      if k.startswith(_TARGET_PREFIXES):
        ignored.append(k)
      else:
        kept.append((re.sub(r"^(backbone|head)\.", "", k), v))
    items = kept
  elif prefix:
    kept = [(k[len(prefix):], v) for k, v in items if k.startswith(prefix)]
    if not kept:
      raise ValueError(f"no key starts with prefix={prefix!r}; the checkpoint's keys "
                       f"start like {first_keys(state_dict)}")
    ignored = [k for k, _ in items if not k.startswith(prefix)]
    items = kept
  selected = collections.OrderedDict()
  for k, v in items:
    if k in selected:
      raise ValueError(f"{k} appears twice after stripping prefixes; pass prefix= "
                       "explicitly to pick one part of the checkpoint")
    selected[k] = v
  return selected, ignored


def first_keys(keys, n=3) -> str:
  keys = list(keys)
  return ", ".join(keys[:n]) + (", ..." if len(keys) > n else "") if keys else "(none)"
