"""VOC AP on hand-made cases whose answers are worked out by hand in the comments."""
import numpy as np
import pytest

from bissl_jax.detection.voc_eval import voc_ap

G1 = [0.0, 0.0, 10.0, 10.0]
G2 = [20.0, 20.0, 30.0, 30.0]
FAR = [50.0, 50.0, 60.0, 60.0]


def _det(boxes, scores, classes=None, valid=None):
  out = {"boxes": np.array(boxes, np.float32), "scores": np.array(scores, np.float32),
         "classes": np.zeros(len(scores), int) if classes is None else np.array(classes)}
  if valid is not None:
    out["valid"] = np.array(valid)
  return out


def _gt(boxes, classes=None, difficult=None):
  out = {"boxes": np.array(boxes, np.float32),
         "classes": np.zeros(len(boxes), int) if classes is None else np.array(classes)}
  if difficult is not None:
    out["difficult"] = np.array(difficult)
  return out


def test_perfect_detection_is_one():
  r = voc_ap([_det([G1], [0.9])], [_gt([G1])])
  assert r["map"] == pytest.approx(1.0)


def test_duplicate_detection_is_a_false_positive():
  # Ranks: G1 (tp), G1 again (duplicate: fp), G2 (tp). Recall .5 .5 1, precision 1 .5 2/3.
  # 11-point: six points at 1, five at 2/3 -> 28/33. Envelope area: .5·1 + .5·2/3 = 5/6.
  dets, gts = [_det([G1, G1, G2], [0.9, 0.8, 0.7])], [_gt([G1, G2])]
  assert voc_ap(dets, gts)["map"] == pytest.approx(28 / 33)
  assert voc_ap(dets, gts, use_07_metric=False)["map"] == pytest.approx(5 / 6)


def test_difficult_objects_are_neither_true_nor_false():
  # Ranks: FAR (fp), G2 difficult (ignored), G1 (tp); one positive.
  # Recall 0 0 1, precision 0 0 1/2 -> AP 1/2 (counting the difficult hit as fp: 1/3).
  dets = [_det([FAR, G2, G1], [0.99, 0.95, 0.9])]
  gts = [_gt([G1, G2], difficult=[False, True])]
  assert voc_ap(dets, gts)["map"] == pytest.approx(0.5)
  assert voc_ap(dets, gts, use_07_metric=False)["map"] == pytest.approx(0.5)


def test_iou_threshold_is_strict_and_classes_are_separate():
  tall = [0.0, 0.0, 10.0, 20.0]  # IoU with G1: 100/200 = 0.5 exactly.
  assert voc_ap([_det([tall], [1.0])], [_gt([G1])])["map"] == 0.0
  assert voc_ap([_det([tall], [1.0])], [_gt([G1])], iou_threshold=0.4)["map"] == pytest.approx(1)
  # Class 1's detection does not count for class 0; class 2 has no ground truth.
  r = voc_ap([_det([G1, G2], [0.9, 0.8], classes=[1, 1])], [_gt([G1, G2], classes=[0, 1])],
             num_classes=3)
  # Class 1: ranks G1 (fp: its G1 is class 0), G2 (tp): recall 0 1, precision 0 1/2 -> 1/2.
  np.testing.assert_allclose(r["per_class"][:2], [0.0, 0.5])
  assert np.isnan(r["per_class"][2]) and r["map"] == pytest.approx(0.25)


def test_across_images_and_padding_masks():
  # Image 0: tp (0.9); image 1: fp (0.8) then a padded entry that must be ignored.
  # Two positives: recall .5 .5 then nothing -> precision 1 .5; 11-point: six points at 1.
  dets = [_det([G1], [0.9]), _det([FAR, G2], [0.8, 0.99], valid=[True, False])]
  gts = [_gt([G1]), _gt([G2])]
  assert voc_ap(dets, gts)["map"] == pytest.approx(6 / 11)
  assert voc_ap(dets, gts, use_07_metric=False)["map"] == pytest.approx(0.5)
  with pytest.raises(ValueError, match="one of each per image"):
    voc_ap(dets, gts[:1])
