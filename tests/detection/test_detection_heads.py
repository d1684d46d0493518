"""Proposal selection, RoI sampling and inference post-processing against NumPy references."""
import jax
import numpy as np

from bissl_jax.detection import boxes as B
from bissl_jax.detection.roi_heads import postprocess, sample_proposals
from bissl_jax.detection.rpn import select_proposals
from detection_reference import np_decode, np_greedy_nms, np_iou


def test_select_proposals_matches_reference():
  rng = np.random.default_rng(0)
  anchors = B.grid_anchors(4, 5, 16, (16.0, 48.0), (0.5, 1.0, 2.0))
  logits = rng.normal(size=len(anchors)).astype(np.float32)
  deltas = (0.3 * rng.normal(size=(len(anchors), 4))).astype(np.float32)
  deltas[7] = [0.0, 0.0, -30.0, 0.0]  # Collapses to an (almost) empty box.
  logits[7] = 10.0
  size = np.array([60.0, 75.0], np.float32)
  boxes, valid = jax.jit(lambda *a: select_proposals(
      *a, pre_nms_topk=50, post_nms_topk=20, nms_threshold=0.7))(anchors, logits, deltas, size)
  top = np.argsort(-logits, kind="stable")[:50]
  ref = np_decode(anchors[top], deltas[top], (1, 1, 1, 1))
  ref[:, 0::2] = np.clip(ref[:, 0::2], 0, 75)
  ref[:, 1::2] = np.clip(ref[:, 1::2], 0, 60)
  ok = (ref[:, 2] > ref[:, 0]) & (ref[:, 3] > ref[:, 1])
  keep = np.flatnonzero(ok)[np_greedy_nms(ref[ok], logits[top][ok], 0.7)][:20]
  n = len(keep)
  assert np.asarray(valid).sum() == n and np.asarray(valid)[:n].all()
  np.testing.assert_allclose(np.asarray(boxes)[:n], ref[keep], rtol=1e-4, atol=1e-3)


def test_sample_proposals_appends_ground_truth_and_labels():
  gt = np.array([[10, 10, 30, 30], [40, 5, 60, 25], [0, 0, 0, 0]], np.float32)
  gt_classes = np.array([3, 1, 0])
  gt_valid = np.array([True, True, False])
  proposals = np.array([[11, 11, 31, 29], [41, 6, 58, 26], [0, 40, 20, 60], [5, 5, 12, 12],
                        [0, 0, 0, 0]], np.float32)
  prop_valid = np.array([True, True, True, True, False])
  out = jax.jit(lambda k: sample_proposals(
      k, proposals, prop_valid, gt, gt_classes, gt_valid, num_classes=5, iou_threshold=0.5,
      batch_size_per_image=16, positive_fraction=0.5))(jax.random.key(0))
  used = np.asarray(out["valid"])
  # Candidates: 4 valid proposals + 2 real ground-truth boxes; all are sampled (16 slots).
  assert used.sum() == 6
  boxes, classes = np.asarray(out["boxes"])[used], np.asarray(out["classes"])[used]
  candidates = np.concatenate([proposals[prop_valid], gt[gt_valid]])
  iou = np_iou(gt[gt_valid], candidates)
  want = {tuple(c): (gt_classes[iou[:, k].argmax()] if iou[:, k].max() >= 0.5 else 5)
          for k, c in enumerate(candidates)}
  assert sorted(map(tuple, boxes)) == sorted(want)
  for b, c, t in zip(boxes, classes, np.asarray(out["targets"])[used]):
    assert c == want[tuple(b)]
    if c < 5:
      g = gt[gt_valid][iou[:, [tuple(x) for x in candidates].index(tuple(b))].argmax()]
      np.testing.assert_allclose(np_decode(b[None], t[None], (10, 10, 5, 5))[0], g,
                                 rtol=1e-4, atol=1e-3)
    else:
      assert np.all(t == 0)
  assert np.all(np.diff((classes == 5).astype(int)) >= 0)  # Foreground first.


def test_postprocess_matches_reference():
  rng = np.random.default_rng(1)
  r, k = 12, 3
  xy = rng.uniform(0, 40, (r, 2))
  proposals = np.concatenate([xy, xy + rng.uniform(8, 30, (r, 2))], 1).astype(np.float32)
  prop_valid = np.arange(r) < 10
  logits = (2 * rng.normal(size=(r, k + 1))).astype(np.float32)
  deltas = rng.normal(size=(r, k, 4)).astype(np.float32)
  out = jax.jit(lambda *a: postprocess(*a, score_threshold=0.1, nms_threshold=0.5,
                                       detections_per_image=8))(
      proposals, prop_valid, logits, deltas, np.array([50.0, 60.0], np.float32))
  probs = np.exp(logits - logits.max(1, keepdims=True))
  probs /= probs.sum(1, keepdims=True)
  cands = []
  for i in range(r):
    for c in range(k):
      box = np_decode(proposals[i][None], deltas[i, c][None], (10, 10, 5, 5))[0]
      box[0::2], box[1::2] = np.clip(box[0::2], 0, 60), np.clip(box[1::2], 0, 50)
      if prop_valid[i] and probs[i, c] > 0.1:
        cands.append((box, probs[i, c], c))
  boxes = np.array([c[0] for c in cands])
  scores = np.array([c[1] for c in cands])
  classes = np.array([c[2] for c in cands])
  keep = np_greedy_nms(boxes, scores, 0.5, classes)[:8]
  valid = np.asarray(out["valid"])
  assert valid.sum() == len(keep)
  np.testing.assert_allclose(np.asarray(out["boxes"])[valid], boxes[keep], rtol=1e-4, atol=1e-3)
  np.testing.assert_allclose(np.asarray(out["scores"])[valid], scores[keep], rtol=1e-5)
  np.testing.assert_array_equal(np.asarray(out["classes"])[valid], classes[keep])
