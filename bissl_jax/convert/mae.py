"""Official MAE checkpoints (``mae_pretrain_vit_{base,large,huge}_full.pth``) <-> Flax.

Key layout of the PyTorch side (MAE's ``MaskedAutoencoderViT``, timm block names)::

  cls_token, pos_embed, patch_embed.proj.{weight,bias}, norm.{weight,bias}
  blocks.{i}.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}.{weight,bias}
  mask_token, decoder_pos_embed, decoder_embed.*, decoder_norm.*, decoder_pred.*
  decoder_blocks.{i}.*  (as blocks)

The Flax names (:mod:`bissl_jax.models.vit`, :mod:`bissl_jax.tasks.pretext.mae`) are the same with
``blocks_{i}`` for ``blocks.{i}`` and ``kernel``/``scale`` for ``weight``; Linear
``(out, in)`` ↔ Dense ``(in, out)``, the patch convolution OIHW ↔ HWIO. The encoder
goes to ``params['backbone']``, the decoder to ``params['pretext_head']['decoder']``.

A checkpoint is validated in full before anything is built: every unexpected key,
missing key and wrong shape is listed in one error together with the fix, and
non-finite weights are rejected. The model size (width, depth, patch, image size,
decoder) is read from the tensors themselves; ``arch`` only checks it. LoRA leaves
and the downstream head are not in a MAE checkpoint: :func:`merge_pretrained` puts
the converted weights into a freshly initialised :class:`~bissl_jax.models.vit_bundle.ViTModel`
tree and keeps those.

Reading goes through :mod:`bissl_jax.convert.torch` (``torch.load(weights_only=True)``,
``strip_prefix``); its loader unwraps ``{'state_dict': ...}`` but not MAE's
``{'model': ...}``, so that unwrapping is done here.
"""
import collections
import functools
import os
import re
from typing import Any, Mapping, Optional, Tuple, Union

import jax
import jax.numpy as jnp
import numpy as np

from bissl_jax.convert.torch import LayoutEntry
from bissl_jax.convert.torch_files import (check_torch_file, import_torch, load_state_dict,
                                           strip_prefix)
from bissl_jax.convert.torch import _to_flax_layout, _to_torch_layout
from bissl_jax.types import PyTree


OFFICIAL_FILES = {
    "mae_pretrain_vit_base_full.pth": "vit_base_patch16",
    "mae_pretrain_vit_large_full.pth": "vit_large_patch16",
    "mae_pretrain_vit_huge_full.pth": "vit_huge_patch14",
}
_LEAF_TO_TORCH = {"kernel": "weight", "scale": "weight", "bias": "bias"}
_INDEXED = re.compile(r"((?:decoder_)?blocks)_(\d+)")


# ------------------------------------------------------------------------- reading


def read_checkpoint(source: Union[Mapping[str, Any], str, os.PathLike]
                    ) -> "collections.OrderedDict[str, np.ndarray]":
  """A MAE state dict as numpy arrays, from a ``.pth`` file or a mapping.

  Unwraps ``{'model': ...}`` (the official files) and ``{'state_dict': ...}``, and
  strips ``module.``/``_orig_mod.`` wrapper prefixes.
  """
  if isinstance(source, Mapping):
    raw = source
  else:
    path = os.fspath(source)
    if not os.path.isfile(path):
      raise FileNotFoundError(f"no MAE checkpoint at {path!r}")
    check_torch_file(path)  # e.g. mae_pretrain_vit_base_full.pth of the official release
    torch = import_torch()
    try:
      raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pylint: disable=broad-except
      raise ValueError(
          f"{path}: torch.load(weights_only=True) refused it ({str(e)[:200]}). Only "
          "tensors are read, never arbitrary pickles; if you trust the file, re-save "
          "its weights alone: torch.save(torch.load(p, weights_only=False)['model'], "
          "out)") from e
  if not isinstance(raw, Mapping):
    raise ValueError(f"expected a state dict, got {type(raw).__name__}")
  if "model" in raw and isinstance(raw["model"], Mapping):
    raw = raw["model"]
  state_dict = load_state_dict(dict(raw))
  for wrapper in ("module.", "_orig_mod."):
    if state_dict and all(k.startswith(wrapper) for k in state_dict):
      state_dict, _ = strip_prefix(state_dict, wrapper)
  return state_dict


# -------------------------------------------------------------------------- layout


def torch_key(path) -> str:
  """PyTorch key of a Flax leaf path (group first), e.g.
  ``('backbone', 'blocks_3', 'attn', 'qkv', 'kernel')`` -> ``'blocks.3.attn.qkv.weight'``."""
  group, *rest = path
  if group == "pretext_head" and rest and rest[0] == "decoder":
    rest = rest[1:]
  elif group != "backbone":
    raise ValueError(f"{'/'.join(path)}: only 'backbone' and 'pretext_head/decoder' "
                     "have a MAE layout")
  *modules, leaf = rest
  if not modules:
    return leaf  # cls_token, pos_embed, mask_token, decoder_pos_embed
  names = [_INDEXED.sub(r"\1.\2", m) for m in modules]
  if leaf not in _LEAF_TO_TORCH:
    raise ValueError(f"{'/'.join(path)}: no MAE name for leaf {leaf!r} (LoRA leaves and "
                     "the downstream head are not part of a MAE checkpoint)")
  return ".".join(names + [_LEAF_TO_TORCH[leaf]])


def _model(arch, decoder_width, decoder_depth, decoder_heads):
  from bissl_jax.models.vit_bundle import build_vit_model  # pylint: disable=g-import-not-at-top
  return build_vit_model(arch, decoder="mae" if decoder_depth else None,
                         decoder_width=decoder_width, decoder_depth=decoder_depth or 1,
                         decoder_heads=decoder_heads)


@functools.lru_cache(maxsize=16)
def expected_layout(arch: str, *, image_size: int = 224, decoder_width: int = 512,
                    decoder_depth: int = 8, decoder_heads: int = 16
                    ) -> Tuple[LayoutEntry, ...]:
  """Keys and PyTorch shapes of a MAE model (``decoder_depth=0``: encoder only)."""
  model = _model(arch, decoder_width, decoder_depth, decoder_heads)
  params, _ = jax.eval_shape(lambda k: model.init(k, image_size), jax.random.key(0))
  params = {"backbone": params["backbone"], "pretext_head": params["pretext_head"]}
  entries = []
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    names = tuple(str(p.key) for p in path)
    shape = _to_torch_layout(np.empty(leaf.shape, np.bool_), names[-1]).shape
    entries.append(LayoutEntry(torch_key(names), "params", names, tuple(shape)))
  return tuple(entries)


def describe_checkpoint(state_dict: Mapping[str, Any]) -> dict:
  """Model size read off the tensors: arch, image_size and the decoder's size."""
  from bissl_jax.models.vit import SIZES  # pylint: disable=g-import-not-at-top
  shape = lambda k: tuple(np.shape(state_dict[k])) if k in state_dict else None
  proj, pos = shape("patch_embed.proj.weight"), shape("pos_embed")
  if proj is None or pos is None or len(proj) != 4 or len(pos) != 3:
    raise ValueError("not a MAE/ViT checkpoint: patch_embed.proj.weight or pos_embed is "
                     f"missing or malformed (keys start like {list(state_dict)[:3]})")
  width, patch = proj[0], proj[-1]
  count = lambda prefix: len({int(m.group(1)) for k in state_dict
                              for m in [re.match(prefix + r"\.(\d+)\.", k)] if m})
  depth = count("blocks")
  size = [name for name, (w, d, _) in SIZES.items() if (w, d) == (width, depth)]
  side = int(round(np.sqrt(pos[1] - 1)))
  dec = shape("decoder_embed.weight")
  return {"arch": f"vit_{size[0]}_patch{patch}" if size else None,
          "width": width, "depth": depth, "patch": patch, "image_size": side * patch,
          "decoder_width": dec[0] if dec else 0,
          "decoder_depth": count("decoder_blocks") if dec else 0}


def check_state_dict(state_dict: Mapping[str, Any], layout) -> None:
  """Raises one ValueError listing every unexpected, missing, misshapen or non-finite tensor."""
  expected = {e.key: e for e in layout}
  problems = []
  unexpected = [k for k in state_dict if k not in expected]
  missing = [k for k in expected if k not in state_dict]
  wrong = [f"{k}: {tuple(np.shape(state_dict[k]))} (expected {e.shape})"
           for k, e in expected.items()
           if k in state_dict and tuple(np.shape(state_dict[k])) != e.shape]
  nonfinite = [k for k, v in state_dict.items() if k in expected
               and np.issubdtype(np.asarray(v).dtype, np.floating)
               and not np.all(np.isfinite(v))]
  for title, items in (("unexpected keys", unexpected), ("missing keys", missing),
                       ("wrong shapes", wrong), ("non-finite (NaN/inf) weights", nonfinite)):
    if items:
      shown = ", ".join(items[:8]) + (f", ... ({len(items) - 8} more)" if len(items) > 8 else "")
      problems.append(f"{len(items)} {title}: {shown}")
  if problems:
    raise ValueError(
        "the checkpoint does not match the MAE model: " + "; ".join(problems) + ". Fix: "
        "pass an official MAE checkpoint (mae_pretrain_vit_{base,large,huge}_full.pth) "
        "or a state dict with the same names; pass arch=/image_size= matching the file, "
        "decoder=False for an encoder-only file, and never a checkpoint with NaN weights.")


# -------------------------------------------------------------------------- public


def mae_to_flax(source, *, arch: Optional[str] = None, image_size: Optional[int] = None,
                decoder: Optional[bool] = None, decoder_heads: int = 16) -> PyTree:
  """Converts a MAE checkpoint into ``{'backbone', 'pretext_head': {'decoder'} or {}}``.

  Args:
    source: a ``.pth`` path or a state dict (torch tensors or numpy arrays).
    arch: expected ``vit_{size}_patch{P}``; None reads it from the tensors.
    image_size: expected input side; None reads it from ``pos_embed``.
    decoder: True requires the decoder, False ignores it, None takes it if present.
    decoder_heads: decoder attention heads (not visible in the shapes; MAE: 16).

  Returns:
    float32 parameter groups in Flax layout.

  Raises:
    ValueError: the checkpoint does not match (nothing is returned).
  """
  state_dict = read_checkpoint(source)
  info = describe_checkpoint(state_dict)
  found_arch = info["arch"]
  sizes = f"width {info['width']}, depth {info['depth']}, patch {info['patch']}"
  if found_arch is None:
    raise ValueError(f"the checkpoint's ViT ({sizes}) matches no size of "
                     "bissl_jax.models.vit.SIZES; add its (width, depth, heads) there")
  if arch is not None and found_arch != arch:
    raise ValueError(f"the checkpoint is a {found_arch} ({sizes}), not {arch}; pass "
                     f"arch={found_arch!r} or the {arch} checkpoint")
  if image_size is not None and image_size != info["image_size"]:
    raise ValueError(f"pos_embed is for {info['image_size']}px inputs, not {image_size}px;"
                     f" pass image_size={info['image_size']} (interpolating position "
                     "embeddings is not supported)")
  use_decoder = bool(info["decoder_depth"]) if decoder is None else bool(decoder)
  if decoder and not info["decoder_depth"]:
    raise ValueError("decoder=True but the checkpoint has no decoder_* keys; use the "
                     "*_full.pth release or decoder=False")
  if not use_decoder:
    state_dict = collections.OrderedDict(
        (k, v) for k, v in state_dict.items()
        if not (k.startswith("decoder_") or k == "mask_token"))
  if use_decoder and info["decoder_width"] % int(decoder_heads):
    raise ValueError(f"the decoder is {info['decoder_width']} wide, which "
                     f"decoder_heads={decoder_heads} does not divide; pass the decoder's "
                     "head count (MAE: 16)")
  layout = expected_layout(found_arch, image_size=info["image_size"],
                           decoder_width=int(info["decoder_width"] or 512),
                           decoder_depth=int(info["decoder_depth"]) if use_decoder else 0,
                           decoder_heads=int(decoder_heads))
  check_state_dict(state_dict, layout)
  params = {"backbone": {}, "pretext_head": {}}
  for e in layout:
    node = params
    for name in e.path[:-1]:
      node = node.setdefault(name, {})
    array = _to_flax_layout(np.asarray(state_dict[e.key], np.float32), e.path[-1])
    node[e.path[-1]] = jnp.array(array, jnp.float32)  # a copy, never an alias
  return params


def flax_to_mae_numpy(params: PyTree) -> "collections.OrderedDict[str, np.ndarray]":
  """MAE-named PyTorch-layout arrays of ``params['backbone']`` and its decoder.

  LoRA leaves and the downstream head are left out (merge LoRA first if it should
  be kept; a MAE checkpoint has no place for it).
  """
  groups = {"backbone": params["backbone"],
            "pretext_head": params.get("pretext_head", {})}
  out = collections.OrderedDict()
  for path, leaf in jax.tree_util.tree_flatten_with_path(groups)[0]:
    names = tuple(str(p.key) for p in path)
    if any(n.startswith("lora_") for n in names):
      continue
    out[torch_key(names)] = np.ascontiguousarray(
        _to_torch_layout(np.array(leaf, np.float32, copy=True), names[-1]))
  return out


def save_mae_torch(params: PyTree, path: Union[str, os.PathLike]) -> None:
  """Writes :func:`flax_to_mae_numpy` as ``{'model': state_dict}`` (the MAE format)."""
  torch = import_torch()
  state_dict = {k: torch.from_numpy(v) for k, v in flax_to_mae_numpy(params).items()}
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  torch.save({"model": state_dict}, os.fspath(path))


def merge_pretrained(init_params: PyTree, pretrained: PyTree) -> PyTree:
  """``init_params`` with every leaf that ``pretrained`` has replaced by it.

  Leaves only in ``init_params`` (LoRA adapters, the downstream head, a decoder the
  checkpoint lacked) keep their initial values. A pretrained leaf the model lacks, or
  of another shape, is an error.
  """
  flat = {tuple(str(p.key) for p in path): leaf for path, leaf in
          jax.tree_util.tree_flatten_with_path(init_params)[0]}
  problems = []
  replace = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(pretrained)[0]:
    names = tuple(str(p.key) for p in path)
    if names not in flat:
      problems.append(f"{'/'.join(names)} not in the model")
    elif np.shape(flat[names]) != np.shape(leaf):
      problems.append(f"{'/'.join(names)}: {np.shape(leaf)} vs model {np.shape(flat[names])}")
    else:
      replace[names] = leaf
  if problems:
    raise ValueError("pretrained weights do not fit the model: " + "; ".join(problems[:8]) +
                     ". Build the model with the checkpoint's arch, image size and decoder.")
  return jax.tree_util.tree_map_with_path(
      lambda p, x: replace.get(tuple(str(k.key) for k in p), x), init_params)
