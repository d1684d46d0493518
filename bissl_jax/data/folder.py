"""FGVC-Aircraft read from a local copy of the official archive.

FGVC-Aircraft (Maji et al., 2013) is not in TFDS. Download
``fgvc-aircraft-2013b.tar.gz`` from
https://www.robots.ox.ac.uk/~vgg/data/fgvc-aircraft/ and extract it under your
data directory, giving::

    <data_dir>/fgvc-aircraft-2013b/data/images/<image id>.jpg
    <data_dir>/fgvc-aircraft-2013b/data/variants.txt            (100 names)
    <data_dir>/fgvc-aircraft-2013b/data/images_variant_train.txt
    <data_dir>/fgvc-aircraft-2013b/data/images_variant_val.txt
    <data_dir>/fgvc-aircraft-2013b/data/images_variant_test.txt

Labels are the 100 *variants* (the usual transfer-learning task), numbered in
the order of ``variants.txt``. Each split file line is ``<image id> <variant>``;
variant names may contain spaces and slashes ("Cessna 172", "F-16A/B").
"""
import os
from typing import Optional

import numpy as np

from bissl_jax.data.arrays import ArrayDataset, decode_image
from bissl_jax.data.catalogue import DatasetNotFoundError

ARCHIVE_DIR = 'fgvc-aircraft-2013b'
# The official images carry a 20-pixel copyright banner along the bottom edge.
BANNER_HEIGHT = 20
_SPLIT_FILES = {'train': 'train', 'val': 'val', 'validation': 'val',
                'test': 'test', 'trainval': 'trainval'}


def find_fgvc_root(data_dir: str) -> str:
  """Returns the folder holding ``data/`` (``data_dir`` or its archive folder).

  Raises:
    DatasetNotFoundError: when neither ``<data_dir>/fgvc-aircraft-2013b/data``
      nor ``<data_dir>/data`` has the official files.
  """
  for root in (os.path.join(data_dir, ARCHIVE_DIR), data_dir):
    if os.path.isfile(os.path.join(root, 'data', 'variants.txt')):
      return root
  raise DatasetNotFoundError(
      f'FGVC-Aircraft not found under {data_dir!r}: expected '
      f'{os.path.join(data_dir, ARCHIVE_DIR, "data", "variants.txt")} and '
      'data/images/*.jpg next to it. Nothing is downloaded at run time. Fetch '
      'fgvc-aircraft-2013b.tar.gz from '
      'https://www.robots.ox.ac.uk/~vgg/data/fgvc-aircraft/, extract it into '
      f'{data_dir!r}, and set config.data.data_dir to that folder.')


def _read_lines(path: str) -> list[str]:
  with open(path, encoding='utf-8') as f:
    return [line.strip() for line in f if line.strip()]


def fgvc_entries(root: str, split: str) -> tuple[list[str], np.ndarray, int]:
  """The image paths and variant labels of one FGVC-Aircraft split.

  Args:
    root: the archive folder (holding ``data/``) or the folder containing
      ``fgvc-aircraft-2013b/``.
    split: 'train', 'val' (or 'validation'), 'test' or 'trainval'.

  Returns:
    ``(paths, labels, num_classes)``: one path per line of the split file, int32
    labels in the order of ``variants.txt``, and the number of variants.

  Raises:
    DatasetNotFoundError: the folder or one of its files is missing.
    ValueError: an unknown split or a variant missing from ``variants.txt``.
  """
  if split not in _SPLIT_FILES:
    raise ValueError(f'Unknown FGVC-Aircraft split {split!r}; use one of '
                     f'{sorted(_SPLIT_FILES)}.')
  root = find_fgvc_root(root)
  data = os.path.join(root, 'data')
  split_file = os.path.join(data, f'images_variant_{_SPLIT_FILES[split]}.txt')
  if not os.path.isfile(split_file):
    raise DatasetNotFoundError(
        f'FGVC-Aircraft split file {split_file} is missing; re-extract '
        'fgvc-aircraft-2013b.tar.gz.')
  variants = _read_lines(os.path.join(data, 'variants.txt'))
  class_index = {v: i for i, v in enumerate(variants)}
  paths, labels = [], []
  for image_id, variant in (line.split(' ', 1) for line in _read_lines(split_file)):
    if variant not in class_index:
      raise ValueError(f'{split_file}: variant {variant!r} of image '
                       f'{image_id} is not listed in variants.txt.')
    paths.append(os.path.join(data, 'images', f'{image_id}.jpg'))
    labels.append(class_index[variant])
  return paths, np.asarray(labels, np.int32), len(variants)


def load_fgvc_aircraft(root: str, split: str, *, image_size: int,
                       max_examples: Optional[int] = None) -> ArrayDataset:
  """Loads one FGVC-Aircraft split with variant labels.

  The bottom ``BANNER_HEIGHT`` rows (copyright banner) are cropped off, then
  the short side is resized to ``image_size`` and the centre square kept.

  Args:
    root: the archive folder (holding ``data/``) or the folder containing
      ``fgvc-aircraft-2013b/``.
    split: 'train', 'val' (or 'validation'), 'test' or 'trainval'.
    image_size: side of the stored square images.
    max_examples: read only the first examples of the split file (smoke runs).

  Returns:
    An :class:`ArrayDataset` with 100 classes.

  Raises:
    DatasetNotFoundError: the folder or one of its files is missing.
    ValueError: an unknown split or a variant missing from ``variants.txt``.
  """
  paths, labels, num_classes = fgvc_entries(root, split)
  if max_examples is not None:
    paths, labels = paths[:max_examples], labels[:max_examples]
  images = np.empty((len(paths), image_size, image_size, 3), np.uint8)
  for i, path in enumerate(paths):
    images[i] = read_fgvc_image(path, image_size)
  return ArrayDataset(images=images, labels=labels, num_classes=num_classes,
                      name=f'fgvc_aircraft/{split}')


def read_fgvc_image(path: str, image_size: int, *, draft: bool = False
                    ) -> np.ndarray:
  """One FGVC-Aircraft image without its banner, resized and centre-cropped
  (``draft``: see :func:`bissl_jax.data.arrays.decode_image`)."""
  if not os.path.isfile(path):
    raise DatasetNotFoundError(f'FGVC-Aircraft image {path} is missing; '
                               're-extract fgvc-aircraft-2013b.tar.gz.')
  return decode_image(path, image_size, crop_bottom=BANNER_HEIGHT, draft=draft)
