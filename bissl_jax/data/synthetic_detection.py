"""An offline detection dataset: scikit-learn's digits pasted on larger canvases.

Each image is a black ``canvas × canvas`` RGB canvas with 1 to ``max_objects``
handwritten digits (``sklearn.datasets.load_digits``, bundled, no download), each
upscaled bilinearly from 8×8 to a random side in ``[min_size, max_size]`` pixels and
pasted (pixel-wise maximum) at a random position. The objects of one image overlap
little: a placement is redrawn while its box has IoU above 0.1 with an earlier one.
The class of an object is its digit (10 classes); its box is the tight box
``(x1, y1, x2, y2)`` of the pasted digit's ink (pixels above 1/8 of full scale), in
the continuous convention of :mod:`bissl_jax.detection.boxes`.

Every image has the same number of box slots, ``max_objects``; unused slots are
zero boxes with ``gt_valid = False``. The 1,797 digits are first split into disjoint
train / validation / test pools (60 / 20 / 20 %), so test images show writings never
seen in training. Everything is a deterministic function of ``seed``.
"""
from typing import Dict

import numpy as np

from bissl_jax.data.arrays import resize_image

NUM_CLASSES = 10
SPLITS = ("train", "validation", "test")
_INK = 32  # uint8 level above which a pixel counts as ink for the tight box.


def _digit_pools(seed: int):
  from sklearn import datasets as sk_datasets  # pylint: disable=import-outside-toplevel
  digits = sk_datasets.load_digits()
  pixels = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)
  order = np.random.default_rng([seed, 1]).permutation(len(pixels))
  n_train, n_val = int(0.6 * len(order)), int(0.2 * len(order))
  cuts = {"train": order[:n_train], "validation": order[n_train:n_train + n_val],
          "test": order[n_train + n_val:]}
  return pixels, digits.target.astype(np.int32), cuts


def _iou(a, b):
  iw = max(min(a[2], b[2]) - max(a[0], b[0]), 0.0)
  ih = max(min(a[3], b[3]) - max(a[1], b[1]), 0.0)
  inter = iw * ih
  union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
  return inter / union if union > 0 else 0.0


def _compose(rng, pixels, labels, pool, canvas, max_objects, min_size, max_size):
  image = np.zeros((canvas, canvas, 3), np.uint8)
  boxes = np.zeros((max_objects, 4), np.float32)
  classes = np.zeros((max_objects,), np.int32)
  count = int(rng.integers(1, max_objects + 1))
  placed = 0
  for _ in range(count):
    k = int(rng.choice(pool))
    side = int(rng.integers(min_size, max_size + 1))
    patch = resize_image(pixels[k], side)
    ys, xs = np.nonzero(patch[..., 0] > _INK)
    for _attempt in range(20):
      top, left = (int(v) for v in rng.integers(0, canvas - side + 1, size=2))
      box = np.array([left + xs.min(), top + ys.min(), left + xs.max() + 1,
                      top + ys.max() + 1], np.float32)
      if all(_iou(box, boxes[j]) <= 0.1 for j in range(placed)):
        break
    else:
      continue  # No free spot found: the image gets fewer objects.
    region = image[top:top + side, left:left + side]
    np.maximum(region, patch, out=region)
    boxes[placed], classes[placed] = box, labels[k]
    placed += 1
  valid = np.arange(max_objects) < placed
  return image, boxes, classes, valid


def make_split(num_images: int, split: str, *, canvas: int = 64, max_objects: int = 3,
               min_size: int = 16, max_size: int = 32, seed: int = 0
               ) -> Dict[str, np.ndarray]:
  """One split of ``num_images`` canvases.

  Args:
    num_images: images to compose.
    split: ``'train'``, ``'validation'`` or ``'test'`` (which digit pool to draw from).
    canvas: side of the square images.
    max_objects: most digits per image, and the number of box slots.
    min_size, max_size: range of the pasted digits' side in pixels.
    seed: seed of the pools and the composition.

  Returns:
    ``images`` uint8 ``(n, canvas, canvas, 3)``, ``image_sizes`` float32 ``(n, 2)``
    (height, width), ``gt_boxes`` float32 ``(n, max_objects, 4)``, ``gt_classes``
    int32 ``(n, max_objects)``, ``gt_valid`` bool ``(n, max_objects)``.
  """
  if split not in SPLITS:
    raise ValueError(f"split={split!r} is not one of {SPLITS}.")
  if not 1 <= min_size <= max_size <= canvas:
    raise ValueError(f"Digit sides must satisfy 1 <= min_size ({min_size}) <= max_size "
                     f"({max_size}) <= canvas ({canvas}).")
  pixels, labels, pools = _digit_pools(seed)
  rng = np.random.default_rng([seed, 2, SPLITS.index(split)])
  parts = [_compose(rng, pixels, labels, pools[split], canvas, max_objects, min_size,
                    max_size) for _ in range(num_images)]
  images, boxes, classes, valid = (np.stack(x) for x in zip(*parts))
  return {"images": images, "image_sizes": np.full((num_images, 2), canvas, np.float32),
          "gt_boxes": boxes, "gt_classes": classes, "gt_valid": valid}


def load_synthetic_detection_splits(*, num_train: int = 512, num_validation: int = 128,
                                    num_test: int = 128, seed: int = 0, **kwargs
                                    ) -> Dict[str, Dict[str, np.ndarray]]:
  """The three splits (see :func:`make_split` for the arrays and ``kwargs``)."""
  sizes = {"train": num_train, "validation": num_validation, "test": num_test}
  return {s: make_split(n, s, seed=seed, **kwargs) for s, n in sizes.items()}
