"""AP50 of a whole split's fixed-size, padded detections, on the host (BiSSL paper Table 2).

The detection task's outputs (``Detection.logits``) are ``{'boxes' (N, D, 4),
'scores', 'classes', 'valid' (N, D)}``; the labels ``{'boxes' (N, M, 4), 'classes',
'valid' (N, M)}`` (optionally ``'difficult'``). :func:`ap50_scorer` scores them with
:func:`bissl_jax.detection.voc_eval.voc_ap` at IoU 0.5 with VOC2007's 11-point
interpolation (what detectron2's VOC2007 evaluator reports), as a fraction.
"""
from typing import Callable, Mapping

import numpy as np

from bissl_jax.detection.voc_eval import voc_ap

AP50 = "ap50"


def nonfinite_detections(outputs: Mapping[str, np.ndarray]) -> int:
  """How many images hold a valid detection with a NaN or infinite box or score."""
  valid = np.asarray(outputs["valid"], bool)
  bad = ~np.isfinite(np.asarray(outputs["scores"], np.float64))
  bad |= ~np.isfinite(np.asarray(outputs["boxes"], np.float64)).all(-1)
  return int(np.sum((bad & valid).any(-1)))


def ap50(outputs: Mapping[str, np.ndarray], labels: Mapping[str, np.ndarray],
         num_classes: int) -> float:
  """VOC AP50 (11-point) over every image of ``outputs``/``labels`` (module docstring)."""
  n = len(outputs["valid"])
  detections = [{k: np.asarray(outputs[k][i]) for k in ("boxes", "scores", "classes", "valid")}
                for i in range(n)]
  keys = [k for k in ("boxes", "classes", "valid", "difficult") if k in labels]
  truth = [{k: np.asarray(labels[k][i]) for k in keys} for i in range(n)]
  return float(voc_ap(detections, truth, iou_threshold=0.5, use_07_metric=True,
                      num_classes=num_classes)["map"])


def ap50_scorer(num_classes: int) -> Callable[[Mapping, Mapping], dict]:
  """``score(outputs, labels) -> {'ap50', 'score', 'loss', 'nonfinite'}`` of a split.

  'score' (model selection) is the AP50. Detection has no per-split loss computed
  from its outputs: 'loss' is ``1 - AP50``, which only breaks ties in the records.
  Detections with a non-finite box or score are left out of the AP and counted in
  'nonfinite' (the pipeline refuses to report such a model).
  """
  def score(outputs, labels) -> dict:
    bad = nonfinite_detections(outputs)
    clean = dict(outputs)
    finite = np.isfinite(np.asarray(outputs["scores"], np.float64)) & np.isfinite(
        np.asarray(outputs["boxes"], np.float64)).all(-1)
    clean["valid"] = np.asarray(outputs["valid"], bool) & finite
    value = ap50(clean, labels, num_classes)
    value = 0.0 if np.isnan(value) else value
    return {AP50: value, "score": value, "loss": 1.0 - value, "nonfinite": bad}

  return score
