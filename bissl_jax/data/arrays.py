"""In-memory image datasets, host-side resizing and stratified splitting.

Every loader in ``bissl_jax.data`` returns an :class:`ArrayDataset`: all images of
one dataset share one square storage size (resized once on the host, when the
dataset is loaded), so a batch is a plain ``np.take``. Random crops, flips and
the evaluation resize happen later, on device.
"""
import dataclasses
import io
from typing import Optional, Sequence, Union

import numpy as np
import PIL.Image

ImagesLike = Union[np.ndarray, Sequence[np.ndarray]]


@dataclasses.dataclass
class ArrayDataset:
  """Images and labels held in host memory.

  Attributes:
    images: uint8 array (N, H, W, 3); grayscale sources are stored as 3 channels.
    labels: int32 (N,) class indices for single-label sets (-1 means unlabelled),
      or float32 (N, C) multi-hot targets for multi-label sets (bool input is cast).
    num_classes: number of classes C.
    multilabel: whether ``labels`` is multi-hot.
    name: a short name for logs.
    difficult: optional bool (N, C), multi-label only. True where a class occurs
      in the image only through objects marked "difficult" (PASCAL VOC); such
      entries are left out of the 11-point mAP (pass it as ``ignore`` to
      ``bissl_jax.evaluation.metrics.mean_average_precision_11point``).
  """
  images: np.ndarray
  labels: np.ndarray
  num_classes: int
  multilabel: bool = False
  name: str = ''
  difficult: Optional[np.ndarray] = None

  def __post_init__(self):
    images = np.asarray(self.images)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
      raise ValueError(
          f'ArrayDataset {self.name!r}: images must be uint8 (N, H, W, 3), got '
          f'{images.dtype} {images.shape}. Convert with resize_images().')
    labels = np.asarray(self.labels)
    if len(labels) != len(images):
      raise ValueError(f'ArrayDataset {self.name!r}: {len(images)} images but '
                       f'{len(labels)} labels.')
    if self.multilabel:
      if labels.ndim != 2 or labels.shape[1] != self.num_classes:
        raise ValueError(
            f'ArrayDataset {self.name!r}: multi-label targets must be (N, '
            f'{self.num_classes}) multi-hot, got shape {labels.shape}.')
      labels = labels.astype(np.float32)
    else:
      if labels.ndim != 1:
        raise ValueError(f'ArrayDataset {self.name!r}: single-label targets '
                         f'must be (N,) class indices, got {labels.shape}.')
      labels = labels.astype(np.int32)
      if labels.size and labels.max() >= self.num_classes:
        raise ValueError(f'ArrayDataset {self.name!r}: label {labels.max()} '
                         f'is out of range for {self.num_classes} classes.')
    if self.difficult is not None:
      difficult = np.asarray(self.difficult, dtype=bool)
      if difficult.shape != labels.shape:
        raise ValueError(f'ArrayDataset {self.name!r}: difficult mask shape '
                         f'{difficult.shape} != labels shape {labels.shape}.')
      self.difficult = difficult
    self.images, self.labels = images, labels

  def __len__(self) -> int:
    return len(self.images)

  @property
  def image_size(self) -> int:
    """Side of the (square) stored images."""
    return int(self.images.shape[1])

  def batch(self, indices) -> dict:
    """Gathers examples.

    Args:
      indices: integer array of any shape S (e.g. a row of ``BatchStack.take``).

    Returns:
      ``{'image': uint8 S+(H, W, 3), 'label': int32 S or float32 S+(C,)}``.
    """
    indices = np.asarray(indices)
    return {'image': np.take(self.images, indices, axis=0),
            'label': np.take(self.labels, indices, axis=0)}

  def subset(self, indices) -> 'ArrayDataset':
    """A new dataset holding copies of the examples at ``indices`` (1-D)."""
    indices = np.asarray(indices, dtype=np.int64)
    return dataclasses.replace(
        self, images=self.images[indices], labels=self.labels[indices],
        difficult=None if self.difficult is None else self.difficult[indices])


def to_rgb_uint8(image: np.ndarray) -> np.ndarray:
  """Returns ``image`` as uint8 (H, W, 3): gray is repeated, alpha dropped."""
  image = np.asarray(image)
  if image.dtype != np.uint8:
    raise ValueError(f'Expected a uint8 image, got {image.dtype}; scale it to '
                     '0..255 and cast first.')
  if image.ndim == 2:
    image = image[..., None]
  if image.ndim != 3 or image.shape[-1] not in (1, 3, 4):
    raise ValueError(f'Expected an (H, W), (H, W, 1), (H, W, 3) or (H, W, 4) '
                     f'image, got shape {image.shape}.')
  if image.shape[-1] == 1:
    image = np.repeat(image, 3, axis=-1)
  return image[..., :3]


def resize_image(image: np.ndarray, size: int) -> np.ndarray:
  """Resizes the short side to ``size`` (bilinear) and centre-crops a square.

  PIL's bilinear filter widens its support when shrinking, so downscaling is
  anti-aliased; upscaling is plain bilinear interpolation.

  Args:
    image: uint8 (H, W), (H, W, 1), (H, W, 3) or (H, W, 4).
    size: side of the square output.

  Returns:
    uint8 (size, size, 3).
  """
  image = to_rgb_uint8(image)
  height, width = image.shape[:2]
  if (height, width) == (size, size):
    return image
  scale = size / min(height, width)
  new_h = max(size, int(round(height * scale)))
  new_w = max(size, int(round(width * scale)))
  resized = PIL.Image.fromarray(image).resize((new_w, new_h),
                                              PIL.Image.BILINEAR)
  top, left = (new_h - size) // 2, (new_w - size) // 2
  return np.asarray(resized)[top:top + size, left:left + size]


def decode_image(source, size: int, *, crop_bottom: int = 0,
                 draft: bool = False) -> np.ndarray:
  """Decodes an encoded image (bytes or a path), then :func:`resize_image`.

  Args:
    source: the encoded file's bytes, or its path.
    size: side of the square output.
    crop_bottom: rows cut off the bottom first (FGVC-Aircraft's banner), in
      pixels of the full-size image.
    draft: let a JPEG decode at a reduced scale (PIL ``draft``: 1/2, 1/4 or 1/8
      in the DCT domain) that still leaves every side at least ``size``; several
      times faster for large photos and small ``size``, but the pixels differ
      slightly from a full decode followed by the same resize.

  Returns:
    uint8 (size, size, 3).
  """
  opened = PIL.Image.open(io.BytesIO(source) if isinstance(source, bytes)
                          else source)
  with opened as img:
    full_height = img.size[1]
    if draft and img.format == 'JPEG':
      img.draft('RGB', (size, size))
    pixels = np.asarray(img.convert('RGB'))
  if crop_bottom:
    cut = int(round(crop_bottom * pixels.shape[0] / full_height))
    if pixels.shape[0] > cut:
      pixels = pixels[:pixels.shape[0] - cut]
  return resize_image(pixels, size)


def resize_images(images: ImagesLike, size: int) -> np.ndarray:
  """Resizes every image to a ``size`` square (see :func:`resize_image`).

  Args:
    images: a uint8 array (N, H, W[, C]) or a sequence of uint8 images whose
      sizes may differ.
    size: side of the square output.

  Returns:
    uint8 (N, size, size, 3).
  """
  out = np.empty((len(images), size, size, 3), np.uint8)
  for i, image in enumerate(images):
    out[i] = resize_image(image, size)
  return out


def stratified_split(strata: np.ndarray, fraction: float, *, seed
                     ) -> tuple[np.ndarray, np.ndarray]:
  """Splits indices so that each stratum is held out in proportion ``fraction``.

  Exactly ``round(fraction · N)`` examples are held out. Each stratum of size
  n_c gets ``floor(fraction · n_c)`` of them; the few left over go to the strata
  with the largest fractional remainders (ties broken at random), so no
  stratum's share is off by one example or more. A stratum of one example can
  therefore land on either side.

  Args:
    strata: (N,) integer stratum of each example (its class).
    fraction: share to hold out, in [0, 1).
    seed: an int or a sequence of ints for ``np.random.default_rng``.

  Returns:
    ``(kept, held_out)``: sorted, disjoint int64 index arrays covering 0..N-1.
  """
  if not 0.0 <= fraction < 1.0:
    raise ValueError(f'fraction must be in [0, 1), got {fraction}.')
  strata = np.asarray(strata)
  rng = np.random.default_rng(seed)
  classes, counts = np.unique(strata, return_counts=True)
  exact = fraction * counts
  quota = np.floor(exact).astype(np.int64)
  remaining = int(round(fraction * len(strata))) - int(quota.sum())
  if remaining > 0:
    # Largest remainder first; a random key breaks ties.
    order = np.lexsort((rng.random(len(classes)), -(exact - quota)))
    quota[order[:remaining]] += 1
  held = []
  for cls, q in zip(classes, quota):
    members = np.flatnonzero(strata == cls)
    held.append(rng.permutation(members)[:q])
  held_out = np.sort(np.concatenate(held)) if held else np.zeros(0, np.int64)
  kept = np.setdiff1d(np.arange(len(strata)), held_out)
  return kept.astype(np.int64), held_out.astype(np.int64)


def split_strata(dataset: ArrayDataset) -> np.ndarray:
  """The stratum used to split ``dataset``: its class, or for multi-label sets
  the lowest-index positive class (-1 when an example has none)."""
  if not dataset.multilabel:
    return dataset.labels
  positive = dataset.labels > 0
  return np.where(positive.any(axis=1), positive.argmax(axis=1), -1)
