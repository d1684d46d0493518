"""The synthetic detection data, and a short CPU run in which the detector learns."""
import jax
import numpy as np
import pytest

from bissl_jax.data.synthetic_detection import make_split
from bissl_jax.detection import build_detector, tiny_config
from bissl_jax.detection.training import evaluate_ap50, fit


def test_synthetic_split_layout_and_determinism():
  a = make_split(24, "train", seed=3)
  b = make_split(24, "train", seed=3)
  for k in a:
    np.testing.assert_array_equal(a[k], b[k])
  assert not np.array_equal(make_split(24, "test", seed=3)["images"], a["images"])
  assert a["images"].shape == (24, 64, 64, 3) and a["images"].dtype == np.uint8
  valid, boxes = a["gt_valid"], a["gt_boxes"]
  assert valid.shape == (24, 3) and np.all(valid.sum(1) >= 1)
  assert np.all(boxes[~valid] == 0)  # Padding: zero boxes.
  real = boxes[valid]
  assert np.all(real[:, 2:] > real[:, :2]) and np.all(real >= 0) and np.all(real <= 64)
  assert np.all((a["gt_classes"] >= 0) & (a["gt_classes"] < 10))
  for img, bx, ok in zip(a["images"], boxes, valid):
    ink = img[..., 0] > 32
    inside = np.zeros_like(ink)
    for x1, y1, x2, y2 in bx[ok].astype(int):
      inside[y1:y2, x1:x2] = True
      assert ink[y1:y2, x1:x2].any()
    assert not (ink & ~inside).any()  # Every ink pixel lies in some box.


def test_synthetic_split_rejects_bad_sizes():
  with pytest.raises(ValueError, match="min_size"):
    make_split(2, "train", min_size=40, max_size=30)
  with pytest.raises(ValueError, match="split"):
    make_split(2, "holdout")


@pytest.mark.slow
def test_detector_learns_on_synthetic_digits():
  train = make_split(384, "train", seed=0)
  test = make_split(64, "test", seed=0)
  det = build_detector(tiny_config())
  params, stats = det.init(jax.random.key(0), (64, 64))
  chance = evaluate_ap50(det, params, stats, test, batch_size=16)["map"]
  params, stats, losses = fit(det, train, steps=200, batch_size=8, learning_rate=3e-3)
  ap = evaluate_ap50(det, params, stats, test, batch_size=16)["map"]
  print(f"AP50 untrained {chance:.3f}, trained {ap:.3f}; loss {losses[:5].mean():.2f} -> "
        f"{losses[-20:].mean():.2f}")
  assert losses[-20:].mean() < 0.6 * losses[:5].mean()
  assert chance < 0.05, chance
  assert ap > 0.15, (chance, ap)  # Chance is about 0.001.
