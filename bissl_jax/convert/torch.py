"""PyTorch state dicts <-> bissl_jax (Flax linen) variables for ResNets and MLP heads.

Key layout on the PyTorch side (timm / torchvision ``resnet18``/``resnet50`` and the
BiSSL reference heads)::

  conv1.weight, bn1.{weight,bias,running_mean,running_var,num_batches_tracked}
  layer{i}.{j}.conv{k}.weight, layer{i}.{j}.bn{k}.*
  layer{i}.{j}.downsample.0.weight, layer{i}.{j}.downsample.1.*
  projector.{n}.*, predictor.{n}.*   (n = index in nn.Sequential(Linear, BN1d, ReLU, ...))

Tensor layouts: conv OIHW <-> HWIO, Linear (out, in) <-> Dense (in, out), BatchNorm
weight/bias/running_mean/running_var <-> scale/bias/mean/var. ``fc.*`` (a supervised
classifier) and ``num_batches_tracked`` are ignored on import; ``num_batches_tracked``
is written as 0 on export (Flax does not count batches, and PyTorch only reads it when
BatchNorm momentum is None).

The expected key/shape table is built from the Flax modules with ``jax.eval_shape``,
so it follows ``bissl_jax.models.resnet``. Every checkpoint is checked against it before
anything is built: a missing key, an unexpected key or a wrong shape raises a
``ValueError`` that names the first offending key; nothing is ever half loaded.

torch is optional: it is imported only where a ``.pth`` file or torch tensors are
read or written.
"""
import collections
import functools
import os
import re
from typing import Any, Mapping, NamedTuple, Optional, Sequence, Tuple, Union

import jax
import jax.numpy as jnp
import numpy as np

from bissl_jax.convert.torch_files import (StateDictSource, check_torch_file,  # noqa: F401
                                           check_values, first_keys, import_torch,
                                           load_state_dict, strip_prefix, to_numpy)
from bissl_jax.types import PyTree

HeadSpec = Union[None, str, Sequence[int]]

# Classifier weights of supervised checkpoints, and PyTorch's BatchNorm counter.
_IGNORED_PREFIXES = ("fc.",)
_IGNORED_SUFFIX = "num_batches_tracked"

_HEAD_PREFIXES = {"projector": "projector.", "predictor": "predictor."}
_FLAX_TO_TORCH_LEAF = {
    ("params", "kernel"): "weight",
    ("params", "scale"): "weight",
    ("params", "bias"): "bias",
    ("batch_stats", "mean"): "running_mean",
    ("batch_stats", "var"): "running_var",
}
_BLOCKS_TO_ARCH = {
    ("basic", (2, 2, 2, 2)): "resnet18",
    ("basic", (3, 4, 6, 3)): "resnet34",
    ("bottleneck", (3, 4, 6, 3)): "resnet50",
    ("bottleneck", (3, 4, 23, 3)): "resnet101",
    ("bottleneck", (3, 8, 36, 3)): "resnet152",
}


class LayoutEntry(NamedTuple):
  """One tensor of the PyTorch layout and where it lives in the Flax variables."""
  key: str                    # PyTorch state-dict key
  collection: str             # 'params' or 'batch_stats'
  path: Tuple[str, ...]       # Flax path inside the collection, group first
  shape: Tuple[int, ...]      # PyTorch shape


# ------------------------------------------------------------------- Flax layout


def _parse_head_spec(spec: HeadSpec) -> Optional[Tuple[int, ...]]:
  if spec is None or isinstance(spec, tuple) and not spec:
    return None
  if isinstance(spec, str):
    return tuple(int(s) for s in spec.split("-"))
  return tuple(int(s) for s in spec)


def _torch_module_name(name: str) -> str:
  """Flax submodule name -> PyTorch attribute path (``layer1_0`` -> ``layer1.0``)."""
  block = re.fullmatch(r"layer(\d+)_(\d+)", name)
  if block:
    return f"layer{block.group(1)}.{block.group(2)}"
  if name == "downsample_conv":
    return "downsample.0"
  if name == "downsample_bn":
    return "downsample.1"
  indexed = re.fullmatch(r"(?:dense|bn)_(\d+)", name)  # MLPHead: Sequential index
  if indexed:
    return indexed.group(1)
  return name


def torch_key(collection: str, path: Sequence[str]) -> str:
  """PyTorch key of a Flax leaf, e.g. ('params', ('backbone', 'layer1_0', 'conv1',
  'kernel')) -> 'layer1.0.conv1.weight'."""
  group, *modules, leaf = path
  if group == "backbone":
    prefix = ""
  elif group == "pretext_head" and modules and modules[0] in _HEAD_PREFIXES:
    prefix = _HEAD_PREFIXES[modules[0]]
    modules = modules[1:]
  else:
    raise ValueError(f"{'/'.join(path)}: only 'backbone' and 'pretext_head/projector|"
                     "predictor' have a PyTorch layout")
  if (collection, leaf) not in _FLAX_TO_TORCH_LEAF:
    raise ValueError(f"{collection}/{'/'.join(path)}: no PyTorch name for leaf {leaf!r}")
  names = [_torch_module_name(m) for m in modules] + [
      _FLAX_TO_TORCH_LEAF[(collection, leaf)]]
  return prefix + ".".join(names)


def _to_torch_layout(array, leaf: str):
  if leaf == "kernel" and array.ndim == 4:
    return np.transpose(array, (3, 2, 0, 1))  # HWIO -> OIHW
  if leaf == "kernel" and array.ndim == 2:
    return np.transpose(array)               # (in, out) -> (out, in)
  return array


def _to_flax_layout(array, leaf: str):
  if leaf == "kernel" and array.ndim == 4:
    return np.transpose(array, (2, 3, 1, 0))  # OIHW -> HWIO
  if leaf == "kernel" and array.ndim == 2:
    return np.transpose(array)
  return array


def _leaves(tree, path=()):
  """(path, leaf) pairs in insertion order (module creation order for Flax init)."""
  for k, v in tree.items():
    if isinstance(v, Mapping):
      yield from _leaves(v, path + (k,))
    else:
      yield path + (k,), v


def _entries(params: PyTree, batch_stats: PyTree, shape_of) -> list:
  """LayoutEntries of a variables tree, each module's params before its stats."""
  stats_by_module = collections.OrderedDict()
  for path, leaf in _leaves(batch_stats):
    stats_by_module.setdefault(path[:-1], []).append((path, leaf))
  entries = []
  def add(collection, path, leaf):
    shape = tuple(shape_of(leaf))
    if path[-1] == "kernel":
      shape = _to_torch_layout(np.empty(shape, np.bool_), "kernel").shape
    entries.append(LayoutEntry(torch_key(collection, path), collection, path, shape))
  for path, leaf in _leaves(params):
    add("params", path, leaf)
    for stat_path, stat in stats_by_module.pop(path[:-1], []):
      add("batch_stats", stat_path, stat)
  for stats in stats_by_module.values():
    for stat_path, stat in stats:
      add("batch_stats", stat_path, stat)
  return entries


@functools.lru_cache(maxsize=32)
def expected_layout(arch: str, *, cifar_stem: bool = False,
                    width_multiplier: float = 1.0,
                    projector: Optional[Tuple[int, ...]] = None,
                    predictor: Optional[Tuple[int, ...]] = None) -> Tuple[LayoutEntry, ...]:
  """The PyTorch keys and shapes of a bissl_jax model, from ``jax.eval_shape``.

  Args:
    arch: 'resnet18' or 'resnet50' (a constructor in ``bissl_jax.models.resnet``).
    cifar_stem, width_multiplier: backbone options, as in ``bissl_jax.models.resnet``.
    projector: projector layer widths (e.g. ``(256, 256, 256)``) or None for none.
    predictor: BYOL predictor widths or None; needs a projector.

  Returns:
    LayoutEntries: backbone first (module creation order), then projector, predictor.
  """
  from bissl_jax.models import resnet  # pylint: disable=g-import-not-at-top
  if arch not in resnet.ARCHITECTURES:
    raise ValueError(f"arch={arch!r} is not supported; choose one of "
                     f"{sorted(resnet.ARCHITECTURES)}")
  constructor = resnet.ARCHITECTURES[arch]
  backbone = constructor(width_multiplier=width_multiplier, cifar_stem=cifar_stem)
  image = jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32)
  features, variables = jax.eval_shape(
      functools.partial(backbone.init_with_output, train=False),
      jax.random.key(0), image)
  params = {"backbone": variables["params"]}
  stats = {"backbone": variables.get("batch_stats", {})}
  if predictor is not None and projector is None:
    raise ValueError("a predictor needs a projector")
  heads = [("projector", projector, features.shape[-1])]
  if projector is not None:
    heads.append(("predictor", predictor, projector[-1]))
  for name, widths, in_features in heads:
    if widths is None:
      continue
    head_vars = jax.eval_shape(
        functools.partial(resnet.MLPHead(features=tuple(widths)).init, train=False),
        jax.random.key(0), jax.ShapeDtypeStruct((2, in_features), jnp.float32))
    params.setdefault("pretext_head", {})[name] = head_vars["params"]
    stats.setdefault("pretext_head", {})[name] = head_vars.get("batch_stats", {})
  return tuple(sorted(_entries(params, stats, shape_of=lambda s: s.shape),
                      key=_torch_order))


_LEAF_ORDER = {"weight": 0, "bias": 1, "running_mean": 2, "running_var": 3}


def _torch_order(entry: LayoutEntry):
  """Sort key giving PyTorch's state-dict order (jax.eval_shape sorts dict keys)."""
  group = 0 if entry.path[0] == "backbone" else 1 + ("predictor" in entry.path[:2])
  parts = []
  for name in entry.key.split("."):
    numbered = re.fullmatch(r"(conv|bn|layer)(\d+)", name)
    if name.isdigit():
      parts.append((0, int(name), 0))
    elif numbered and numbered.group(1) != "layer":
      parts.append((1, int(numbered.group(2)), numbered.group(1) == "bn"))
    elif numbered:
      parts.append((2, int(numbered.group(2)), 0))
    elif name == "downsample":
      parts.append((3, 0, 0))
    else:
      parts.append((4, _LEAF_ORDER.get(name, 9), 0))
  return group, parts


# ------------------------------------------------------------------- validation


def guess_arch(keys) -> Optional[str]:
  """The torchvision/timm ResNet name whose block counts match these keys, if any."""
  blocks = collections.defaultdict(set)
  bottleneck = False
  for key in keys:
    m = re.match(r"layer([1-4])\.(\d+)\.", key)
    if m:
      blocks[int(m.group(1))].add(int(m.group(2)))
      bottleneck |= key.startswith(m.group(0) + "conv3.")
  counts = tuple(len(blocks[i]) for i in range(1, 5))
  return _BLOCKS_TO_ARCH.get(("bottleneck" if bottleneck else "basic", counts))


def _infer_head(state_dict: Mapping[str, Any], name: str) -> Optional[Tuple[int, ...]]:
  """Layer widths of a Sequential MLP head from its Linear weights (2-D tensors)."""
  linears = []
  for key, value in state_dict.items():
    m = re.fullmatch(re.escape(name) + r"\.(\d+)\.weight", key)
    if m and np.ndim(value) == 2:
      linears.append((int(m.group(1)), np.shape(value)[0]))
  return tuple(width for _, width in sorted(linears)) or None


def _describe(arch, cifar_stem, width_multiplier, projector, predictor) -> str:
  parts = [f"arch={arch!r}"]
  if cifar_stem:
    parts.append("cifar_stem=True")
  if width_multiplier != 1.0:
    parts.append(f"width_multiplier={width_multiplier:g}")
  if projector:
    parts.append("projector=" + "-".join(map(str, projector)))
  if predictor:
    parts.append("predictor=" + "-".join(map(str, predictor)))
  return ", ".join(parts)


def _arch_hint(keys, arch) -> str:
  guess = guess_arch(keys)
  if guess and guess != arch:
    return f": is this a {guess} checkpoint? you passed arch={arch!r}"
  return ""


def checked_layout(state_dict: Mapping[str, Any], *, arch: str, cifar_stem: bool = False,
                   width_multiplier: float = 1.0, projector: HeadSpec = None,
                   predictor: HeadSpec = None) -> Tuple[LayoutEntry, ...]:
  """Validates a (prefix-stripped) state dict against the model and returns its layout.

  Args:
    state_dict: PyTorch-named arrays or tensors (anything with a ``.shape``).
    arch, cifar_stem, width_multiplier: backbone options.
    projector, predictor: head widths ('256-256-256' or ints) that a head in the
      checkpoint must have; None: take them from its ``projector.*``/``predictor.*``
      Linear weights. A head the checkpoint lacks is left out either way.

  Returns:
    The LayoutEntries that the state dict fills, in PyTorch module order.

  Raises:
    ValueError: naming the first missing key, unexpected key or wrong shape.
  """
  found = {name: _infer_head(state_dict, name) for name in _HEAD_PREFIXES}
  # A head the checkpoint does not have is left out, not an error: the reference
  # code stores heads in a file of their own.
  projector = found["projector"] and (_parse_head_spec(projector) or found["projector"])
  predictor = found["predictor"] and (_parse_head_spec(predictor) or found["predictor"])
  layout = expected_layout(arch, cifar_stem=bool(cifar_stem),
                           width_multiplier=float(width_multiplier),
                           projector=projector, predictor=predictor)
  model = _describe(arch, cifar_stem, width_multiplier, projector, predictor)
  keys = list(state_dict)

  missing = [e for e in layout if e.key not in state_dict]
  if missing:
    hint = _arch_hint(keys, arch)
    backbone_missing = [e for e in missing if e.path[0] == "backbone"]
    if len(backbone_missing) == sum(e.path[0] == "backbone" for e in layout):
      hint += (f"; the checkpoint has no backbone keys (its keys start like "
               f"{first_keys(keys)}). A prefixed checkpoint needs prefix='...'; "
               "a pretext-head file must be passed together with its backbone file")
    more = f" ({len(missing) - 1} more keys missing)" if len(missing) > 1 else ""
    raise ValueError(f"{missing[0].key} missing{hint}. Expected shape "
                     f"{missing[0].shape} for {model}{more}.")

  expected = {e.key for e in layout}
  unexpected = [k for k in keys if k not in expected
                and not k.startswith(_IGNORED_PREFIXES)
                and not k.endswith(_IGNORED_SUFFIX)]
  if unexpected:
    more = f" ({len(unexpected) - 1} more)" if len(unexpected) > 1 else ""
    hint = _arch_hint(keys, arch) or (
        "; if the checkpoint holds more than the model, select the model's part "
        "with prefix='...'")
    raise ValueError(f"unexpected key {unexpected[0]} for {model}{more}{hint}")

  for e in layout:
    got = tuple(np.shape(state_dict[e.key]))
    if got != e.shape:
      hint = _arch_hint(keys, arch)
      if e.key == "conv1.weight" and len(got) == 4 and got[2:] != e.shape[2:]:
        hint += (f"; a {got[2]}x{got[3]} stem needs cifar_stem="
                 f"{got[2] == 3}")
      elif e.key == "conv1.weight" and len(got) == 4 and got[0] != e.shape[0]:
        hint += (f"; conv1 has {got[0]} output channels, which matches "
                 f"width_multiplier={got[0] / 64:g}")
      elif e.path[0] == "pretext_head":
        name = e.path[1]
        hint += (f"; the checkpoint's {name} is "
                 f"{'-'.join(map(str, found[name]))}: configure the model with that")
      raise ValueError(f"{e.key} has shape {got}, expected {e.shape} for {model}{hint}")
  return layout


# ------------------------------------------------------------------- public API


def torch_to_flax(state_dict_or_path: Union[StateDictSource, Sequence[StateDictSource]],
                  *, arch: str, cifar_stem: bool = False, width_multiplier: float = 1.0,
                  prefix: Optional[str] = None, projector: HeadSpec = None,
                  predictor: HeadSpec = None) -> Tuple[PyTree, PyTree]:
  """Converts a PyTorch ResNet (+ projector/predictor) state dict to Flax variables.

  Args:
    state_dict_or_path: a dict of torch tensors or numpy arrays, a ``.pth`` path, or a
      list of these merged into one (the BiSSL reference saves backbone and head
      separately).
    arch: 'resnet18' or 'resnet50'.
    cifar_stem, width_multiplier: backbone options, as in ``bissl_jax.models.resnet``.
    prefix: see :func:`strip_prefix`; None strips ``module.``, ``backbone.``, ``head.``.
    projector, predictor: widths ('256-256-256') that the checkpoint's heads must
      have, or None to take them from the file; heads it lacks are left out.

  Returns:
    ``(params, batch_stats)``: ``{'backbone': ..., 'pretext_head': {'projector': ...,
    'predictor': ...}}`` with ``pretext_head`` and its entries only where the
    checkpoint has them; float32 jax arrays in Flax layout.

  Raises:
    ValueError: the checkpoint does not match the model (nothing is returned).
  """
  state_dict, _ = strip_prefix(load_state_dict(state_dict_or_path), prefix)
  layout = checked_layout(state_dict, arch=arch, cifar_stem=cifar_stem,
                          width_multiplier=width_multiplier, projector=projector,
                          predictor=predictor)
  check_values(state_dict, [e.key for e in layout])
  variables = {"params": {}, "batch_stats": {}}
  for e in layout:
    node = variables[e.collection]
    for name in e.path[:-1]:
      node = node.setdefault(name, {})
    array = _to_flax_layout(np.asarray(state_dict[e.key]), e.path[-1])
    node[e.path[-1]] = jnp.array(array, jnp.float32)  # a copy, never an alias
  return variables["params"], variables["batch_stats"]


def flax_to_numpy(params: PyTree, batch_stats: PyTree, *, arch: str
                  ) -> "collections.OrderedDict[str, np.ndarray]":
  """Like :func:`flax_to_torch` but returns numpy arrays; needs no torch.

  Args:
    params, batch_stats: with a 'backbone' and optionally a 'pretext_head' group;
      'downstream_head' (the linear classifier) is not exported.
    arch: the backbone's arch; checked against the tree.

  Returns:
    PyTorch-named, PyTorch-layout arrays, each BatchNorm with ``num_batches_tracked``.
  """
  groups = ("backbone", "pretext_head")
  unknown = set(params) - set(groups) - {"downstream_head"}
  if unknown or "backbone" not in params:
    raise ValueError(f"params must have a 'backbone' and may have 'pretext_head' and "
                     f"'downstream_head'; got groups {sorted(params)}")
  params = {g: params[g] for g in groups if g in params}
  batch_stats = {g: batch_stats[g] for g in groups if g in batch_stats}
  found = {e.key: e for e in _entries(params, batch_stats, shape_of=np.shape)}
  arrays = {}
  for e in found.values():
    node = params if e.collection == "params" else batch_stats
    for name in e.path:
      node = node[name]
    # A copy: np.asarray of a CPU jax.Array may alias its buffer, and torch tensors
    # made from it would then write into the Flax variables.
    arrays[e.key] = np.ascontiguousarray(
        _to_torch_layout(np.array(node, np.float32, copy=True), e.path[-1]))
  stem = np.shape(arrays.get("conv1.weight", np.empty((64, 3, 7, 7))))
  layout = checked_layout(arrays, arch=arch, cifar_stem=stem[2:] == (3, 3),
                          width_multiplier=stem[0] / 64)
  out = collections.OrderedDict()
  for e in layout:
    out[e.key] = arrays[e.key]
    if e.key.endswith("running_var"):  # the last tensor of a BatchNorm
      out[e.key[:-len("running_var")] + _IGNORED_SUFFIX] = np.zeros((), np.int64)
  return out


def flax_to_torch(params: PyTree, batch_stats: PyTree, *, arch: str
                  ) -> "collections.OrderedDict[str, Any]":
  """Converts Flax variables to a PyTorch state dict (timm/BiSSL-reference names).

  Args:
    params, batch_stats: as returned by :func:`torch_to_flax` or a BisslModel's
      variables ('downstream_head' is skipped).
    arch: 'resnet18' or 'resnet50'; the tree is validated against it.

  Returns:
    ``OrderedDict[str, torch.Tensor]``: backbone keys (load into
    ``timm.create_model(arch, num_classes=0)``), then ``projector.*``/``predictor.*``.
  """
  torch = import_torch()
  return collections.OrderedDict(
      (k, torch.from_numpy(v))
      for k, v in flax_to_numpy(params, batch_stats, arch=arch).items())


def save_torch(params: PyTree, batch_stats: PyTree, path: Union[str, os.PathLike], *,
               arch: str) -> None:
  """Writes :func:`flax_to_torch`'s state dict to ``path`` with ``torch.save``."""
  state_dict = flax_to_torch(params, batch_stats, arch=arch)
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  import_torch().save(state_dict, os.fspath(path))
