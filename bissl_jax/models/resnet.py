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
    pool: False returns the last stage's feature map ``(B, H, W, C)`` instead.
  """
  stage_sizes: Sequence[int]
  block: str
  width: int = 64
  cifar_stem: bool = False
  dtype: Any = jnp.float32
  pool: bool = True

  @nn.compact
  def __call__(self, x, *, train: bool):
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
      x = _stage(x, i, num_blocks, self.block, self.width, train, self.dtype)
    return _pooled(x) if self.pool else x


class ResNetTail(nn.Module):
  """The stages of a ResNet after a moved backbone boundary, then global pooling.

  Runs stages ``first_stage + 1 ..`` (res{first_stage + 2}..) on the shared
  backbone's feature map under the full ResNet's names (``layer{i}_{j}``), so a
  ResNet's parameter tree splits at the boundary without renaming.

  Attributes:
    stage_sizes: blocks per stage of the whole ResNet.
    block, width, dtype: as :class:`ResNet`.
    first_stage: index of the first stage held here (3: res5 of a ResNet).
  """
  stage_sizes: Sequence[int]
  block: str
  first_stage: int
  width: int = 64
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, *, train: bool):
    x = jnp.asarray(x, self.dtype)
    for i in range(self.first_stage, len(self.stage_sizes)):
      x = _stage(x, i, self.stage_sizes[i], self.block, self.width, train, self.dtype)
    return _pooled(x)


def _pooled(x):
  """Global average pooling in at least float32: the heads, losses and the implicit
  solve's dot products stay float32 (or float64) whatever the backbone's compute dtype."""
  return jnp.mean(x.astype(jnp.promote_types(x.dtype, jnp.float32)), axis=(1, 2))


def _stage(x, i: int, num_blocks: int, block: str, width: int, train: bool, dtype):
  """Stage ``i`` (res{i+2}) of a ResNet: ``num_blocks`` blocks named ``layer{i+1}_{j}``."""
  if block not in _BLOCKS:
    raise ValueError(f"Unknown ResNet block {block!r}; use one of {sorted(_BLOCKS)}.")
  for j in range(num_blocks):
    stride = 2 if (i > 0 and j == 0) else 1
    x = _BLOCKS[block](planes=width * 2**i, stride=stride, dtype=dtype,
                       name=f"layer{i + 1}_{j}")(x, train=train)
  return x


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
# Where the shared backbone θ may end (build_model's backbone_ends_at), stage by stage.
BOUNDARIES = ("res2", "res3", "res4", "res5")
# The pretext-head entry holding the stages after a moved boundary.
TAIL_KEY = "backbone_tail"


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

  The backbone boundary is data (:func:`build_model`'s ``backbone_ends_at``): with a
  ``tail``, the shared backbone θ ends early (``backbone.pool`` False: it returns its
  feature map) and the ResNet's remaining stages belong to the pretext head as
  ``pretext_head['backbone_tail']`` (BiSSL paper, Appendix B.6: for detection, res5
  joins the projector and θ ends at C4).
  Frozen and hashable, so it can be a static argument of jitted functions.
  """
  backbone: ResNet
  projector: MLPHead
  predictor: Optional[MLPHead]
  tail: Optional[ResNetTail] = None

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
    width = feats.shape[-1] if self.tail is None else self.tail_width()
    h = jnp.zeros((1, width), jnp.float32)
    proj = self.projector.init(k_proj, h, train=False)
    head_params = {"projector": proj["params"]}
    head_stats = {"projector": proj["batch_stats"]}
    if self.predictor is not None:
      z = jnp.zeros((1, self.projector.features[-1]), jnp.float32)
      pred = self.predictor.init(k_pred, z, train=False)
      head_params["predictor"] = pred["params"]
      head_stats["predictor"] = pred["batch_stats"]
    if self.tail is not None:
      # The full ResNet's key: the tail's leaves are those the whole ResNet would have.
      fmap = jnp.zeros(feats.shape, jnp.float32)
      tail = self.tail.init(k_bb, fmap, train=False)
      head_params[TAIL_KEY], head_stats[TAIL_KEY] = tail["params"], tail["batch_stats"]
    params = {"backbone": bb["params"], "pretext_head": head_params, "downstream_head": {}}
    batch_stats = {"backbone": bb["batch_stats"], "pretext_head": head_stats}
    return params, batch_stats

  @staticmethod
  def head_rng(rng: jax.Array) -> jax.Array:
    """The key :meth:`init`'s schedule reserves for the downstream head."""
    return jax.random.split(rng, 4)[3]

  def features(self, backbone_params, backbone_stats, x, *, train: bool):
    """The shared backbone's output and its (in training, updated) statistics: pooled
    features ``(B, C)``, or with a ``tail`` the feature map ``(B, H, W, C)`` at the
    boundary."""
    return _apply_with_stats(self.backbone, backbone_params, backbone_stats, x, train)

  def tail_apply(self, tail_params, tail_stats, fmap, *, train: bool):
    """The pretext head's backbone stages on the boundary's map: pooled ``(B, C)``."""
    return _apply_with_stats(self.tail, tail_params, tail_stats, fmap, train)

  def tail_width(self) -> int:
    """Channels of the tail's pooled output."""
    expansion = _BLOCKS[self.tail.block].expansion
    return self.tail.width * 2 ** (len(self.tail.stage_sizes) - 1) * expansion

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
                predictor: Optional[str] = None, backbone_ends_at: str = "res5",
                dtype: str = "float32") -> BisslModel:
  """Builds a :class:`BisslModel` from config strings.

  Args:
    arch: ``'resnet18'`` or ``'resnet50'``.
    width_multiplier: scales the base width 64.
    cifar_stem: 3×3 stem without max-pool.
    projector: MLP spec of the projector, e.g. ``'256-256-256'``.
    predictor: MLP spec of BYOL's predictor, or None. Its last width must equal the
      projector's.
    backbone_ends_at: the last stage of the shared backbone θ: ``'res5'`` (the whole
      ResNet, the default) or ``'res4'``/``'res3'``/``'res2'``; the later stages join
      the pretext head (``'res4'``: the C4 boundary of the paper's detection setup).
    dtype: the convolutions' compute dtype, ``'float32'`` or ``'bfloat16'``. Parameters,
      BatchNorm statistics (Flax computes them in at least float32), the pooled
      features, the MLP heads and so the losses stay float32.

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
  if backbone_ends_at not in BOUNDARIES:
    raise ValueError(f"backbone_ends_at={backbone_ends_at!r}; valid choices: {BOUNDARIES}.")
  full = ARCHITECTURES[arch](width_multiplier, cifar_stem)
  if jnp.dtype(dtype) != jnp.float32:
    full = full.clone(dtype=jnp.dtype(dtype))
  shared = BOUNDARIES.index(backbone_ends_at) + 1
  tail = None
  if shared < len(full.stage_sizes):
    tail = ResNetTail(stage_sizes=tuple(full.stage_sizes), block=full.block,
                      first_stage=shared, width=full.width, dtype=full.dtype)
    full = full.clone(stage_sizes=tuple(full.stage_sizes[:shared]), pool=False)
  return BisslModel(backbone=full, projector=MLPHead(features=proj_dims), predictor=pred,
                    tail=tail)
