"""Greedy non-maximum suppression with a fixed-size, padded output (jit-friendly).

Greedy NMS keeps the highest-scoring remaining box, drops every remaining box whose
IoU with it exceeds the threshold (strictly greater, as torchvision's ``nms``), and
repeats. Ties in score are broken by the lower index first, so the result is a
deterministic function of the inputs (torchvision sorts with an unstable sort, so its
order among equal scores is unspecified). The loop runs at most ``max_outputs`` times
and stops early once nothing is left; each step costs one IoU row of length ``n``,
so memory stays ``O(n)`` even for detectron2's 12,000 pre-NMS proposals.
"""
from typing import Optional, Tuple

import jax
import jax.numpy as jnp

from bissl_jax.detection.boxes import box_iou


def nms(boxes: jax.Array, scores: jax.Array, iou_threshold: float, max_outputs: int,
        valid: Optional[jax.Array] = None, classes: Optional[jax.Array] = None
        ) -> Tuple[jax.Array, jax.Array]:
  """Greedy NMS of one image's boxes.

  Args:
    boxes: ``(n, 4)`` boxes ``(x1, y1, x2, y2)``.
    scores: ``(n,)`` scores (any real values; higher is better).
    iou_threshold: a box is suppressed when its IoU with a kept box is ``>`` this.
    max_outputs: size of the output (static).
    valid: optional ``(n,)`` mask; invalid boxes are never kept and suppress nothing.
    classes: optional ``(n,)`` ints; when given, boxes only suppress boxes of the same
      class (per-class NMS, detectron2's ``batched_nms``).

  Returns:
    ``(indices, keep_valid)``, each ``(max_outputs,)``: indices into ``boxes`` of the
    kept boxes in decreasing score order, then padding (index 0, invalid).
  """
  boxes, scores = jnp.asarray(boxes), jnp.asarray(scores)
  if boxes.ndim != 2 or boxes.shape[-1] != 4 or scores.shape != boxes.shape[:1]:
    raise ValueError(f"nms takes boxes (n, 4) and scores (n,) of one image; got boxes "
                     f"{boxes.shape} and scores {scores.shape} (vmap it over a batch).")
  classes = None if classes is None else jnp.asarray(classes)
  n = boxes.shape[0]
  remaining = jnp.ones((n,), bool) if valid is None else valid.astype(bool)
  neg_inf = jnp.asarray(-jnp.inf, scores.dtype)
  out_idx = jnp.zeros((max_outputs,), jnp.int32)
  out_valid = jnp.zeros((max_outputs,), bool)

  def cond(state):
    i, remaining, _, _ = state
    return (i < max_outputs) & jnp.any(remaining)

  def body(state):
    i, remaining, out_idx, out_valid = state
    # argmax returns the first maximum: equal scores go to the lower index.
    best = jnp.argmax(jnp.where(remaining, scores, neg_inf)).astype(jnp.int32)
    overlap = box_iou(boxes[best][None], boxes)[0] > iou_threshold
    if classes is not None:
      overlap = overlap & (classes == classes[best])
    remaining = remaining & ~overlap
    remaining = remaining.at[best].set(False)
    return i + 1, remaining, out_idx.at[i].set(best), out_valid.at[i].set(True)

  state = (jnp.int32(0), remaining, out_idx, out_valid)
  _, _, out_idx, out_valid = jax.lax.while_loop(cond, body, state)
  return out_idx, out_valid


def batched_nms(boxes: jax.Array, scores: jax.Array, classes: jax.Array,
                iou_threshold: float, max_outputs: int,
                valid: Optional[jax.Array] = None) -> Tuple[jax.Array, jax.Array]:
  """Per-class NMS of one image: boxes of different classes never suppress each other.

  The kept boxes of all classes come out together in decreasing score order, as
  detectron2's ``batched_nms`` followed by ``[:max_outputs]``. Arguments as :func:`nms`.
  """
  return nms(boxes, scores, iou_threshold, max_outputs, valid=valid, classes=classes)
