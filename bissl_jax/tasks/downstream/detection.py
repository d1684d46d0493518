"""Object detection as the downstream task L_D: Faster R-CNN C4 (BiSSL paper §4.3.1, App. B.6).

The shared backbone θ is a ResNet that ends at res4 (``build_model(...,
backbone_ends_at='res4')``): its ``features`` are the C4 map. The task owns the rest
of the detector as its head φ_D, ``{'rpn', 'box_head'}`` of
:class:`bissl_jax.detection.faster_rcnn.Detector`: the RPN on C4, and res5 (under
the ResNet's names ``layer4_*``) with the classifier and the class-specific box
regressor on RoIAlign patches. :func:`box_head_from_pretext_tail` copies res5 from
the pretext head's ``backbone_tail``, as detectron2 loads res5 from the pretrained
ResNet.

Labels are a tree, not class ids: ``{'boxes' (b, M, 4), 'classes' (b, M), 'valid'
(b, M)}`` (``(x1, y1, x2, y2)`` pixels, classes ``0..num_classes-1``, ``valid`` False
on padding slots), optionally ``'image_sizes' (b, 2)`` (height, width before
padding; the whole image when absent).

The loss is the full detection loss of :func:`bissl_jax.detection.loss.detection_loss`
(four terms; proposals and sampled RoIs are constants). Its only randomness, the
anchor and RoI sampling key, is drawn in :meth:`Detection.prepare` and carried in the
inputs, so the upper level's loss is a deterministic function of its inputs.

The box head's batch norm normalises with the statistics of the RoI patches it sees,
in training and inference alike: the protocol keeps running statistics for the
backbone only (detectron2 instead freezes res5's batch norm).
"""
import dataclasses
from typing import Any, Dict, Tuple

import jax
import jax.numpy as jnp

from bissl_jax.detection.faster_rcnn import Detector, DetectorConfig, build_detector
from bissl_jax.detection.loss import detection_loss_from_c4
from bissl_jax.models import resnet
from bissl_jax.tasks.augment import normalize
from bissl_jax.types import PyTree

# The box head's batch norm keeps no running statistics (module docstring).
_NO_STATS = {"box_head": {}}


@dataclasses.dataclass(frozen=True)
class Detection:
  """Faster R-CNN on the C4 map of a ResNet with ``backbone_ends_at='res4'``.

  Build it with :func:`make_detection_task`, which takes res5's architecture from the
  model. Attributes:
    model: the model bundle (its ``features`` return the C4 map).
    image_size: side of the (square, padded) input images.
    config: the detector's settings; ``stage_sizes``, ``block``, ``width`` and
      ``cifar_stem`` are the model's.
  """
  model: Any
  image_size: int
  config: DetectorConfig

  @property
  def detector(self) -> Detector:
    return build_detector(self.config)

  def init_head(self, rng, params: PyTree, batch_stats: PyTree) -> PyTree:
    """φ_D = ``{'rpn', 'box_head'}`` from ``rng``, shaped by the model's C4 map."""
    x = jnp.zeros((1, self.image_size, self.image_size, 3), jnp.float32)
    c4 = jax.eval_shape(lambda p, s: self.model.features(p, s, x, train=False)[0],
                        params["backbone"], batch_stats["backbone"])
    heads, _ = self.detector.init_heads(rng, c4.shape)
    return heads

  def head_from_pretext(self, head_params: PyTree, pretext_head: PyTree) -> PyTree:
    """φ_D with res5 from the pretext tail (:func:`box_head_from_pretext_tail`), as
    detectron2's R50-C4 starts res5 from the pretrained ResNet (BiSSL paper, App. B.6:
    φ_P holds the ResNet's parameters beyond C4)."""
    if not pretext_head or resnet.TAIL_KEY not in pretext_head:
      raise ValueError(
          "Detection starts its box head's res5 from the pretext head's "
          f"{resnet.TAIL_KEY!r}, which this model lacks: start the stage from a pretext "
          "or BiSSL output (or a converted ResNet), not from a fine-tuned model.")
    return box_head_from_pretext_tail(head_params, pretext_head)

  def prepare(self, rng, images, *, train: bool) -> Dict[str, jax.Array]:
    """``{'images': normalised, 'key': the sampling key}``; ``rng`` None gives a fixed key.

    Images are uint8, already at ``image_size`` (boxes are in their pixels); no
    augmentation, as a flip would have to move the boxes, which ``prepare`` does not see.
    """
    del train
    key = jax.random.PRNGKey(0) if rng is None else rng
    x = normalize(jnp.asarray(images, jnp.float32) / 255.0)
    return {"images": x, "key": key}

  def _image_sizes(self, labels, n: int) -> jax.Array:
    if isinstance(labels, dict) and "image_sizes" in labels:
      return jnp.asarray(labels["image_sizes"], jnp.float32)
    return jnp.full((n, 2), float(self.image_size), jnp.float32)

  def loss(self, backbone_params: PyTree, head_params: PyTree, backbone_stats: PyTree,
           inputs, labels, *, train: bool = True) -> Tuple[jax.Array, PyTree]:
    """``(L_D, new backbone statistics)``: RPN objectness + RPN boxes + RoI classes +
    RoI boxes, with the sampling key of ``inputs``."""
    total, _, stats = self.loss_terms(backbone_params, head_params, backbone_stats, inputs,
                                      labels, train=train)
    return total, stats

  def loss_terms(self, backbone_params: PyTree, head_params: PyTree, backbone_stats: PyTree,
                 inputs, labels, *, train: bool = True):
    """``(L_D, its four terms, new backbone statistics)``."""
    images = inputs["images"]
    c4, stats = self.model.features(backbone_params, backbone_stats, images, train=train)
    batch = {"image_sizes": self._image_sizes(labels, images.shape[0]),
             "gt_boxes": labels["boxes"], "gt_classes": labels["classes"],
             "gt_valid": labels["valid"]}
    total, (terms, _, _) = detection_loss_from_c4(self.detector, head_params, _NO_STATS,
                                                  c4, batch, inputs["key"], train=True)
    return total, terms, stats

  def logits(self, backbone_params: PyTree, head_params: PyTree, backbone_stats: PyTree,
             inputs) -> Dict[str, jax.Array]:
    """Detections, fixed size: ``{'boxes' (b, D, 4), 'scores', 'classes', 'valid' (b, D)}``
    (D = ``config.detections_per_image``), what :func:`bissl_jax.detection.voc_ap`
    scores. Backbone batch norm on running statistics."""
    images = inputs["images"]
    c4, _ = self.model.features(backbone_params, backbone_stats, images, train=False)
    sizes = jnp.full((images.shape[0], 2), float(self.image_size), jnp.float32)
    return self.detector.detect_from_c4(head_params, _NO_STATS, c4, sizes,
                                        box_head_train=True)


def make_detection_task(model: Any, image_size: int,
                        config: DetectorConfig = DetectorConfig()) -> Detection:
  """The :class:`Detection` task for ``model``, with res5's architecture taken from it.

  Raises:
    ValueError: when ``model`` is not a ResNet whose backbone ends at res4.
  """
  tail = getattr(model, "tail", None)
  if tail is None or tail.first_stage != 3:
    raise ValueError("Detection needs a ResNet whose shared backbone ends at res4 (the C4 "
                     "map); build it with build_model(..., backbone_ends_at='res4').")
  config = dataclasses.replace(config, stage_sizes=tuple(tail.stage_sizes), block=tail.block,
                               width=tail.width, cifar_stem=model.backbone.cifar_stem)
  return Detection(model=model, image_size=int(image_size), config=config)


def box_head_from_pretext_tail(head_params: PyTree, pretext_head: PyTree) -> PyTree:
  """φ_D with the box head's res5 (``layer4_*``) copied from
  ``pretext_head['backbone_tail']``, as detectron2 initialises res5 from the
  pretrained ResNet; the RPN, classifier and box regressor are kept."""
  tail = pretext_head[resnet.TAIL_KEY]
  box = dict(head_params["box_head"])
  res5 = {k for k in box if k.startswith("layer4_")}
  if res5 != set(tail):
    raise ValueError(f"The pretext tail holds {sorted(tail)} but the box head's res5 is "
                     f"{sorted(res5)}; build both from the same ResNet.")
  box.update(jax.tree_util.tree_map(jnp.asarray, dict(tail)))
  return {**head_params, "box_head": box}
