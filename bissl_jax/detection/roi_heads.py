"""RoI-head side of Faster R-CNN: proposal labelling and sampling, and inference post-processing."""
from typing import Dict, Tuple

import jax
import jax.numpy as jnp

from bissl_jax.detection import boxes as B
from bissl_jax.detection.nms import batched_nms


def sample_proposals(key: jax.Array, proposals: jax.Array, proposal_valid: jax.Array,
                     gt_boxes: jax.Array, gt_classes: jax.Array, gt_valid: jax.Array, *,
                     num_classes: int, iou_threshold: float, batch_size_per_image: int,
                     positive_fraction: float) -> Dict[str, jax.Array]:
  """Labels and samples the RoIs of one image (detectron2's ``label_and_sample_proposals``).

  The ground-truth boxes are appended to the proposals (``PROPOSAL_APPEND_GT``), every
  candidate is matched with one IoU threshold (foreground at ``>= iou_threshold``, no
  low-quality matches), and ``batch_size_per_image`` are sampled with at most
  ``positive_fraction`` foreground.

  Returns:
    ``{'boxes' (S, 4), 'classes' (S,), 'targets' (S, 4), 'valid' (S,)}`` for
    ``S = batch_size_per_image``: the sampled RoIs, their class (``num_classes`` for
    background), box-regression targets (weights 10, 10, 5, 5; zero unless
    foreground) and the mask of used slots (foreground first).
  """
  gt_boxes, gt_classes = jnp.asarray(gt_boxes), jnp.asarray(gt_classes)
  boxes = jnp.concatenate([proposals, gt_boxes], axis=0)
  valid = jnp.concatenate([proposal_valid, gt_valid], axis=0)
  iou = B.box_iou(gt_boxes, boxes)
  matched, labels = B.match_boxes(iou, gt_valid, (iou_threshold,), (0, 1), False)
  labels = jnp.where(valid, labels, B.IGNORE)
  sampled = B.sample_labels(key, labels, batch_size_per_image, positive_fraction)
  idx, used = B.sampled_indices(sampled, batch_size_per_image)
  fg = used & (labels[idx] == B.FOREGROUND)
  roi_boxes = boxes[idx]
  matched_gt = gt_boxes[matched[idx]]
  # Unused slots may hold empty boxes: encode against a unit box there (then zeroed).
  safe_ref = jnp.where(fg[:, None], roi_boxes, jnp.asarray([0.0, 0.0, 1.0, 1.0]))
  safe_tgt = jnp.where(fg[:, None], matched_gt, jnp.asarray([0.0, 0.0, 1.0, 1.0]))
  targets = B.encode_boxes(safe_ref, safe_tgt, B.ROI_BOX_WEIGHTS)
  classes = jnp.where(fg, gt_classes[matched[idx]], num_classes)
  return {"boxes": roi_boxes, "classes": classes.astype(jnp.int32),
          "targets": jnp.where(fg[:, None], targets, 0.0), "valid": used}


def postprocess(proposals: jax.Array, proposal_valid: jax.Array, logits: jax.Array,
                deltas: jax.Array, image_size: jax.Array, *, score_threshold: float,
                nms_threshold: float, detections_per_image: int
                ) -> Dict[str, jax.Array]:
  """Final detections of one image (detectron2's ``fast_rcnn_inference_single_image``).

  Softmax class scores; per class, the proposal decoded with that class's deltas and
  clipped to ``image_size = (height, width)``; every (box, class) pair scoring above
  ``score_threshold`` enters a per-class NMS; the best ``detections_per_image``
  survive.

  Args:
    proposals: ``(R, 4)``; proposal_valid: ``(R,)``.
    logits: ``(R, K + 1)``; deltas: ``(R, K, 4)``.

  Returns:
    ``{'boxes' (D, 4), 'scores' (D,), 'classes' (D,), 'valid' (D,)}`` with
    ``D = detections_per_image``, in decreasing score order.
  """
  proposals, deltas = jnp.asarray(proposals), jnp.asarray(deltas)
  num_rois, num_classes = deltas.shape[:2]
  probs = jax.nn.softmax(_at_least_f32(logits), axis=-1)[:, :num_classes]
  ref = jnp.broadcast_to(proposals[:, None, :], deltas.shape)
  boxes = B.clip_boxes(B.decode_boxes(ref, deltas, B.ROI_BOX_WEIGHTS),
                       image_size[0], image_size[1])
  boxes, scores = boxes.reshape(-1, 4), probs.reshape(-1)
  classes = jnp.tile(jnp.arange(num_classes, dtype=jnp.int32), num_rois)
  valid = (jnp.repeat(proposal_valid, num_classes) & (scores > score_threshold)
           & jnp.all(jnp.isfinite(boxes), axis=1))
  keep, keep_valid = batched_nms(boxes, scores, classes, nms_threshold,
                                 detections_per_image, valid)
  return {"boxes": boxes[keep], "scores": jnp.where(keep_valid, scores[keep], 0.0),
          "classes": classes[keep], "valid": keep_valid}


def roi_head_losses(logits: jax.Array, deltas: jax.Array, classes: jax.Array,
                    targets: jax.Array, valid: jax.Array, smooth_l1_beta: float
                    ) -> Tuple[jax.Array, jax.Array]:
  """Fast R-CNN losses over the sampled RoIs of the batch (detectron2's ``FastRCNNOutputLayers``).

  Classification: cross-entropy averaged over the used RoIs. Box regression: smooth-L1
  (``beta = 0``: L1) of the deltas of each foreground RoI's own class, summed and divided
  by the number of used RoIs (not of foreground ones).

  Args:
    logits: ``(S, K + 1)``; deltas: ``(S, K, 4)``; classes, valid: ``(S,)``;
      targets: ``(S, 4)`` (S: all sampled RoIs of the batch).
  """
  num_classes = deltas.shape[1]
  logits = _at_least_f32(logits)
  count = jnp.maximum(jnp.sum(valid), 1).astype(logits.dtype)
  logp = jax.nn.log_softmax(logits, axis=-1)
  nll = -jnp.take_along_axis(logp, classes[:, None], axis=1)[:, 0]
  loss_cls = jnp.sum(jnp.where(valid, nll, 0.0)) / count
  fg = valid & (classes < num_classes)
  own = jnp.take_along_axis(deltas, jnp.minimum(classes, num_classes - 1)[:, None, None],
                            axis=1)[:, 0]
  reg = jnp.sum(smooth_l1(_at_least_f32(own) - targets, smooth_l1_beta), axis=1)
  loss_box = jnp.sum(jnp.where(fg, reg, 0.0)) / count
  return loss_cls, loss_box


def _at_least_f32(x: jax.Array) -> jax.Array:
  """Losses and scores in float32, or float64 when the network runs in float64."""
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def smooth_l1(x: jax.Array, beta: float) -> jax.Array:
  """detectron2's ``smooth_l1_loss`` elementwise: L1 when ``beta < 1e-5``."""
  if beta < 1e-5:
    return jnp.abs(x)
  ax = jnp.abs(x)
  return jnp.where(ax < beta, 0.5 * x * x / beta, ax - 0.5 * beta)
