"""The C4 split of a ResNet: stem + res2–res4 as the backbone, res5 as the RoI box head.

detectron2's ``R50-C4`` Faster R-CNN shares only the ResNet up to res4 (stride 16)
between the RPN and the box head; res5 runs on every RoIAlign patch (BiSSL paper
§4.3.1). The backbone is :class:`bissl_jax.models.resnet.ResNet` itself with three stages
(:func:`c4_resnet`, :func:`c4_features`); :class:`Res5Head` builds res5 from the same
blocks under the ResNet's names (``layer4_{j}``). A ResNet's parameter tree thus
splits into the two without renaming: the stem and ``layer1_*``–``layer3_*`` to the
backbone, ``layer4_*`` to the box head.

The blocks put the stride of a bottleneck on its 3×3 convolution (torchvision's v1.5);
detectron2's MSRA-converted R-50 puts it on the first 1×1 (``STRIDE_IN_1X1``). The
parameter shapes are the same.
"""
from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

from bissl_jax.models import resnet


def c4_resnet(stage_sizes: Sequence[int], block: str, width: int = 64,
              cifar_stem: bool = False, dtype: Any = jnp.float32) -> resnet.ResNet:
  """The :class:`bissl_jax.models.resnet.ResNet` with only its first three stages (res2–res4).

  Its parameter tree is the full ResNet's without ``layer4_*``. A fourth entry of
  ``stage_sizes``, if given, is dropped: it belongs to the box head.
  """
  return resnet.ResNet(stage_sizes=tuple(stage_sizes[:3]), block=block, width=width,
                       cifar_stem=cifar_stem, dtype=dtype)


def c4_features(net: resnet.ResNet, variables, images, *, train: bool):
  """Runs ``net`` (from :func:`c4_resnet`) and returns its C4 map and batch statistics.

  The ResNet itself ends in global average pooling; the C4 map is the output of its
  last block, read with Flax's ``capture_intermediates`` (the pooling is then dead
  code that XLA drops).

  Returns:
    ``(c4 (N, H/stride, W/stride, C), batch_stats)``, the statistics updated when
    ``train``.
  """
  last = f"layer3_{net.stage_sizes[2] - 1}"
  capture = lambda module, method: module.name == last and method == "__call__"
  mutable = ["intermediates", "batch_stats"] if train else ["intermediates"]
  _, state = net.apply(variables, images, train=train, mutable=mutable,
                       capture_intermediates=capture)
  stats = state["batch_stats"] if train else variables["batch_stats"]
  return state["intermediates"][last]["__call__"][0], stats


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
    block_cls = resnet._BLOCKS[self.block]  # pylint: disable=protected-access
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
