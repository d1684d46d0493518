"""LoRA adapters for the ViT backbone, and the path rules that identify their leaves.

A LoRA adapter (Hu et al. 2022) adds a low-rank update to a frozen linear map:
``y = x W + (α/r)·(x A) B`` with ``A ∈ R^{d_in×r}`` and ``B ∈ R^{r×d_out}`` in Flax's
``(in, out)`` kernel layout, i.e. ``W_eff = W + (α/r)·A B`` (PyTorch / PEFT layout:
``W_eff = W + (α/r)·B A`` with ``lora_A.weight ∈ R^{r×d_in}``). ``B`` starts at zero,
so a fresh adapter leaves the model unchanged; ``A`` is drawn like PEFT's
``kaiming_uniform_(a=√5)``, i.e. uniform on ``±1/√d_in``.

Adapters live inside the backbone tree, next to the layer they adapt, as a submodule
``lora_{target}`` with the two leaves ``lora_a`` and ``lora_b``::

  backbone/blocks_3/attn/lora_q/lora_a      (adapts the q third of attn/qkv)
  backbone/blocks_3/attn/lora_v/lora_b
  backbone/blocks_3/mlp/lora_fc1/lora_a     (with target 'fc1')

so a leaf is a LoRA leaf iff a component of its path starts with ``lora_``
(:func:`is_lora_path`). BiSSLight's default is rank 64 with ``α = r`` on q and v.
"""
import dataclasses
import re
from typing import Any, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from bissl_jax.types import PyTree


TARGETS = ("q", "k", "v", "proj", "fc1", "fc2")
GROUPINGS = ("layer", "block", "per_leaf")
_BLOCK = re.compile(r"(decoder_)?blocks_\d+")


@dataclasses.dataclass(frozen=True)
class LoRAConfig:
  """Which linear maps of every transformer block get an adapter, and its size.

  Attributes:
    rank: r (> 0).
    alpha: α; None means ``α = r`` (scale 1, BiSSLight and the PEFT default).
    targets: subset of :data:`TARGETS`; q, k, v are the three thirds of the fused
      ``attn/qkv`` projection.
  """
  rank: int
  alpha: Optional[float] = None
  targets: Tuple[str, ...] = ("q", "v")

  def __post_init__(self):
    if int(self.rank) <= 0:
      raise ValueError(f"LoRA rank must be a positive integer; got {self.rank}. Use "
                       "lora=None for a model without adapters.")
    targets = tuple(self.targets)
    unknown = [t for t in targets if t not in TARGETS]
    if unknown or not targets or len(set(targets)) != len(targets):
      raise ValueError(f"LoRA targets must be distinct names from {TARGETS}; got "
                       f"{self.targets!r}.")
    object.__setattr__(self, "targets", targets)

  @property
  def scale(self) -> float:
    """α / r."""
    return (self.rank if self.alpha is None else float(self.alpha)) / self.rank


def lora_a_init(key, shape, dtype=jnp.float32):
  """Uniform on ``±1/√d_in`` (PEFT's ``kaiming_uniform_(a=√5)``), shape ``(d_in, r)``."""
  bound = 1.0 / jnp.sqrt(shape[0])
  return jax.random.uniform(key, shape, dtype, -bound, bound)


class LoRA(nn.Module):
  """The low-rank update ``(α/r)·(x A) B`` of one linear map (add it to the map's output).

  Attributes:
    features: output width d_out.
    config: rank, α.
    dtype: compute dtype (parameters stay float32).
  """
  features: int
  config: LoRAConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    rank = self.config.rank
    a = self.param("lora_a", lora_a_init, (x.shape[-1], rank))
    b = self.param("lora_b", nn.initializers.zeros_init(), (rank, self.features))
    x = x.astype(self.dtype)
    return (x @ a.astype(self.dtype)) @ b.astype(self.dtype) * jnp.asarray(
        self.config.scale, self.dtype)


def maybe_lora(config: Optional[LoRAConfig], target: str, features: int, x, dtype):
  """The adapter output for ``target`` (named ``lora_{target}``), or 0 without one."""
  if config is None or target not in config.targets:
    return 0.0
  return LoRA(features, config, dtype, name=f"lora_{target}")(x)


# ----------------------------------------------------------------------- path rules


def path_names(path) -> Tuple[str, ...]:
  """The string keys of a ``jax.tree_util`` key path."""
  out = []
  for entry in path:
    for attr in ("key", "name", "idx"):
      if hasattr(entry, attr):
        out.append(str(getattr(entry, attr)))
        break
    else:
      out.append(str(entry))
  return tuple(out)


def is_lora_path(names: Sequence[str]) -> bool:
  """True for a LoRA leaf: a path component starts with ``lora_``."""
  return any(str(n).startswith("lora_") for n in names)


def lora_mask(params: PyTree) -> PyTree:
  """A boolean tree over ``params``: True on LoRA leaves."""
  return jax.tree_util.tree_map_with_path(
      lambda p, _: is_lora_path(path_names(p)), params)


def mfac_block_key(names: Sequence[str], grouping: str = "layer") -> str:
  """The M-FAC block a leaf belongs to, as a ``/``-joined path prefix.

  Args:
    names: the leaf's path, e.g. ``('backbone', 'blocks_3', 'attn', 'lora_q', 'lora_a')``.
    grouping: ``'layer'``: everything up to and including ``blocks_{i}`` (all LoRA
      leaves of one transformer block together, BiSSLight's default);
      ``'block'``: up to and including the ``lora_{target}`` module (A and B of one
      adapted matrix together, q and v apart); ``'per_leaf'``: the whole path.
      A leaf outside any block (a trained norm, the class token) is its own block
      under ``'block'``/``'per_leaf'`` and, under ``'layer'``, groups with the other
      leaves of its top-level module (``backbone/norm``).

  Returns:
    The block's key; leaves with equal keys form one block.
  """
  names = tuple(str(n) for n in names)
  if grouping not in GROUPINGS:
    raise ValueError(f"Unknown M-FAC grouping {grouping!r}; choose one of {GROUPINGS}.")
  if grouping == "per_leaf":
    return "/".join(names)
  if grouping == "layer":
    for i, n in enumerate(names):
      if _BLOCK.fullmatch(n):
        return "/".join(names[:i + 1])
    return "/".join(names[:2] if len(names) > 2 else names[:-1] or names)
  for i, n in enumerate(names):  # 'block'
    if n.startswith("lora_") and i < len(names) - 1:
      return "/".join(names[:i + 1])
  return "/".join(names)


def mfac_block_labels(tree: PyTree, grouping: str = "layer") -> PyTree:
  """A tree of block keys (strings) shaped like ``tree``; see :func:`mfac_block_key`.

  Pass the *trainable* leaves only (``partition.split``): frozen leaves have no
  block.
  """
  return jax.tree_util.tree_map_with_path(
      lambda p, _: mfac_block_key(path_names(p), grouping), tree)
