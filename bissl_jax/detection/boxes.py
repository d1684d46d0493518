"""Boxes, anchors, box coding, matching and sampling for Faster R-CNN (BiSSL paper §4.3.1).

Conventions (those of detectron2):

* A box is ``(x1, y1, x2, y2)`` in absolute, continuous pixel coordinates of the
  (resized, padded) input image: x to the right, y down, ``x1 <= x2``, ``y1 <= y2``.
  The pixel with integer index ``(i, j)`` covers ``[j, j+1) × [i, i+1)``, its centre
  is ``(j + 0.5, i + 0.5)``. Width is ``x2 - x1`` and area ``(x2 - x1)·(y2 - y1)``:
  there is no ``+1`` (the legacy inclusive-pixel convention of the VOC devkit).
* Padding: every per-image set of boxes has a fixed size and comes with a boolean
  validity mask of the same leading shape (``gt_valid``, ``proposal_valid``, …).
  The coordinates of padded entries are ignored; the data pipeline writes zeros there.
  Nothing here infers validity from the coordinates, so a real degenerate box stays
  a box.

All functions are pure, take static shapes and work under ``jit``/``vmap``; random
sampling takes an explicit PRNG key.
"""
import math
from typing import Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

# detectron2's Box2BoxTransform clamps dw, dh at log(1000/16) so exp() cannot overflow.
SCALE_CLAMP = math.log(1000.0 / 16)
RPN_BOX_WEIGHTS = (1.0, 1.0, 1.0, 1.0)
ROI_BOX_WEIGHTS = (10.0, 10.0, 5.0, 5.0)

# Labels of a match: ignored (between the thresholds), background, foreground.
IGNORE, BACKGROUND, FOREGROUND = -1, 0, 1


def box_area(boxes: jax.Array) -> jax.Array:
  """Areas ``(x2-x1)·(y2-y1)`` of boxes ``(..., 4)``."""
  return (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])


def box_iou(a: jax.Array, b: jax.Array) -> jax.Array:
  """Intersection over union of every box in ``a (n, 4)`` with every box in ``b (m, 4)``.

  Returns ``(n, m)``; a pair whose union is empty (two empty boxes) has IoU 0.
  """
  a, b = jnp.asarray(a), jnp.asarray(b)
  if a.ndim != 2 or b.ndim != 2 or a.shape[-1] != 4 or b.shape[-1] != 4:
    raise ValueError(f"box_iou takes two arrays of boxes (n, 4) and (m, 4); got {a.shape} "
                     f"and {b.shape}.")
  lo = jnp.maximum(a[:, None, :2], b[None, :, :2])
  hi = jnp.minimum(a[:, None, 2:], b[None, :, 2:])
  wh = jnp.clip(hi - lo, 0.0)
  inter = wh[..., 0] * wh[..., 1]
  union = box_area(a)[:, None] + box_area(b)[None, :] - inter
  return jnp.where(union > 0, inter / jnp.where(union > 0, union, 1.0), 0.0)


def clip_boxes(boxes: jax.Array, height, width) -> jax.Array:
  """Clips boxes ``(..., 4)`` to ``[0, width] × [0, height]`` (scalars or broadcastable)."""
  x = jnp.clip(boxes[..., 0::2], 0.0, width)
  y = jnp.clip(boxes[..., 1::2], 0.0, height)
  return jnp.stack([x[..., 0], y[..., 0], x[..., 1], y[..., 1]], axis=-1)


def _centre_size(boxes):
  w = boxes[..., 2] - boxes[..., 0]
  h = boxes[..., 3] - boxes[..., 1]
  return boxes[..., 0] + 0.5 * w, boxes[..., 1] + 0.5 * h, w, h


def encode_boxes(reference: jax.Array, target: jax.Array,
                 weights: Sequence[float]) -> jax.Array:
  """Deltas ``(dx, dy, dw, dh)`` that move ``reference`` boxes onto ``target`` boxes.

  detectron2's ``Box2BoxTransform.get_deltas``: ``dx = wx·(tx - rx)/rw``,
  ``dw = ww·log(tw/rw)`` and likewise for y, h; ``reference`` must have positive sizes.
  """
  rx, ry, rw, rh = _centre_size(reference)
  tx, ty, tw, th = _centre_size(target)
  wx, wy, ww, wh = weights
  return jnp.stack([wx * (tx - rx) / rw, wy * (ty - ry) / rh,
                    ww * jnp.log(tw / rw), wh * jnp.log(th / rh)], axis=-1)


def decode_boxes(reference: jax.Array, deltas: jax.Array, weights: Sequence[float],
                 scale_clamp: float = SCALE_CLAMP) -> jax.Array:
  """Inverse of :func:`encode_boxes` (``Box2BoxTransform.apply_deltas``).

  ``dw`` and ``dh`` are clamped at ``scale_clamp`` before ``exp``.
  """
  rx, ry, rw, rh = _centre_size(reference)
  wx, wy, ww, wh = weights
  dx, dy = deltas[..., 0] / wx, deltas[..., 1] / wy
  dw = jnp.minimum(deltas[..., 2] / ww, scale_clamp)
  dh = jnp.minimum(deltas[..., 3] / wh, scale_clamp)
  cx, cy = dx * rw + rx, dy * rh + ry
  w, h = jnp.exp(dw) * rw, jnp.exp(dh) * rh
  return jnp.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], axis=-1)


def cell_anchors(sizes: Sequence[float], aspect_ratios: Sequence[float]) -> np.ndarray:
  """The ``len(sizes)·len(aspect_ratios)`` anchors of one location, centred at 0.

  Order and shapes as detectron2's ``DefaultAnchorGenerator``: sizes outer, ratios
  inner; an anchor of size s and ratio r = h/w has area s², ``w = sqrt(s²/r)``,
  ``h = r·w``.
  """
  out = []
  for size in sizes:
    for ratio in aspect_ratios:
      w = math.sqrt(size * size / ratio)
      h = ratio * w
      out.append([-w / 2.0, -h / 2.0, w / 2.0, h / 2.0])
  return np.asarray(out, np.float32)


def grid_anchors(feature_height: int, feature_width: int, stride: int,
                 sizes: Sequence[float], aspect_ratios: Sequence[float],
                 offset: float = 0.0) -> np.ndarray:
  """All anchors of a feature map, ``(H·W·A, 4)``, location-major then anchor.

  The anchors of location ``(i, j)`` are the cell anchors shifted by
  ``((j + offset)·stride, (i + offset)·stride)``; row ``(i·W + j)·A + a`` holds
  anchor ``a`` there, the order in which the RPN head's outputs are flattened.
  detectron2's C4 default is offset 0.0 (anchor centres on the top-left corner of
  each stride cell). Computed in NumPy: it depends on static shapes only.
  """
  base = cell_anchors(sizes, aspect_ratios)
  xs = (np.arange(feature_width, dtype=np.float32) + offset) * stride
  ys = (np.arange(feature_height, dtype=np.float32) + offset) * stride
  sy, sx = np.meshgrid(ys, xs, indexing="ij")
  shifts = np.stack([sx, sy, sx, sy], axis=-1).reshape(-1, 1, 4)
  return (shifts + base[None]).reshape(-1, 4)


def match_boxes(quality: jax.Array, gt_valid: jax.Array,
                thresholds: Sequence[float], labels: Sequence[int],
                allow_low_quality_matches: bool) -> Tuple[jax.Array, jax.Array]:
  """Matches predictions to ground truth from an IoU matrix (detectron2's ``Matcher``).

  Args:
    quality: ``(num_gt, num_pred)`` IoU matrix.
    gt_valid: ``(num_gt,)`` mask of real (unpadded) ground-truth boxes.
    thresholds: increasing IoU thresholds, e.g. ``(0.3, 0.7)`` for the RPN or
      ``(0.5,)`` for the RoI heads; interval ``k`` is ``[t_{k-1}, t_k)``.
    labels: one label per interval (``len(thresholds) + 1``), e.g. ``(0, -1, 1)``.
    allow_low_quality_matches: also label 1 every prediction that has the highest
      IoU (ties included) with some ground-truth box, as detectron2 does for the RPN;
      like detectron2, this also holds when that highest IoU is 0.

  Returns:
    ``(matched_gt, match_labels)``: per prediction the index of its highest-IoU valid
    ground-truth box (0 when there is none) and its label. Without any valid
    ground truth every prediction gets ``labels[0]`` (background).
  """
  quality = jnp.where(gt_valid[:, None], quality, -1.0)
  matched_vals = jnp.max(quality, axis=0)
  matched_gt = jnp.argmax(quality, axis=0)
  bins = jnp.searchsorted(jnp.asarray(thresholds, quality.dtype), matched_vals,
                          side="right")
  match_labels = jnp.asarray(labels, jnp.int32)[bins]
  if allow_low_quality_matches:
    best = jnp.max(quality, axis=1, keepdims=True)
    is_best = (quality == best) & gt_valid[:, None]
    match_labels = jnp.where(jnp.any(is_best, axis=0), 1, match_labels)
  no_gt = ~jnp.any(gt_valid)
  match_labels = jnp.where(no_gt, labels[0], match_labels)
  return jnp.where(no_gt, 0, matched_gt), match_labels


def sample_labels(key: jax.Array, labels: jax.Array, num_samples: int,
                  positive_fraction: float) -> jax.Array:
  """Random fixed-size subset of positives and negatives (detectron2's ``subsample_labels``).

  Takes ``min(int(num_samples·positive_fraction), #positives)`` positives and fills
  up to ``num_samples`` with negatives (fewer when there are not enough), each chosen
  uniformly without replacement by the key.

  Args:
    key: PRNG key.
    labels: ``(n,)`` int labels: 1 positive, 0 negative, -1 ignored.
    num_samples: samples per image.
    positive_fraction: largest share of positives.

  Returns:
    ``(n,)`` labels: 1 / 0 for the sampled positives / negatives, -1 elsewhere.
  """
  pos, neg = labels == FOREGROUND, labels == BACKGROUND
  num_pos = jnp.minimum(int(num_samples * positive_fraction), jnp.sum(pos))
  num_neg = jnp.minimum(num_samples - num_pos, jnp.sum(neg))
  noise = jax.random.uniform(key, labels.shape)

  def chosen(mask, count):
    # Rank of each member among the mask's members in random order (others last).
    rank = jnp.argsort(jnp.argsort(jnp.where(mask, noise, 2.0)))
    return mask & (rank < count)

  take_pos, take_neg = chosen(pos, num_pos), chosen(neg, num_neg)
  return jnp.where(take_pos, FOREGROUND, jnp.where(take_neg, BACKGROUND, IGNORE))


def sampled_indices(sampled: jax.Array, num_samples: int) -> Tuple[jax.Array, jax.Array]:
  """The ``num_samples`` indices of sampled entries, positives first, with a validity mask.

  Args:
    sampled: output of :func:`sample_labels`.
    num_samples: its ``num_samples``.

  Returns:
    ``(indices, valid)``, each ``(num_samples,)``; unused slots (also those beyond
    ``n`` when there are fewer candidates than ``num_samples``) point at entry 0 and
    are invalid.
  """
  if sampled.shape[0] < num_samples:  # Fewer candidates than slots: pad with ignored.
    sampled = jnp.pad(sampled, (0, num_samples - sampled.shape[0]), constant_values=IGNORE)
  order_key = jnp.where(sampled == FOREGROUND, 0, jnp.where(sampled == BACKGROUND, 1, 2))
  idx = jnp.argsort(order_key, stable=True)[:num_samples]
  valid = sampled[idx] != IGNORE
  return jnp.where(valid, idx, 0), valid
