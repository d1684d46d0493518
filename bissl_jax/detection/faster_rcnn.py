"""Faster R-CNN with a ResNet C4 backbone and a res5 box head (detectron2 ``R50-C4``).

The BiSSL paper's detection model (§4.3.1, Appendix B.6): the backbone is a ResNet up
to res4 (stride 16); an RPN on the C4 map proposes boxes; RoIAlign cuts a 14×14 patch
per proposal from C4; res5, average pooling, a (classes + 1)-way classifier and
class-specific box regression score and refine them.

:class:`Detector` bundles the three networks, like :class:`bissl_jax.models.resnet.BisslModel`,
as pure functions of plain parameter trees: ``params = {'backbone', 'rpn',
'box_head'}`` and ``batch_stats = {'backbone', 'box_head'}``. The backbone's tree is
that of the ResNet's stem and first three stages; ``box_head`` holds ``layer4_*``
(res5) and the ``cls_score``/``bbox_pred`` layers.
"""
import dataclasses
from typing import Any, Dict, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from bissl_jax.detection import boxes as B
from bissl_jax.models import resnet
from bissl_jax.detection.backbone import Res5Head, c4_features, c4_resnet, c4_stride
from bissl_jax.detection.roi_align import roi_align
from bissl_jax.detection.roi_heads import postprocess
from bissl_jax.detection.rpn import RPNHead, select_proposals
from bissl_jax.types import PyTree



@dataclasses.dataclass(frozen=True)
class DetectorConfig:
  """Architecture and the fixed sizes of every sampling and selection step.

  Defaults are detectron2's ``R50-C4`` Faster R-CNN for VOC (20 classes). Frozen and
  hashable, so it can be a static argument of jitted functions.
  """
  num_classes: int = 20
  stage_sizes: Tuple[int, ...] = (3, 4, 6, 3)
  block: str = "bottleneck"
  width: int = 64
  cifar_stem: bool = False
  anchor_sizes: Tuple[float, ...] = (32.0, 64.0, 128.0, 256.0, 512.0)
  aspect_ratios: Tuple[float, ...] = (0.5, 1.0, 2.0)
  anchor_offset: float = 0.0
  rpn_iou_thresholds: Tuple[float, float] = (0.3, 0.7)
  rpn_batch_size_per_image: int = 256
  rpn_positive_fraction: float = 0.5
  rpn_nms_threshold: float = 0.7
  pre_nms_topk_train: int = 12000
  post_nms_topk_train: int = 2000
  pre_nms_topk_test: int = 6000
  post_nms_topk_test: int = 1000
  rpn_smooth_l1_beta: float = 0.0
  roi_output_size: int = 14
  roi_sampling_ratio: int = 0
  roi_iou_threshold: float = 0.5
  roi_batch_size_per_image: int = 512
  roi_positive_fraction: float = 0.25
  roi_smooth_l1_beta: float = 0.0
  score_threshold: float = 0.05
  test_nms_threshold: float = 0.5
  detections_per_image: int = 100
  dtype: Any = jnp.float32  # Computation dtype of the networks (float64 for gradient checks).

  @property
  def num_anchors(self) -> int:
    return len(self.anchor_sizes) * len(self.aspect_ratios)

  @property
  def stride(self) -> int:
    return c4_stride(self.cifar_stem)


def tiny_config(num_classes: int = 10) -> DetectorConfig:
  """A CPU-sized detector for 64×64 canvases: ResNet-18-style basic blocks, width 8,
  the 3×3 stem (C4 stride 4), two anchor sizes and small sampling budgets."""
  return DetectorConfig(
      num_classes=num_classes, stage_sizes=(1, 1, 1, 1), block="basic", width=8,
      cifar_stem=True, anchor_sizes=(16.0, 32.0), rpn_batch_size_per_image=64,
      pre_nms_topk_train=300, post_nms_topk_train=32, pre_nms_topk_test=300,
      post_nms_topk_test=32, roi_output_size=6, roi_sampling_ratio=2,
      roi_batch_size_per_image=32, detections_per_image=16)


@dataclasses.dataclass(frozen=True)
class Detector:
  """The detector's networks as pure functions of parameter trees (see the module docstring)."""
  config: DetectorConfig

  @property
  def backbone(self) -> resnet.ResNet:
    c = self.config
    return c4_resnet(c.stage_sizes, c.block, c.width, c.cifar_stem, c.dtype)

  @property
  def rpn_head(self) -> RPNHead:
    return RPNHead(num_anchors=self.config.num_anchors, dtype=self.config.dtype)

  @property
  def box_head(self) -> Res5Head:
    c = self.config
    return Res5Head(num_blocks=c.stage_sizes[3], block=c.block, width=c.width,
                    num_classes=c.num_classes, dtype=c.dtype)

  def init(self, rng: jax.Array, image_shape: Sequence[int], channels: int = 3
           ) -> Tuple[PyTree, PyTree]:
    """``(params, batch_stats)`` for images of ``image_shape = (height, width)``."""
    k_bb, k_rpn, k_box = jax.random.split(rng, 3)
    x = jnp.zeros((1, *image_shape, channels), jnp.float32)
    bb = self.backbone.init(k_bb, x, train=False)
    c4 = jax.eval_shape(lambda v: c4_features(self.backbone, v, x, train=False)[0], bb)
    heads, head_stats = self._init_heads(k_rpn, k_box, c4.shape)
    return {"backbone": bb["params"], **heads}, {"backbone": bb["batch_stats"], **head_stats}

  def init_heads(self, rng: jax.Array, c4_shape: Sequence[int]) -> Tuple[PyTree, PyTree]:
    """The RPN and the box head alone, for a C4 map of ``c4_shape = (N, H, W, C)`` from
    another model's backbone: ``({'rpn', 'box_head'}, {'box_head'})``."""
    return self._init_heads(*jax.random.split(rng), c4_shape)

  def _init_heads(self, k_rpn, k_box, c4_shape):
    rpn = self.rpn_head.init(k_rpn, jnp.zeros(c4_shape, jnp.float32))
    size = self.config.roi_output_size
    patch = jnp.zeros((1, size, size, c4_shape[-1]), jnp.float32)
    box = self.box_head.init(k_box, patch, train=False)
    return ({"rpn": rpn["params"], "box_head": box["params"]},
            {"box_head": box["batch_stats"]})

  def features(self, params, stats, images, *, train: bool):
    """C4 map ``(N, H/stride, W/stride, C)`` and the (in training, updated) statistics."""
    return c4_features(self.backbone, {"params": params, "batch_stats": stats}, images,
                       train=train)

  def rpn(self, params, c4):
    """RPN logits ``(N, A_total)`` and deltas ``(N, A_total, 4)``."""
    return self.rpn_head.apply({"params": params}, c4)

  def anchors(self, feature_hw: Sequence[int]) -> jax.Array:
    """The anchors of a C4 map of size ``feature_hw`` (static), ``(H·W·A, 4)``."""
    c = self.config
    return jnp.asarray(B.grid_anchors(int(feature_hw[0]), int(feature_hw[1]), c.stride,
                                      c.anchor_sizes, c.aspect_ratios, c.anchor_offset))

  def proposals(self, c4, logits, deltas, image_sizes, *, train: bool):
    """Fixed-size proposals per image (constants: no gradient), ``(N, P, 4)`` + mask."""
    c = self.config
    pre = c.pre_nms_topk_train if train else c.pre_nms_topk_test
    post = c.post_nms_topk_train if train else c.post_nms_topk_test
    anchors = self.anchors(c4.shape[1:3])
    select = lambda l, d, s: select_proposals(
        anchors, l, d, s, pre_nms_topk=pre, post_nms_topk=post,
        nms_threshold=c.rpn_nms_threshold)
    logits, deltas = jax.lax.stop_gradient((logits, deltas))
    return jax.vmap(select)(logits, deltas, image_sizes)

  def box_predictions(self, params, stats, c4, rois, *, train: bool):
    """Class logits ``(N, R, K+1)``, deltas ``(N, R, K, 4)`` of RoIs ``(N, R, 4)``, stats."""
    c = self.config
    n, r = rois.shape[:2]
    patches = roi_align(c4, rois, c.roi_output_size, 1.0 / c.stride, c.roi_sampling_ratio)
    patches = patches.reshape((n * r,) + patches.shape[2:])
    variables = {"params": params, "batch_stats": stats}
    if train:
      (logits, deltas), mutated = self.box_head.apply(variables, patches, train=True,
                                                      mutable=["batch_stats"])
      stats = mutated["batch_stats"]
    else:
      logits, deltas = self.box_head.apply(variables, patches, train=False)
    return logits.reshape(n, r, -1), deltas.reshape(n, r, c.num_classes, 4), stats

  def detect(self, params, stats, images, image_sizes) -> Dict[str, jax.Array]:
    """Inference: ``{'boxes' (N, D, 4), 'scores', 'classes', 'valid' (N, D)}``.

    ``image_sizes (N, 2)`` holds each image's ``(height, width)`` before padding, for
    clipping. Batch norm uses the running statistics.
    """
    c4, _ = self.features(params["backbone"], stats["backbone"], images, train=False)
    return self.detect_from_c4(params, stats, c4, image_sizes)

  def detect_from_c4(self, params, stats, c4, image_sizes, *, box_head_train: bool = False
                     ) -> Dict[str, jax.Array]:
    """:meth:`detect` on a given C4 map: the heads only (``params['rpn']``,
    ``params['box_head']``, ``stats['box_head']``), so the backbone may be any
    model's. ``box_head_train`` normalises res5 with the statistics of its RoI
    patches instead of the running ones."""
    c = self.config
    logits, deltas = self.rpn(params["rpn"], c4)
    props, valid = self.proposals(c4, logits, deltas, image_sizes, train=False)
    cls, box, _ = self.box_predictions(params["box_head"], stats["box_head"], c4, props,
                                       train=box_head_train)
    post = lambda p, v, l, d, s: postprocess(
        p, v, l, d, s, score_threshold=c.score_threshold,
        nms_threshold=c.test_nms_threshold, detections_per_image=c.detections_per_image)
    return jax.vmap(post)(props, valid, cls, box, image_sizes)

def build_detector(config: DetectorConfig = DetectorConfig()) -> Detector:
  """Checks ``config`` and returns the :class:`Detector` it describes."""
  if config.block not in ("basic", "bottleneck"):
    raise ValueError(f"block={config.block!r} is not a ResNet block; use 'basic' or "
                     "'bottleneck'.")
  if len(config.stage_sizes) != 4:
    raise ValueError(f"stage_sizes={config.stage_sizes} needs four stages: res2–res4 form "
                     "the backbone, res5 the box head (e.g. (3, 4, 6, 3)).")
  if config.num_classes < 1:
    raise ValueError(f"num_classes={config.num_classes} must be at least 1 (background "
                     "is added by the detector).")
  return Detector(config=config)


def count_params(tree: PyTree) -> int:
  """Number of scalars in a tree of arrays or shape structs."""
  return int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(tree)))
