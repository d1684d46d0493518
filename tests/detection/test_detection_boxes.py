"""Boxes, anchors, matching, sampling and NMS against NumPy implementations written here."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bissl_jax.detection import boxes as B
from detection_reference import np_greedy_nms, np_iou
from bissl_jax.detection.nms import batched_nms, nms


def _random_boxes(rng, n, size=100.0):
  xy = rng.uniform(0, size, (n, 2))
  wh = rng.uniform(1, size / 2, (n, 2))
  return np.concatenate([xy, xy + wh], axis=1).astype(np.float32)


def test_box_iou_matches_numpy_and_known_values():
  rng = np.random.default_rng(0)
  a, b = _random_boxes(rng, 7), _random_boxes(rng, 5)
  np.testing.assert_allclose(B.box_iou(a, b), np_iou(a, b), rtol=1e-5, atol=1e-6)
  # Two unit squares offset by half: intersection 0.5, union 1.5 (no +1 convention).
  sq = np.array([[0, 0, 1, 1]], np.float32)
  half = np.array([[0.5, 0, 1.5, 1]], np.float32)
  np.testing.assert_allclose(B.box_iou(sq, half), [[1 / 3]], rtol=1e-6)
  empty = np.zeros((1, 4), np.float32)
  assert float(B.box_iou(empty, empty)[0, 0]) == 0.0


@pytest.mark.parametrize("weights", [B.RPN_BOX_WEIGHTS, B.ROI_BOX_WEIGHTS])
def test_encode_decode_round_trip_and_formula(weights):
  rng = np.random.default_rng(1)
  ref, tgt = _random_boxes(rng, 20), _random_boxes(rng, 20)
  deltas = np.asarray(B.encode_boxes(ref, tgt, weights))
  # Independent formula for dx and dw.
  rw = ref[:, 2] - ref[:, 0]
  rcx = ref[:, 0] + 0.5 * rw
  tcx = 0.5 * (tgt[:, 0] + tgt[:, 2])
  np.testing.assert_allclose(deltas[:, 0], weights[0] * (tcx - rcx) / rw, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(deltas[:, 2], weights[2] * np.log((tgt[:, 2] - tgt[:, 0]) / rw),
                             rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(B.decode_boxes(ref, deltas, weights), tgt, rtol=1e-4, atol=1e-3)


def test_decode_clamps_scale():
  ref = np.array([[0, 0, 10, 10]], np.float32)
  out = np.asarray(B.decode_boxes(ref, np.array([[0, 0, 100.0, 100.0]], np.float32),
                                  B.RPN_BOX_WEIGHTS))
  np.testing.assert_allclose(out[0, 2] - out[0, 0], 10 * 1000 / 16, rtol=1e-5)


def test_grid_anchors_against_explicit_loops():
  sizes, ratios, stride = (32, 64, 128, 256, 512), (0.5, 1.0, 2.0), 16
  anchors = B.grid_anchors(3, 4, stride, sizes, ratios)
  assert anchors.shape == (3 * 4 * 15, 4)
  row = 0
  for i in range(3):
    for j in range(4):
      for s in sizes:
        for r in ratios:
          w, h = s / math.sqrt(r), s * math.sqrt(r)
          cx, cy = j * stride, i * stride
          np.testing.assert_allclose(anchors[row], [cx - w / 2, cy - h / 2, cx + w / 2,
                                                    cy + h / 2], rtol=1e-5)
          assert abs((anchors[row, 2] - anchors[row, 0]) * (anchors[row, 3] - anchors[row, 1])
                     - s * s) < 1e-2 * s
          row += 1


def _np_match(iou, gt_valid, thresholds, labels, low_quality):
  iou = iou[gt_valid]
  n = iou.shape[1]
  if iou.shape[0] == 0:
    return np.zeros(n, int), np.full(n, labels[0])
  matched, vals = iou.argmax(0), iou.max(0)
  lab = np.empty(n, int)
  edges = [-np.inf, *thresholds, np.inf]
  for k in range(len(labels)):
    lab[(vals >= edges[k]) & (vals < edges[k + 1])] = labels[k]
  if low_quality:
    for g in range(iou.shape[0]):
      lab[iou[g] == iou[g].max()] = 1
  return np.flatnonzero(gt_valid)[matched], lab


def test_match_boxes_rpn_and_roi_rules():
  rng = np.random.default_rng(2)
  gt, pred = _random_boxes(rng, 4), _random_boxes(rng, 60)
  gt_valid = np.array([True, False, True, True])
  iou = np.asarray(B.box_iou(gt, pred))
  for th, lab, low in [((0.3, 0.7), (0, -1, 1), True), ((0.5,), (0, 1), False)]:
    m, l = B.match_boxes(jnp.asarray(iou), jnp.asarray(gt_valid), th, lab, low)
    em, el = _np_match(iou, gt_valid, th, lab, low)
    np.testing.assert_array_equal(l, el)
    np.testing.assert_array_equal(m, em)
  _, l = B.match_boxes(jnp.asarray(iou), jnp.zeros(4, bool), (0.3, 0.7), (0, -1, 1), True)
  assert np.all(np.asarray(l) == 0)


def test_match_boxes_thresholds_are_half_open():
  iou = jnp.asarray([[0.29, 0.3, 0.69, 0.7, 0.1]])
  _, l = B.match_boxes(iou, jnp.ones(1, bool), (0.3, 0.7), (0, -1, 1), False)
  np.testing.assert_array_equal(l, [0, -1, -1, 1, 0])


def test_sample_labels_counts_and_key_dependence():
  labels = jnp.asarray(np.r_[np.ones(10), np.zeros(300), -np.ones(20)].astype(np.int32))
  out = np.asarray(B.sample_labels(jax.random.key(0), labels, 64, 0.25))
  assert (out == 1).sum() == 10 and (out == 0).sum() == 54
  assert np.all(out[np.asarray(labels) == -1] == -1)
  assert np.all((out == 1) <= (np.asarray(labels) == 1))
  out2 = np.asarray(B.sample_labels(jax.random.key(1), labels, 64, 0.25))
  assert not np.array_equal(out, out2)
  many = jnp.asarray(np.r_[np.ones(100), np.zeros(100)].astype(np.int32))
  out = np.asarray(B.sample_labels(jax.random.key(0), many, 64, 0.25))
  assert (out == 1).sum() == 16 and (out == 0).sum() == 48
  idx, valid = B.sampled_indices(jnp.asarray(out), 64)
  assert bool(valid.all()) and np.all(out[np.asarray(idx)][:16] == 1)
  idx, valid = B.sampled_indices(jnp.asarray(out[:40]), 64)
  assert int(valid.sum()) == int((out[:40] >= 0).sum())


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_nms_matches_greedy_reference_with_ties(seed):
  rng = np.random.default_rng(seed)
  boxes = _random_boxes(rng, 80, size=60.0)
  boxes[10] = boxes[3]  # Duplicate box with the same score: the lower index wins.
  scores = rng.integers(0, 8, 80).astype(np.float32)  # Many ties.
  scores[10] = scores[3]
  valid = rng.uniform(size=80) > 0.1
  idx, ok = jax.jit(nms, static_argnums=(2, 3))(boxes, scores, 0.5, 50, valid)
  expect = np_greedy_nms(boxes[valid], scores[valid], 0.5)
  expect = [int(np.flatnonzero(valid)[k]) for k in expect][:50]
  got = np.asarray(idx)[np.asarray(ok)]
  np.testing.assert_array_equal(got, expect)
  assert not np.asarray(ok)[len(expect):].any()


def test_batched_nms_only_suppresses_within_a_class():
  rng = np.random.default_rng(3)
  boxes = _random_boxes(rng, 60, size=40.0)
  scores = rng.uniform(size=60).astype(np.float32)
  classes = rng.integers(0, 3, 60)
  idx, ok = batched_nms(boxes, scores, classes, 0.5, 60)
  expect = np_greedy_nms(boxes, scores, 0.5, classes)
  np.testing.assert_array_equal(np.asarray(idx)[np.asarray(ok)], expect)


def test_nms_under_vmap_and_truncation():
  rng = np.random.default_rng(4)
  boxes = np.stack([_random_boxes(rng, 30), _random_boxes(rng, 30)])
  scores = rng.uniform(size=(2, 30)).astype(np.float32)
  idx, ok = jax.vmap(lambda b, s: nms(b, s, 0.3, 5))(boxes, scores)
  for k in range(2):
    expect = np_greedy_nms(boxes[k], scores[k], 0.3)[:5]
    np.testing.assert_array_equal(np.asarray(idx[k])[np.asarray(ok[k])], expect)


def test_shape_errors_name_the_expected_shapes():
  with pytest.raises(ValueError, match=r"\(n, 4\) and \(m, 4\)"):
    B.box_iou(np.zeros((3, 5)), np.zeros((2, 4)))
  with pytest.raises(ValueError, match="vmap it over a batch"):
    nms(np.zeros((2, 3, 4)), np.zeros((2, 3)), 0.5, 2)
