"""Any prepared TFDS dataset as a dataset, by name: ``tfds:<name>`` (``tfds:<name>/<config>``).

Give ``tfds:<name>`` wherever a dataset name goes (``--config.data.pretext_dataset``,
``--config.data.downstream_dataset``, or both), with the dataset prepared under
``config.data.data_dir`` (or TFDS's default folder)::

  tfds build <name> --data_dir=<data_dir> --file_format=array_record

The dataset is read from its prepared files (TFDS's read-only builder), so a dataset
prepared from your own builder code needs no import of that code. Its image is the
``image`` feature (else the first image feature), its label the ``label`` feature (else
the first class label). Splits: ``train``; ``test`` if it exists, else ``validation``
is the test set; ``validation`` (when not the test set) is the validation set, else a
stratified ``data.val_fraction`` of ``train`` is carved out.
"""
import functools
import glob
import os
from typing import Optional

from bissl_jax.data.catalogue import DatasetNotFoundError, DatasetSpec

PREFIX = "tfds:"
HINT = ("Give --config.data.*_dataset=tfds:<name> for a dataset prepared with "
        "`tfds build <name> --data_dir=<data_dir> --file_format=array_record` and "
        "--config.data.data_dir=<data_dir>; docs/datasets.md.")


def is_tfds_name(name) -> bool:
  return isinstance(name, str) and name.strip().startswith(PREFIX)


def builder_name(name: str) -> str:
  """``tfds:<name>[/<config>]`` → ``<name>[/<config>]``."""
  return name.strip()[len(PREFIX):].strip("/")


def _prepared(tfds_name: str, root: str) -> bool:
  if "://" in root:  # a bucket: leave the check to TFDS
    return True
  return bool(glob.glob(os.path.join(root, tfds_name, "*", "dataset_info.json")))


def _pick(features, wanted: str, kind) -> Optional[str]:
  if wanted in features and isinstance(features[wanted], kind):
    return wanted
  return next((k for k, f in features.items() if isinstance(f, kind)), None)


@functools.lru_cache(maxsize=None)
def _spec(name: str, root: str) -> DatasetSpec:
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top  (read on use)
  tfds_name = builder_name(name)
  if not tfds_name:
    raise DatasetNotFoundError(f"{name!r} names no dataset. {HINT}")
  if not _prepared(tfds_name, root):
    raise DatasetNotFoundError(
        f"{name!r} is not prepared in {root}: looked for {os.path.join(root, tfds_name)}"
        f"/<version>/dataset_info.json. Prepare it once with\n    tfds build {tfds_name} "
        f"--data_dir={root} --file_format=array_record\nand set config.data.data_dir to "
        "that folder.")
  info = tfds.builder(tfds_name, data_dir=root).info
  features, splits = info.features, set(info.splits)
  image_key = _pick(features, "image", tfds.features.Image)
  label_key = _pick(features, "label", tfds.features.ClassLabel)
  if image_key is None or label_key is None:
    raise DatasetNotFoundError(
        f"{name!r} needs an image feature and a class-label feature; it has "
        f"{dict((k, type(f).__name__) for k, f in features.items())}.")
  test = "test" if "test" in splits else "validation" if "validation" in splits else None
  if "train" not in splits or test is None:
    raise DatasetNotFoundError(
        f"{name!r} needs a 'train' split and a 'test' or 'validation' split; it has "
        f"{sorted(splits)}.")
  val = "validation" if test == "test" and "validation" in splits else None
  return DatasetSpec(name=PREFIX + tfds_name, tfds_name=tfds_name, train_split="train",
                     val_split=val, test_split=test,
                     num_classes=int(features[label_key].num_classes),
                     image_key=image_key, label_key=label_key)


def spec_of(name: str, data_dir: Optional[str] = None) -> DatasetSpec:
  """The catalogue entry of ``tfds:<name>``, read from its prepared files in ``data_dir``.

  Raises:
    DatasetNotFoundError: not prepared there, or without an image, a class label, a
      ``train`` split or a test split.
  """
  from bissl_jax.data import availability  # pylint: disable=g-import-not-at-top  (imports us)
  return _spec(name.strip(), availability.tfds_data_dir(data_dir))
