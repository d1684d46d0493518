"""The C4 split of a ResNet: stem + res2–res4 as the backbone, res5 as the RoI box head.

detectron2's ``R50-C4`` Faster R-CNN shares only the ResNet up to res4 (stride 16)
between the RPN and the box head; res5 runs on every RoIAlign patch (BiSSL paper
§4.3.1). Both halves are built from ``bissl_jax.models``' blocks and batch-norm
helpers with the same module names as :class:`bissl_jax.models.ResNet`
(``conv1``, ``bn1``, ``layer{i}_{j}``), so a ResNet's parameter tree splits into
the two without renaming: stages 1–3 go to :class:`ResNetC4`, stage 4 (``layer4_*``)
to :class:`Res5Head`.

The blocks put the stride of a bottleneck on its 3×3 convolution (torchvision's v1.5);
detectron2's MSRA-converted R-50 puts it on the first 1×1 (``STRIDE_IN_1X1``). The
parameter shapes are the same.
"""
from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

from bissl_jax import models


class ResNetC4(nn.Module):
  """Stem and the first three stages of :class:`bissl_jax.models.ResNet`; returns the C4 map.

  Attributes:
    stage_sizes: blocks of the first three stages, e.g. ``(3, 4, 6)`` for ResNet-50
      (a fourth entry, if given, is ignored: it belongs to the box head).
    block: ``'basic'`` or ``'bottleneck'``.
    width: channels of the stem and the first stage.
    cifar_stem: 3×3/s1 stem without max-pool (C4 stride 4 instead of 16).
  """
  stage_sizes: Sequence[int]
  block: str
  width: int = 64
  cifar_stem: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, *, train: bool):
    block_cls = models._BLOCKS[self.block]  # pylint: disable=protected-access
    conv, bn = models._conv, models._batch_norm  # pylint: disable=protected-access
    x = jnp.asarray(x, self.dtype)
    if self.cifar_stem:
      x = nn.relu(bn(train, "bn1", self.dtype)(conv(self.width, 3, 1, "conv1", self.dtype)(x)))
    else:
      x = nn.relu(bn(train, "bn1", self.dtype)(conv(self.width, 7, 2, "conv1", self.dtype)(x)))
      x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    for i, num_blocks in enumerate(self.stage_sizes[:3]):
      for j in range(num_blocks):
        stride = 2 if (i > 0 and j == 0) else 1
        x = block_cls(planes=self.width * 2**i, stride=stride, dtype=self.dtype,
                      name=f"layer{i + 1}_{j}")(x, train=train)
    return x


def c4_stride(cifar_stem: bool) -> int:
  """Image pixels per C4 feature pixel: the stem (4, or 1 for the CIFAR stem) times two."""
  return (1 if cifar_stem else 4) * 4


class Res5Head(nn.Module):
  """res5 on RoI patches, global average pooling, classifier and class-specific boxes.

  detectron2's ``Res5ROIHeads`` + ``FastRCNNOutputLayers``: the ResNet's fourth stage
  (first block stride 2: 14×14 → 7×7), mean over space, a ``num_classes + 1``-way
  classifier (the last index is background) and ``4·num_classes`` box deltas, the
  deltas of class k in columns ``4k..4k+3``. Initialisation as detectron2: normal
  weights with std 0.01 (classifier) and 0.001 (boxes), zero biases.
  """
  num_blocks: int
  block: str
  width: int
  num_classes: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, patches, *, train: bool):
    block_cls = models._BLOCKS[self.block]  # pylint: disable=protected-access
    x = jnp.asarray(patches, self.dtype)
    for j in range(self.num_blocks):
      x = block_cls(planes=self.width * 8, stride=2 if j == 0 else 1, dtype=self.dtype,
                    name=f"layer4_{j}")(x, train=train)
    pooled = jnp.mean(x.astype(jnp.promote_types(self.dtype, jnp.float32)), axis=(1, 2))
    logits = nn.Dense(self.num_classes + 1, name="cls_score", dtype=pooled.dtype,
                      kernel_init=nn.initializers.normal(0.01))(pooled)
    deltas = nn.Dense(4 * self.num_classes, name="bbox_pred", dtype=pooled.dtype,
                      kernel_init=nn.initializers.normal(0.001))(pooled)
    return logits, deltas.reshape(deltas.shape[:-1] + (self.num_classes, 4))
