"""The detection loss L_D of BiSSL's detection upper level (paper §4.3.1): Faster R-CNN's four terms.

``L_D = L_rpn_cls + L_rpn_loc + L_roi_cls + L_roi_box``, each with weight 1, as
detectron2 computes them:

* RPN objectness: binary cross-entropy with logits over the sampled anchors (256 per
  image, at most half foreground), summed and divided by ``256 · images`` (the
  nominal sample count, as detectron2 does, also when fewer anchors were sampled);
* RPN boxes: smooth-L1 with ``beta = 0`` (L1) on the deltas of the sampled foreground
  anchors (weights 1, 1, 1, 1), same normaliser;
* RoI classification: cross-entropy averaged over the sampled RoIs (512 per image, at
  most a quarter foreground, the ground-truth boxes appended to the proposals);
* RoI boxes: L1 on the class-specific deltas of the foreground RoIs (weights
  10, 10, 5, 5), summed and divided by the number of sampled RoIs.

Proposals, matching and sampling are constants: the RPN outputs enter proposal
selection through ``stop_gradient``, and the sampled RoIs do too. Gradients reach the
backbone through the RPN losses and through RoIAlign's features.
"""
from typing import Dict, Optional, Tuple

import jax
import jax.numpy as jnp
import optax

from bissl_jax.detection.faster_rcnn import Detector
from bissl_jax.detection.roi_heads import roi_head_losses, sample_proposals, smooth_l1
from bissl_jax.detection.rpn import anchor_targets

LOSS_TERMS = ("loss_rpn_cls", "loss_rpn_loc", "loss_cls", "loss_box_reg")


def _rpn_losses(detector: Detector, key, c4, logits, deltas, batch):
  c = detector.config
  anchors = detector.anchors(c4.shape[1:3])
  n = logits.shape[0]
  targets_of = lambda k, g, v: anchor_targets(
      k, anchors, g, v, thresholds=c.rpn_iou_thresholds,
      batch_size_per_image=c.rpn_batch_size_per_image,
      positive_fraction=c.rpn_positive_fraction)
  labels, targets = jax.vmap(targets_of)(jax.random.split(key, n), batch["gt_boxes"],
                                         batch["gt_valid"])
  normaliser = float(c.rpn_batch_size_per_image * n)
  bce = optax.sigmoid_binary_cross_entropy(logits, (labels == 1).astype(logits.dtype))
  loss_cls = jnp.sum(jnp.where(labels >= 0, bce, 0.0)) / normaliser
  l1 = jnp.sum(smooth_l1(deltas - targets, c.rpn_smooth_l1_beta), axis=-1)
  loss_loc = jnp.sum(jnp.where(labels == 1, l1, 0.0)) / normaliser
  return loss_cls, loss_loc


def sample_rois(detector: Detector, key, proposals, proposal_valid, batch):
  """Sampled RoIs of every image (constants): dict of ``(N, S, ...)`` arrays."""
  c = detector.config
  n = proposals.shape[0]
  sample = lambda k, p, v, g, gc, gv: sample_proposals(
      k, p, v, g, gc, gv, num_classes=c.num_classes, iou_threshold=c.roi_iou_threshold,
      batch_size_per_image=c.roi_batch_size_per_image,
      positive_fraction=c.roi_positive_fraction)
  rois = jax.vmap(sample)(jax.random.split(key, n), proposals, proposal_valid,
                          batch["gt_boxes"], batch["gt_classes"], batch["gt_valid"])
  return jax.lax.stop_gradient(rois)


def detection_loss(detector: Detector, params, batch_stats, batch: Dict[str, jax.Array],
                   key: jax.Array, *, train: bool = True,
                   rois: Optional[Dict[str, jax.Array]] = None
                   ) -> Tuple[jax.Array, Tuple[Dict[str, jax.Array], dict, dict]]:
  """L_D on one batch, its four terms and the updated batch-norm statistics.

  Args:
    detector: the :class:`Detector`.
    params, batch_stats: its trees (``Detector.init``).
    batch: ``images (N, H, W, C)`` (normalised, padded to a common size),
      ``image_sizes (N, 2)`` (height, width before padding), ``gt_boxes (N, M, 4)``,
      ``gt_classes (N, M)`` ints in ``0..num_classes-1`` and ``gt_valid (N, M)``,
      the mask of real boxes (padding has False).
    key: PRNG key of the anchor and RoI sampling.
    train: batch norm from batch statistics (updated) or, when False, from the
      running statistics (detectron2 freezes them).
    rois: the sampled RoIs of an earlier call (its third auxiliary output) to reuse
      instead of selecting and sampling proposals: the loss as a function of the
      parameters with the proposals held fixed, whose derivative the gradient is.

  Returns:
    ``(loss, (terms, batch_stats, rois))`` with ``terms`` keyed by :data:`LOSS_TERMS`
    and ``rois`` the sampled RoIs (``boxes``, ``classes``, ``targets``, ``valid``).
  """
  c4, bb_stats = detector.features(params["backbone"], batch_stats["backbone"],
                                   batch["images"], train=train)
  total, (terms, box_stats, rois) = detection_loss_from_c4(
      detector, params, batch_stats, c4, batch, key, train=train, rois=rois)
  return total, (terms, {"backbone": bb_stats, "box_head": box_stats}, rois)


def detection_loss_from_c4(detector: Detector, params, batch_stats, c4: jax.Array,
                           batch: Dict[str, jax.Array], key: jax.Array, *,
                           train: bool = True, rois: Optional[Dict[str, jax.Array]] = None
                           ) -> Tuple[jax.Array, Tuple[Dict[str, jax.Array], dict, dict]]:
  """:func:`detection_loss` on a given C4 map: the heads' part, so the backbone may be
  any model's (the BiSSL detection task's θ).

  ``params`` needs ``'rpn'`` and ``'box_head'``, ``batch_stats`` ``'box_head'`` and
  ``batch`` everything but ``images``. Returns ``(loss, (terms, box-head statistics,
  rois))``; ``train`` is the box head's batch-norm mode.
  """
  k_rpn, k_roi = jax.random.split(key)
  logits, deltas = detector.rpn(params["rpn"], c4)
  rpn_cls, rpn_loc = _rpn_losses(detector, k_rpn, c4, logits, deltas, batch)
  if rois is None:
    proposals, valid = detector.proposals(c4, logits, deltas, batch["image_sizes"],
                                          train=True)
    rois = sample_rois(detector, k_roi, proposals, valid, batch)
  cls, box, box_stats = detector.box_predictions(
      params["box_head"], batch_stats["box_head"], c4, rois["boxes"], train=train)
  flat = lambda x: x.reshape((-1,) + x.shape[2:])
  roi_cls, roi_box = roi_head_losses(flat(cls), flat(box), flat(rois["classes"]),
                                     flat(rois["targets"]), flat(rois["valid"]),
                                     detector.config.roi_smooth_l1_beta)
  terms = dict(zip(LOSS_TERMS, (rpn_cls, rpn_loc, roi_cls, roi_box)))
  total = rpn_cls + rpn_loc + roi_cls + roi_box
  return total, (terms, box_stats, rois)
