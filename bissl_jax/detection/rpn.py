"""Region proposal network on the C4 map: head, anchor targets and proposal selection."""
from typing import Any, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from bissl_jax.detection import boxes as B
from bissl_jax.detection.nms import nms


class RPNHead(nn.Module):
  """detectron2's ``StandardRPNHead``: a 3×3 conv + ReLU, then per anchor one objectness
  logit and 4 box deltas (1×1 convs); weights normal with std 0.01, zero biases.

  Returns ``(logits (N, H·W·A), deltas (N, H·W·A, 4))`` in the row order of
  :func:`bissl_jax.detection.boxes.grid_anchors`.
  """
  num_anchors: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, c4):
    init = nn.initializers.normal(0.01)
    conv = lambda ch, k, name: nn.Conv(ch, (k, k), padding=((k // 2, k // 2),) * 2,
                                       kernel_init=init, dtype=self.dtype, name=name)
    x = nn.relu(conv(c4.shape[-1], 3, "conv")(c4))
    logits = conv(self.num_anchors, 1, "objectness_logits")(x)
    deltas = conv(4 * self.num_anchors, 1, "anchor_deltas")(x)
    n = c4.shape[0]
    out = jnp.promote_types(self.dtype, jnp.float32)  # Losses in at least float32.
    return logits.reshape(n, -1).astype(out), deltas.reshape(n, -1, 4).astype(out)


def anchor_targets(key: jax.Array, anchors: jax.Array, gt_boxes: jax.Array,
                   gt_valid: jax.Array, *, thresholds: Sequence[float],
                   batch_size_per_image: int, positive_fraction: float
                   ) -> Tuple[jax.Array, jax.Array]:
  """Sampled anchor labels and regression targets of one image.

  Anchors are matched with IoU thresholds (low, high) and labels (0, -1, 1) with
  low-quality matches allowed, then ``batch_size_per_image`` are sampled. Anchors
  crossing the image border are kept (detectron2's ``BOUNDARY_THRESH = -1``).

  Returns:
    ``(labels (A,), target_deltas (A, 4))``: 1 / 0 for sampled foreground /
    background, -1 elsewhere; deltas (weights 1, 1, 1, 1) to the matched box, used
    on foreground anchors only.
  """
  anchors, gt_boxes = jnp.asarray(anchors), jnp.asarray(gt_boxes)
  iou = B.box_iou(gt_boxes, anchors)
  matched, labels = B.match_boxes(iou, gt_valid, thresholds, (0, -1, 1), True)
  labels = B.sample_labels(key, labels, batch_size_per_image, positive_fraction)
  targets = B.encode_boxes(anchors, gt_boxes[matched], B.RPN_BOX_WEIGHTS)
  targets = jnp.where((labels == 1)[:, None], targets, 0.0)
  return labels, targets


def select_proposals(anchors: jax.Array, logits: jax.Array, deltas: jax.Array,
                     image_size: jax.Array, *, pre_nms_topk: int, post_nms_topk: int,
                     nms_threshold: float) -> Tuple[jax.Array, jax.Array]:
  """Proposals of one image (detectron2's ``find_top_rpn_proposals``, one level).

  The ``pre_nms_topk`` highest-logit anchors are decoded, clipped to the image
  ``image_size = (height, width)``, empty or non-finite boxes dropped, NMS applied
  and at most ``post_nms_topk`` kept. Fixed-size output, in decreasing logit order.

  Returns:
    ``(boxes (post_nms_topk, 4), valid (post_nms_topk,))``.
  """
  anchors, deltas = jnp.asarray(anchors), jnp.asarray(deltas)
  k = min(pre_nms_topk, logits.shape[0])
  top_logits, idx = jax.lax.top_k(logits, k)
  boxes = B.decode_boxes(anchors[idx], deltas[idx], B.RPN_BOX_WEIGHTS)
  boxes = B.clip_boxes(boxes, image_size[0], image_size[1])
  valid = ((boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
           & jnp.all(jnp.isfinite(boxes), axis=1) & jnp.isfinite(top_logits))
  keep, keep_valid = nms(boxes, top_logits, nms_threshold, post_nms_topk, valid)
  return boxes[keep], keep_valid
