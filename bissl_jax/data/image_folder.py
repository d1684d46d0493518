"""Your own images as a dataset: a folder with one subfolder per class.

Give ``folder:<path>`` wherever a dataset name goes (``--config.data.pretext_dataset``,
``--config.data.downstream_dataset``, or both). Two layouts are read::

  <path>/<class>/<image>                   one pool: validation and test are carved
                                           out of it (stratified, data.val_fraction each)
  <path>/train/<class>/<image>             given splits; val/ (or validation/) and
  <path>/val/<class>/<image>   (optional)  test/ are optional, and a missing one is
  <path>/test/<class>/<image>  (optional)  carved out of train the same way

Classes are the subfolder names of the training folder, sorted; every image PIL opens
counts (``.jpg``, ``.jpeg``, ``.png``, ``.bmp``, ``.gif``, ``.webp``, ``.tif``,
``.tiff``). As a pretext set, the training images are used without their labels.
"""
import os
from typing import Dict, List, Optional, Tuple

import numpy as np

from bissl_jax.data.arrays import ArrayDataset, decode_image
from bissl_jax.data.catalogue import DatasetNotFoundError, DatasetSpec

PREFIX = "folder:"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
VAL_NAMES = ("val", "validation")


def is_folder_name(name) -> bool:
  return isinstance(name, str) and name.strip().startswith(PREFIX)


def root_of(name: str) -> str:
  return os.path.abspath(os.path.expanduser(name.strip()[len(PREFIX):]))


def _classes(directory: str) -> List[str]:
  return sorted(d for d in os.listdir(directory)
                if os.path.isdir(os.path.join(directory, d)) and not d.startswith("."))


def layout(root: str) -> Dict[str, Optional[str]]:
  """``{'train', 'validation', 'test'}`` → the folder of each split (None: carved out)."""
  if not os.path.isdir(os.path.join(root, "train")):
    return {"train": root, "validation": None, "test": None}
  val = next((os.path.join(root, v) for v in VAL_NAMES if os.path.isdir(os.path.join(root, v))),
             None)
  test = os.path.join(root, "test")
  return {"train": os.path.join(root, "train"), "validation": val,
          "test": test if os.path.isdir(test) else None}


def problem(root: str) -> Optional[str]:
  """Why ``root`` is not a usable image folder, or None."""
  if not os.path.isdir(root):
    return f"no folder {root}"
  train = layout(root)["train"]
  classes = _classes(train)
  if len(classes) < 2:
    return f"{train} needs one subfolder per class (at least 2), holding the images"
  empty = [c for c in classes if not _images(os.path.join(train, c))]
  if empty:
    return f"class folders without images in {train}: {empty[:5]}"
  return None


def spec_of(name: str) -> DatasetSpec:
  """The catalogue entry of ``folder:<path>`` (its class count read from the folders)."""
  root = root_of(name)
  err = problem(root)
  if err:
    raise DatasetNotFoundError(f"{name}: {err}. " + LAYOUT_HINT)
  return DatasetSpec(name=PREFIX + root, tfds_name=None, train_split="train",
                     val_split="validation", test_split="test",
                     num_classes=len(_classes(layout(root)["train"])), source="imagefolder")


LAYOUT_HINT = ("Give --config.data.*_dataset=folder:<path> with <path>/<class>/<image> "
               "(or <path>/train/<class>/..., optional val/ and test/); docs/datasets.md.")


def _images(directory: str) -> List[str]:
  return sorted(os.path.join(directory, f) for f in os.listdir(directory)
                if f.lower().endswith(IMAGE_SUFFIXES))


def _read(directory: str, classes: List[str], image_size: int, name: str,
          max_examples: Optional[int]) -> ArrayDataset:
  entries: List[Tuple[str, int]] = []
  for label, cls in enumerate(classes):
    sub = os.path.join(directory, cls)
    if os.path.isdir(sub):
      entries += [(path, label) for path in _images(sub)]
  if max_examples is not None:
    entries = entries[:max_examples]
  images = np.empty((len(entries), image_size, image_size, 3), np.uint8)
  for i, (path, _) in enumerate(entries):
    images[i] = decode_image(path, image_size)
  labels = np.asarray([label for _, label in entries], np.int32)
  return ArrayDataset(images, labels, num_classes=len(classes), name=name)


def load_splits(name: str, *, image_size: int, val_fraction: float, seed: int,
                split_off, max_examples: Optional[int] = None) -> Dict[str, ArrayDataset]:
  """Train, validation and test of ``folder:<path>``; missing ones carved out of train.

  ``split_off(train, fraction, seed) -> (kept, held)`` is the stratified split of the
  TFDS sets (``tfds_loader._split_off_validation``), so folders split the same way.
  """
  spec = spec_of(name)
  folders = layout(root_of(name))
  classes = _classes(folders["train"])
  read = lambda split: _read(folders[split], classes, image_size,  # noqa: E731
                             f"{spec.name}/{split}", max_examples)
  train = read("train")
  out = {}
  if folders["test"] is None:
    train, out["test"] = split_off(train, val_fraction, seed + 1)
  else:
    out["test"] = read("test")
  if folders["validation"] is None:
    train, out["validation"] = split_off(train, val_fraction, seed)
  else:
    out["validation"] = read("validation")
  out["train"] = train
  for split, dataset in out.items():
    dataset.name = f"{spec.name}/{split}"
  return {k: out[k] for k in ("train", "validation", "test")}


def load_pretext(name: str, *, image_size: int, max_examples: Optional[int] = None
                 ) -> ArrayDataset:
  """The training images of ``folder:<path>`` (labels kept but unused by pretext tasks)."""
  spec = spec_of(name)
  train = layout(root_of(name))["train"]
  return _read(train, _classes(train), image_size, f"{spec.name}/train", max_examples)
