"""Networks of BiSSL: ResNet backbones and the MLP projector/predictor (BiSSL paper §4.2.1).

Module and parameter names follow timm/torchvision so PyTorch checkpoints map one to
one onto the Flax tree:

* ``conv1``/``bn1`` for the stem, ``layer{i}_{j}`` for block ``j`` of stage ``i``
  (torchvision's ``layer{i}.{j}``), ``conv1..3``/``bn1..3`` inside a block and
  ``downsample_conv``/``downsample_bn`` for a projecting shortcut
  (torchvision's ``downsample.0``/``downsample.1``);
* MLP heads name their layers after their index in the reference
  ``nn.Sequential(Linear, BN, ReLU, Linear, BN, ReLU, Linear)``: ``dense_0``,
  ``bn_1``, ``dense_3``, ``bn_4``, ``dense_6``.

Convolutions are bias-free with HWIO kernels and explicit PyTorch padding. BatchNorm
uses PyTorch's defaults (momentum 0.1 ≙ Flax ``momentum=0.9``, ``eps=1e-5``). Under jit
over a sharded global batch its statistics are global without any ``axis_name``.
Two small differences from PyTorch remain: running variances are updated with the
biased batch variance, and Linear biases start at zero.

:class:`BisslModel` bundles the networks and exposes pure ``apply`` helpers that take
and return plain parameter/statistics trees, the form the bilevel code works with.
"""
import dataclasses
from typing import Any, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from bissl_jax.types import PyTree


BN_MOMENTUM = 0.9  # Flax convention: running = 0.9·running + 0.1·batch (PyTorch momentum 0.1).
BN_EPSILON = 1e-5

# torchvision initialises convolutions with Kaiming-normal, fan_out, ReLU gain.
_conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
# PyTorch's Linear default: U(±1/sqrt(fan_in)) on the weight.
_dense_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def _batch_norm(train: bool, name: str, dtype) -> nn.BatchNorm:
  # Two-pass variance like PyTorch: E[x²]−E[x]² loses precision on large activations.
  return nn.BatchNorm(use_running_average=not train, momentum=BN_MOMENTUM,
                      epsilon=BN_EPSILON, dtype=dtype, use_fast_variance=False, name=name)


def _conv(features: int, kernel: int, stride: int, name: str, dtype) -> nn.Conv:
  pad = (kernel - 1) // 2  # PyTorch ResNets: 7×7 pad 3, 3×3 pad 1, 1×1 pad 0.
  return nn.Conv(features, (kernel, kernel), strides=(stride, stride),
                 padding=((pad, pad), (pad, pad)), use_bias=False,
                 kernel_init=_conv_init, dtype=dtype, name=name)


class BasicBlock(nn.Module):
  """Two 3×3 convolutions with an identity or 1×1-projected shortcut (expansion 1)."""
  planes: int
  stride: int = 1
  dtype: Any = jnp.float32
  expansion = 1

  @nn.compact
  def __call__(self, x, *, train: bool):
    out_ch = self.planes * self.expansion
    y = _conv(self.planes, 3, self.stride, "conv1", self.dtype)(x)
    y = nn.relu(_batch_norm(train, "bn1", self.dtype)(y))
    y = _conv(out_ch, 3, 1, "conv2", self.dtype)(y)
    y = _batch_norm(train, "bn2", self.dtype)(y)
    return nn.relu(y + _shortcut(x, out_ch, self.stride, train, self.dtype))


class Bottleneck(nn.Module):
  """1×1 → 3×3 (strided, as in torchvision v1.5) → 1×1 with expansion 4."""
  planes: int
  stride: int = 1
  dtype: Any = jnp.float32
  expansion = 4

  @nn.compact
  def __call__(self, x, *, train: bool):
    out_ch = self.planes * self.expansion
    y = _conv(self.planes, 1, 1, "conv1", self.dtype)(x)
    y = nn.relu(_batch_norm(train, "bn1", self.dtype)(y))
    y = _conv(self.planes, 3, self.stride, "conv2", self.dtype)(y)
    y = nn.relu(_batch_norm(train, "bn2", self.dtype)(y))
    y = _conv(out_ch, 1, 1, "conv3", self.dtype)(y)
    y = _batch_norm(train, "bn3", self.dtype)(y)
    return nn.relu(y + _shortcut(x, out_ch, self.stride, train, self.dtype))


def _shortcut(x, out_ch: int, stride: int, train: bool, dtype):
  """Identity, or a strided 1×1 conv + BN where the shape changes (called inside a block)."""
  if stride == 1 and x.shape[-1] == out_ch:
    return x
  s = _conv(out_ch, 1, stride, "downsample_conv", dtype)(x)
  return _batch_norm(train, "downsample_bn", dtype)(s)


_BLOCKS = {"basic": BasicBlock, "bottleneck": Bottleneck}


class ResNet(nn.Module):
  """ResNet backbone returning globally average-pooled features ``(B, C)``.

  Attributes:
    stage_sizes: blocks per stage, e.g. ``(2, 2, 2, 2)`` for ResNet-18.
    block: ``'basic'`` or ``'bottleneck'``.
    width: channels of the stem and the first stage (64 for the standard nets).
    cifar_stem: 3×3/s1 stem without max-pool, for small images.
    dtype: computation dtype (parameters stay float32).
  """
  stage_sizes: Sequence[int]
  block: str
  width: int = 64
  cifar_stem: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, *, train: bool):
    if self.block not in _BLOCKS:
      raise ValueError(f"Unknown ResNet block {self.block!r}; use one of {sorted(_BLOCKS)}.")
    block_cls = _BLOCKS[self.block]
    x = jnp.asarray(x, self.dtype)
    if self.cifar_stem:
      x = _conv(self.width, 3, 1, "conv1", self.dtype)(x)
      x = nn.relu(_batch_norm(train, "bn1", self.dtype)(x))
    else:
      x = _conv(self.width, 7, 2, "conv1", self.dtype)(x)
      x = nn.relu(_batch_norm(train, "bn1", self.dtype)(x))
      # reduce_window pads with its init value (-inf), as PyTorch's MaxPool2d does.
      x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    for i, num_blocks in enumerate(self.stage_sizes):
      for j in range(num_blocks):
        stride = 2 if (i > 0 and j == 0) else 1
        x = block_cls(planes=self.width * 2**i, stride=stride, dtype=self.dtype,
                      name=f"layer{i + 1}_{j}")(x, train=train)
    return jnp.mean(x, axis=(1, 2))


def _scaled_width(width_multiplier: float) -> int:
  width = int(round(64 * width_multiplier))
  if width < 1:
    raise ValueError(f"width_multiplier={width_multiplier} gives no channels; use a value ≥ 1/64.")
  return width


def resnet18(width_multiplier: float = 1.0, cifar_stem: bool = False) -> ResNet:
  """ResNet-18 (basic blocks 2-2-2-2); base width ``64·width_multiplier``."""
  return ResNet(stage_sizes=(2, 2, 2, 2), block="basic",
                width=_scaled_width(width_multiplier), cifar_stem=cifar_stem)


def resnet50(width_multiplier: float = 1.0, cifar_stem: bool = False) -> ResNet:
  """ResNet-50 (bottleneck blocks 3-4-6-3); base width ``64·width_multiplier``."""
  return ResNet(stage_sizes=(3, 4, 6, 3), block="bottleneck",
                width=_scaled_width(width_multiplier), cifar_stem=cifar_stem)


ARCHITECTURES = {"resnet18": resnet18, "resnet50": resnet50}


class MLPHead(nn.Module):
  """Projector/predictor: (Dense+bias → BN → ReLU) × (n−1), then Dense without bias.

  Attributes:
    features: output width of every Dense, e.g. ``(256, 256, 256)``.
  """
  features: Sequence[int]

  @nn.compact
  def __call__(self, x, *, train: bool):
    if len(self.features) < 1:
      raise ValueError("MLPHead needs at least one layer width, e.g. features=(256, 256, 256).")
    for i, width in enumerate(self.features[:-1]):
      x = nn.Dense(width, kernel_init=_dense_init, name=f"dense_{3 * i}")(x)
      x = _batch_norm(train, f"bn_{3 * i + 1}", None)(x)
      x = nn.relu(x)
    last = len(self.features) - 1
    return nn.Dense(self.features[-1], use_bias=False, kernel_init=_dense_init,
                    name=f"dense_{3 * last}")(x)


def parse_mlp_spec(spec: str) -> Tuple[int, ...]:
  """``'256-256-256'`` → ``(256, 256, 256)``."""
  try:
    dims = tuple(int(part) for part in str(spec).split("-"))
  except ValueError:
    raise ValueError(f"MLP spec {spec!r} must be dash-separated positive integers, "
                     "e.g. '256-256-256'.") from None
  if not dims or any(d <= 0 for d in dims):
    raise ValueError(f"MLP spec {spec!r} must be dash-separated positive integers.")
  return dims


def _apply_with_stats(module: nn.Module, params, stats, x, train: bool):
  """Runs a BN-carrying module; returns ``(out, stats)`` (stats updated only in training)."""
  variables = {"params": params, "batch_stats": stats}
  if train:
    out, mutated = module.apply(variables, x, train=True, mutable=["batch_stats"])
    return out, mutated["batch_stats"]
  return module.apply(variables, x, train=False), stats


@dataclasses.dataclass(frozen=True)
class BisslModel:
  """Backbone f_θ and pretext head φ_P (projector [+ predictor]).

  The downstream head φ_D belongs to the downstream task
  (:mod:`bissl_jax.tasks.downstream.heads`); :meth:`head_rng` is the key of this
  model's initialisation schedule that the task initialises it from.
  Frozen and hashable, so it can be a static argument of jitted functions.
  """
  backbone: ResNet
  projector: MLPHead
  predictor: Optional[MLPHead]

  def init(self, rng: jax.Array, image_size: int, channels: int = 3
           ) -> Tuple[PyTree, PyTree]:
    """Initialises the backbone and the pretext head.

    Args:
      rng: PRNG key.
      image_size: side of the (square) input images.
      channels: input channels.

    Returns:
      ``(params, batch_stats)`` with ``params = {'backbone', 'pretext_head':
      {'projector'[, 'predictor']}, 'downstream_head': {}}`` (the downstream task
      fills the head: :func:`bissl_jax.core.params.init_params`) and
      ``batch_stats = {'backbone', 'pretext_head': {...}}``.
    """
    # Four keys, the fourth reserved for the downstream head (head_rng): the schedule
    # of the checkpoints written before the tasks owned their heads.
    k_bb, k_proj, k_pred, _ = jax.random.split(rng, 4)
    x = jnp.zeros((1, image_size, image_size, channels), jnp.float32)
    bb = self.backbone.init(k_bb, x, train=False)
    feats = jax.eval_shape(lambda v: self.backbone.apply(v, x, train=False), bb)
    h = jnp.zeros((1, feats.shape[-1]), jnp.float32)
    proj = self.projector.init(k_proj, h, train=False)
    head_params = {"projector": proj["params"]}
    head_stats = {"projector": proj["batch_stats"]}
    if self.predictor is not None:
      z = jnp.zeros((1, self.projector.features[-1]), jnp.float32)
      pred = self.predictor.init(k_pred, z, train=False)
      head_params["predictor"] = pred["params"]
      head_stats["predictor"] = pred["batch_stats"]
    params = {"backbone": bb["params"], "pretext_head": head_params, "downstream_head": {}}
    batch_stats = {"backbone": bb["batch_stats"], "pretext_head": head_stats}
    return params, batch_stats

  @staticmethod
  def head_rng(rng: jax.Array) -> jax.Array:
    """The key :meth:`init`'s schedule reserves for the downstream head."""
    return jax.random.split(rng, 4)[3]

  def features(self, backbone_params, backbone_stats, x, *, train: bool):
    """Backbone features ``(B, C)`` and the (in training, updated) backbone statistics."""
    return _apply_with_stats(self.backbone, backbone_params, backbone_stats, x, train)

  def project(self, projector_params, projector_stats, h, *, train: bool):
    """Projector output ``z`` and its statistics."""
    return _apply_with_stats(self.projector, projector_params, projector_stats, h, train)

  def predict(self, predictor_params, predictor_stats, z, *, train: bool):
    """Predictor output ``p`` (BYOL) and its statistics."""
    if self.predictor is None:
      raise ValueError("This model has no predictor; build it with predictor='256-256-256' "
                       "(needed by BYOL).")
    return _apply_with_stats(self.predictor, predictor_params, predictor_stats, z, train)


def build_model(arch: str, *, width_multiplier: float = 1.0,
                cifar_stem: bool = False, projector: str = "256-256-256",
                predictor: Optional[str] = None) -> BisslModel:
  """Builds a :class:`BisslModel` from config strings.

  Args:
    arch: ``'resnet18'`` or ``'resnet50'``.
    width_multiplier: scales the base width 64.
    cifar_stem: 3×3 stem without max-pool.
    projector: MLP spec of the projector, e.g. ``'256-256-256'``.
    predictor: MLP spec of BYOL's predictor, or None. Its last width must equal the
      projector's.

  Returns:
    The model bundle.
  """
  if arch not in ARCHITECTURES:
    raise ValueError(f"Unknown arch {arch!r}; valid choices: {sorted(ARCHITECTURES)}.")
  proj_dims = parse_mlp_spec(projector)
  pred = None
  if predictor:
    pred_dims = parse_mlp_spec(predictor)
    if pred_dims[-1] != proj_dims[-1]:
      raise ValueError(f"Predictor output {pred_dims[-1]} must equal the projector output "
                       f"{proj_dims[-1]} (BYOL compares them); got predictor={predictor!r}, "
                       f"projector={projector!r}.")
    pred = MLPHead(features=pred_dims)
  return BisslModel(backbone=ARCHITECTURES[arch](width_multiplier, cifar_stem),
                    projector=MLPHead(features=proj_dims), predictor=pred)
