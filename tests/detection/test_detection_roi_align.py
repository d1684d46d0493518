"""RoIAlign against a per-sample NumPy transcription of the bilinear kernel, written here."""
import math

import jax
import numpy as np
import pytest

from bissl_jax.detection.roi_align import roi_align


def _bilinear(fmap, y, x):
  h, w, _ = fmap.shape
  if y < -1.0 or y > h or x < -1.0 or x > w:
    return np.zeros(fmap.shape[-1])
  y, x = max(y, 0.0), max(x, 0.0)
  y0, x0 = int(y), int(x)
  if y0 >= h - 1:
    y0 = y1 = h - 1
    y = float(y0)
  else:
    y1 = y0 + 1
  if x0 >= w - 1:
    x0 = x1 = w - 1
    x = float(x0)
  else:
    x1 = x0 + 1
  ly, lx = y - y0, x - x0
  return ((1 - ly) * (1 - lx) * fmap[y0, x0] + (1 - ly) * lx * fmap[y0, x1]
          + ly * (1 - lx) * fmap[y1, x0] + ly * lx * fmap[y1, x1])


def _np_roi_align(fmap, box, out, scale, ratio, aligned=True, cap=None):
  off = 0.5 if aligned else 0.0
  x1, y1, x2, y2 = [c * scale for c in box]
  sx, sy = x1 - off, y1 - off
  rw, rh = x2 - x1, y2 - y1
  if not aligned:
    rw, rh = max(rw, 1.0), max(rh, 1.0)
  bw, bh = rw / out, rh / out
  gy = ratio if ratio > 0 else math.ceil(rh / out)
  gx = ratio if ratio > 0 else math.ceil(rw / out)
  if cap is not None:  # The documented static cap of the adaptive grid.
    gy, gx = min(gy, cap[0]), min(gx, cap[1])
  res = np.zeros((out, out, fmap.shape[-1]))
  for ph in range(out):
    for pw in range(out):
      acc = 0.0
      for iy in range(gy):
        y = sy + ph * bh + (iy + 0.5) * bh / gy
        for ix in range(gx):
          x = sx + pw * bw + (ix + 0.5) * bw / gx
          acc = acc + _bilinear(fmap, y, x)
      res[ph, pw] = acc / max(gy * gx, 1)
  return res


BOXES = np.array([
    [[3.0, 5.0, 40.0, 30.0], [-20.0, -10.0, 25.0, 12.0], [50.0, 40.0, 90.0, 75.0],
     [10.0, 10.0, 10.5, 11.0]],  # Inside, crossing the top-left, crossing the bottom-right, tiny.
    [[0.0, 0.0, 64.0, 48.0], [30.0, 2.0, 33.0, 60.0], [-70.0, -70.0, -40.0, -50.0],
     [12.0, 20.0, 52.0, 44.0]],  # Whole map, thin, far outside, inside.
], np.float32)


@pytest.mark.parametrize("ratio,aligned", [(2, True), (0, True), (1, False)])
def test_roi_align_matches_kernel_transcription(ratio, aligned):
  rng = np.random.default_rng(0)
  feats = rng.normal(size=(2, 6, 8, 3)).astype(np.float32)
  scale, out = 1.0 / 8, 3
  got = np.asarray(jax.jit(roi_align, static_argnums=(2, 3, 4, 5))(
      feats, BOXES, out, scale, ratio, aligned))
  assert got.shape == (2, 4, out, out, 3)
  for n in range(2):
    for r in range(4):
      cap = (math.ceil(6 / out), math.ceil(8 / out)) if ratio == 0 else None
      want = _np_roi_align(feats[n], BOXES[n, r], out, scale, ratio, aligned, cap)
      np.testing.assert_allclose(got[n, r], want, rtol=1e-5, atol=1e-5, err_msg=f"{n},{r}")


def test_roi_align_of_constant_map_is_constant_inside():
  feats = np.full((1, 5, 5, 2), 3.0, np.float32)
  got = np.asarray(roi_align(feats, np.array([[[8.0, 8.0, 56.0, 40.0]]], np.float32), 4,
                             1.0 / 16, 2))
  np.testing.assert_allclose(got, 3.0, rtol=1e-6)


def test_adaptive_grid_is_exact_for_boxes_inside_the_map():
  rng = np.random.default_rng(1)
  feats = rng.normal(size=(1, 6, 8, 2)).astype(np.float32)
  boxes = np.array([[[0.0, 0.0, 64.0, 48.0], [5.0, 3.0, 61.0, 47.0], [20.0, 10.0, 23.0, 14.0]]],
                   np.float32)
  got = np.asarray(roi_align(feats, boxes, 3, 1.0 / 8, 0))
  for r in range(3):
    want = _np_roi_align(feats[0], boxes[0, r], 3, 1.0 / 8, 0)
    np.testing.assert_allclose(got[0, r], want, rtol=1e-5, atol=1e-5)


def test_roi_align_gradient_reaches_the_features():
  feats = np.ones((1, 4, 4, 1), np.float32)
  g = jax.grad(lambda f: roi_align(f, np.array([[[4.0, 4.0, 12.0, 12.0]]], np.float32),
                                   2, 0.25, 2).sum())(feats)
  np.testing.assert_allclose(float(g.sum()), 4.0, rtol=1e-6)  # Four bins, weights sum to 1.


def test_roi_align_shape_error_names_the_layout():
  with pytest.raises(ValueError, match=r"features \(N, H, W, C\) and boxes \(N, R, 4\)"):
    roi_align(np.zeros((1, 4, 4, 2)), np.zeros((2, 3, 4)), 2, 1.0, 2)
