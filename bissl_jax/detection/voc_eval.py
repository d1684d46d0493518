"""PASCAL VOC average precision (AP50), on the host in NumPy.

Follows the VOC devkit as detectron2's ``PascalVOCDetectionEvaluator`` does, per class:
detections of all images are sorted by decreasing score (stable: ties keep their input
order, image by image); each is matched to the not-yet-matched ground-truth box of the
same image and class with the highest IoU. With IoU > ``iou_threshold`` (strictly):
a *difficult* box makes the detection neither true nor false positive; a box already
matched makes it a false positive (duplicate); otherwise it is a true positive.
Without such a box it is a false positive. Recall counts only non-difficult boxes.

Interpolation: ``use_07_metric=True`` is VOC2007's 11-point AP (the mean over
``t ∈ {0, 0.1, …, 1}`` of the highest precision at recall ``>= t``), which
detectron2's VOC2007 evaluator reports; ``False`` is the area under the
monotone precision envelope (VOC2010 and later).

Difference from detectron2: IoU uses this package's continuous box convention
(area ``(x2-x1)·(y2-y1)``), not the devkit's inclusive-pixel ``+1``.
A class with no non-difficult ground truth has no AP (NaN) and is left out of the mean.
"""
from typing import Mapping, Optional, Sequence

import numpy as np


def _iou_one_to_many(box, boxes):
  iw = np.clip(np.minimum(box[2], boxes[:, 2]) - np.maximum(box[0], boxes[:, 0]), 0, None)
  ih = np.clip(np.minimum(box[3], boxes[:, 3]) - np.maximum(box[1], boxes[:, 1]), 0, None)
  inter = iw * ih
  union = ((box[2] - box[0]) * (box[3] - box[1])
           + (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]) - inter)
  return np.where(union > 0, inter / np.where(union > 0, union, 1.0), 0.0)


def average_precision(recall: np.ndarray, precision: np.ndarray,
                      use_07_metric: bool = True) -> float:
  """AP from a precision/recall curve (see the module docstring for the interpolation)."""
  if use_07_metric:
    points = [np.max(precision[recall >= t]) if np.any(recall >= t) else 0.0
              for t in np.arange(0.0, 1.1, 0.1)]
    return float(np.sum(points) / 11.0)
  mrec = np.concatenate([[0.0], recall, [1.0]])
  mpre = np.concatenate([[0.0], precision, [0.0]])
  mpre = np.maximum.accumulate(mpre[::-1])[::-1]
  i = np.flatnonzero(mrec[1:] != mrec[:-1])
  return float(np.sum((mrec[i + 1] - mrec[i]) * mpre[i + 1]))


def _unpad(item: Mapping, keys: Sequence[str]):
  valid = item.get("valid")
  out = {}
  for k in keys:
    if k not in item:
      continue
    v = np.asarray(item[k])
    out[k] = v if valid is None else v[np.asarray(valid, bool)]
  return out


def _class_ap(c, dets, gts, iou_threshold, use_07_metric):
  gt_c = []
  for g in gts:
    sel = g["classes"] == c
    diff = g.get("difficult", np.zeros(len(g["classes"]), bool))
    gt_c.append((g["boxes"][sel], np.asarray(diff, bool)[sel]))
  npos = sum(int((~d).sum()) for _, d in gt_c)
  if npos == 0:
    return float("nan")
  image_ids, scores, boxes = [], [], []
  for i, d in enumerate(dets):
    sel = d["classes"] == c
    image_ids.append(np.full(int(sel.sum()), i))
    scores.append(d["scores"][sel])
    boxes.append(d["boxes"][sel].reshape(-1, 4))
  image_ids, scores = np.concatenate(image_ids), np.concatenate(scores)
  boxes = np.concatenate(boxes)
  order = np.argsort(-scores, kind="stable")
  taken = [np.zeros(len(b), bool) for b, _ in gt_c]
  tp, fp = np.zeros(len(order)), np.zeros(len(order))
  for rank, k in enumerate(order):
    gt_boxes, difficult = gt_c[image_ids[k]]
    if len(gt_boxes) == 0:
      fp[rank] = 1
      continue
    iou = _iou_one_to_many(boxes[k], gt_boxes)
    j = int(np.argmax(iou))
    if iou[j] > iou_threshold:
      if difficult[j]:
        continue
      if taken[image_ids[k]][j]:
        fp[rank] = 1
      else:
        tp[rank], taken[image_ids[k]][j] = 1, True
    else:
      fp[rank] = 1
  tp, fp = np.cumsum(tp), np.cumsum(fp)
  recall = tp / npos
  precision = tp / np.maximum(tp + fp, np.finfo(np.float64).eps)
  return average_precision(recall, precision, use_07_metric)


def voc_ap(detections: Sequence[Mapping], ground_truth: Sequence[Mapping],
           iou_threshold: float = 0.5, use_07_metric: bool = True,
           num_classes: Optional[int] = None) -> dict:
  """VOC average precision per class and their mean (AP50 at the default threshold).

  Args:
    detections: one mapping per image with ``boxes (K, 4)``, ``scores (K,)``,
      ``classes (K,)`` (ints in ``0..num_classes-1``) and optionally ``valid (K,)``,
      the padding mask of the detector's fixed-size output.
    ground_truth: one mapping per image (same order) with ``boxes (M, 4)``,
      ``classes (M,)`` and optionally ``difficult (M,)`` and ``valid (M,)``.
    iou_threshold: a detection matches a box with IoU strictly above this.
    use_07_metric: 11-point (VOC2007) interpolation, else the area under the envelope.
    num_classes: number of classes; by default one more than the largest class seen.

  Returns:
    ``{'map': mean over classes with ground truth, 'per_class': (num_classes,) array
    (NaN for classes without non-difficult ground truth)}``; APs are fractions in
    [0, 1].
  """
  if len(detections) != len(ground_truth):
    raise ValueError(f"voc_ap got {len(detections)} detection entries but "
                     f"{len(ground_truth)} ground-truth entries; pass one of each per image.")
  dets = [_unpad(d, ("boxes", "scores", "classes")) for d in detections]
  gts = [_unpad(g, ("boxes", "classes", "difficult")) for g in ground_truth]
  if num_classes is None:
    seen = [int(x["classes"].max()) for x in dets + gts if len(x["classes"])]
    num_classes = max(seen, default=-1) + 1
  per_class = np.array([_class_ap(c, dets, gts, iou_threshold, use_07_metric)
                        for c in range(num_classes)])
  has_gt = ~np.isnan(per_class)
  mean = float(per_class[has_gt].mean()) if has_gt.any() else float("nan")
  return {"map": mean, "per_class": per_class}
