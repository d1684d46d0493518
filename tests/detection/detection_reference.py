"""Plain NumPy references for the detection tests (loops, written independently)."""
import numpy as np


def np_iou(a, b):
  out = np.zeros((len(a), len(b)))
  for i, p in enumerate(a):
    for j, q in enumerate(b):
      iw = max(min(p[2], q[2]) - max(p[0], q[0]), 0.0)
      ih = max(min(p[3], q[3]) - max(p[1], q[1]), 0.0)
      inter = iw * ih
      union = (p[2] - p[0]) * (p[3] - p[1]) + (q[2] - q[0]) * (q[3] - q[1]) - inter
      out[i, j] = inter / union if union > 0 else 0.0
  return out


def np_greedy_nms(boxes, scores, thr, classes=None):
  """Indices kept by greedy NMS, equal scores taken lower index first."""
  order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
  keep, alive = [], set(order)
  iou = np_iou(boxes, boxes)
  for i in order:
    if i not in alive:
      continue
    keep.append(i)
    for j in list(alive):
      if iou[i, j] > thr and (classes is None or classes[i] == classes[j]):
        alive.discard(j)
    alive.discard(i)
  return keep


def np_decode(ref, deltas, weights, clamp=np.log(1000.0 / 16)):
  out = np.zeros_like(deltas, dtype=np.float64)
  for k, (r, d) in enumerate(zip(ref, deltas)):
    w, h = r[2] - r[0], r[3] - r[1]
    cx, cy = r[0] + w / 2, r[1] + h / 2
    dx, dy = d[0] / weights[0], d[1] / weights[1]
    dw, dh = min(d[2] / weights[2], clamp), min(d[3] / weights[3], clamp)
    px, py, pw, ph = cx + dx * w, cy + dy * h, w * np.exp(dw), h * np.exp(dh)
    out[k] = [px - pw / 2, py - ph / 2, px + pw / 2, py + ph / 2]
  return out
