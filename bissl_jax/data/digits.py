"""The offline default dataset: scikit-learn's bundled handwritten digits.

``sklearn.datasets.load_digits`` ships with scikit-learn (no download): 1,797
real 8×8 grayscale images of the digits 0–9 with values 0–16. They are scaled to
uint8, upscaled bilinearly to ``image_size`` and stored with 3 channels.

With the defaults (test_fraction=0.2, val_fraction=0.2) the stratified splits
hold exactly 1,150 train, 288 validation and 359 test images:
test = round(0.2 · 1797) = 359 first, then validation = round(0.2 · 1438) = 288
of the rest. Select models on 'validation' only; 'test' is for the reported
numbers and must never drive any choice.
"""
import numpy as np

from bissl_jax.data.arrays import ArrayDataset, resize_images, stratified_split

NUM_DIGITS = 1797


def load_digits_splits(*, image_size: int = 32, val_fraction: float = 0.2,
                       test_fraction: float = 0.2, seed: int = 0
                       ) -> dict[str, ArrayDataset]:
  """Loads the digits and splits them into train, validation and test.

  Both splits are stratified by class (see ``arrays.stratified_split``): the
  test split is drawn first (``test_fraction`` of all 1,797 images), then the
  validation split (``val_fraction`` of the remainder). Defaults give 1,150 /
  288 / 359 images. The splits are disjoint and a deterministic function of
  ``seed``; keep the seed fixed when comparing pipelines or training seeds.

  Args:
    image_size: side of the stored square images (bilinear upscaling of 8×8).
    val_fraction: share of the non-test images held out for validation.
    test_fraction: share of all images held out for test. Never select
      hyperparameters or checkpoints on it.
    seed: seed of the split.

  Returns:
    ``{'train', 'validation', 'test'}`` → :class:`ArrayDataset` with uint8
    images (n, image_size, image_size, 3) and int32 labels in 0..9.
  """
  # Imported here: scikit-learn is slow to import and only this loader needs it.
  from sklearn import datasets as sk_datasets  # pylint: disable=import-outside-toplevel
  digits = sk_datasets.load_digits()
  # Raw values are integer counts 0..16 (pixels of a 4x4-block downsample).
  pixels = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)
  images = resize_images(pixels, image_size)
  labels = digits.target.astype(np.int32)

  rest, test = stratified_split(labels, test_fraction, seed=[seed, 0])
  train_in_rest, val_in_rest = stratified_split(labels[rest], val_fraction,
                                                seed=[seed, 1])
  indices = {'train': rest[train_in_rest], 'validation': rest[val_in_rest],
             'test': test}
  return {split: ArrayDataset(images=images[idx], labels=labels[idx],
                              num_classes=10, name=f'digits/{split}')
          for split, idx in indices.items()}
