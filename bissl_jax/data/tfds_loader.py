"""Loading catalogue datasets into host memory, without TensorFlow.

TFDS reads prepared data through its random-access data sources
(``builder.as_data_source``), which decode with NumPy and PIL and do not need
TensorFlow. They read the ``array_record`` (or ``parquet``) file format, so
prepare datasets with::

    tfds build <tfds_name> --data_dir=<data_dir> --file_format=array_record

Datasets already prepared in TFDS's default ``tfrecord`` format are read too,
by the small sequential :class:`TFRecordSource` below (record framing per the
TFRecord format; checksums are not verified). Nothing is ever downloaded: a
dataset that is not prepared raises :class:`DatasetNotFoundError` naming the
builder and the command that prepares it.

Memory: :func:`load_tfds_split` materialises a split as uint8 arrays,
N · S² · 3 bytes for N images stored at S×S (e.g. Food-101 train, 75,750 images
at 112 px: 2.9 GB; STL-10 unlabelled, 100,000 at 96 px: 2.8 GB). That suits
every catalogue set except ImageNet (1.28 M images: 48 GB at 112 px); for it
use :func:`open_tfds_split`, which decodes each batch on demand.
"""
import os
import struct
from typing import Any, Optional, Sequence

import numpy as np

from bissl_jax.data import folder
from bissl_jax.data import image_folder
from bissl_jax.data.arrays import (ArrayDataset, resize_image, split_strata,
                                   stratified_split)
from bissl_jax.data.catalogue import DatasetNotFoundError, DatasetSpec, get_spec
from bissl_jax.data.digits import load_digits_splits

__all__ = ['DatasetNotFoundError', 'LazyTfdsDataset', 'TFRecordSource',
           'load_pretext_split', 'load_splits', 'load_tfds_split',
           'open_tfds_split']


def _builder(spec: DatasetSpec, data_dir: Optional[str]):
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  if spec.source != 'tfds' or not spec.tfds_name:
    raise ValueError(f'Dataset {spec.name!r} is not a TFDS dataset '
                     f'(source={spec.source!r}); use load_splits().')
  return tfds.builder(spec.tfds_name, data_dir=data_dir)


def _not_prepared_message(spec: DatasetSpec, builder, data_dir) -> str:
  where = data_dir or "TFDS's default (~/tensorflow_datasets or $TFDS_DATA_DIR)"
  shown_dir = data_dir or '<data_dir>'
  steps = ''
  if spec.manual_download:
    steps = (f'Download ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar '
             f'(and optionally ILSVRC2012_img_test.tar) from image-net.org into '
             f'{os.path.join(shown_dir, "downloads", "manual")}/, then run:\n')
  return (
      f'Dataset {spec.name!r} (TFDS builder {spec.tfds_name!r}) is not prepared '
      f'in data_dir {where}: looked for {builder.data_dir}. Nothing is '
      f'downloaded at run time. {steps}Prepare it once (on a machine with '
      f'internet access and TensorFlow if the builder needs it) with\n'
      f'    tfds build {spec.tfds_name} --data_dir={shown_dir} '
      f'--file_format=array_record\n'
      f'and set config.data.data_dir (the data_dir argument) to that folder.')


class TFRecordSource(Sequence):
  """Random access to a split stored as TFRecord files, without TensorFlow.

  Builds an offset index by walking the record headers of each shard (one seek
  per record), then reads and decodes single records on demand. The framing is
  ``uint64 length | uint32 crc | data | uint32 crc`` (little endian); the CRCs
  are skipped, not checked.
  """

  def __init__(self, file_instructions, deserialize, data_dir: str = ''):
    self._handles = {}  # file id -> open file, filled lazily by __getitem__
    self._deserialize = deserialize
    paths, offsets, lengths = [], [], []
    for instruction in file_instructions:
      path = instruction.filename
      if not os.path.isabs(path):
        path = os.path.join(data_dir, path)
      shard_offsets, shard_lengths = _scan_tfrecord(path)
      take = instruction.take
      stop = len(shard_offsets) if take is None or take < 0 else (
          instruction.skip + take)
      paths.append(path)
      offsets.append(shard_offsets[instruction.skip:stop])
      lengths.append(shard_lengths[instruction.skip:stop])
    self._paths = paths
    self._file_ids = np.concatenate(
        [np.full(len(o), i, np.int32) for i, o in enumerate(offsets)] or
        [np.zeros(0, np.int32)])
    self._offsets = np.concatenate(offsets or [np.zeros(0, np.int64)])
    self._lengths = np.concatenate(lengths or [np.zeros(0, np.int64)])

  def __len__(self) -> int:
    return len(self._offsets)

  def __getitem__(self, index):
    if index < 0:
      index += len(self)
    if not 0 <= index < len(self):
      raise IndexError(index)
    file_id = int(self._file_ids[index])
    if file_id not in self._handles:
      self._handles[file_id] = open(self._paths[file_id], 'rb')  # pylint: disable=consider-using-with
    handle = self._handles[file_id]
    handle.seek(int(self._offsets[index]))
    return self._deserialize(handle.read(int(self._lengths[index])))

  def close(self):
    for handle in self._handles.values():
      handle.close()
    self._handles.clear()

  def __del__(self):
    if hasattr(self, '_handles'):
      self.close()


def _scan_tfrecord(path: str) -> tuple[np.ndarray, np.ndarray]:
  """Returns the data offsets and lengths of every record in one file."""
  offsets, lengths = [], []
  size = os.path.getsize(path)
  with open(path, 'rb') as f:
    position = 0
    while position < size:
      header = f.read(12)
      if len(header) < 12:
        raise ValueError(f'{path}: truncated TFRecord header at byte '
                         f'{position}.')
      (length,) = struct.unpack('<Q', header[:8])
      offsets.append(position + 12)
      lengths.append(length)
      position += 12 + length + 4
      f.seek(position)
    if position != size:
      raise ValueError(f'{path}: the last TFRecord runs past the end of file.')
  return np.asarray(offsets, np.int64), np.asarray(lengths, np.int64)


def open_split_source(spec: DatasetSpec, split: str, *,
                      data_dir: Optional[str] = None,
                      decoders: Optional[dict] = None) -> Sequence[Any]:
  """A random-access sequence of decoded TFDS examples (dicts of NumPy).

  Tries ``builder.as_data_source`` first, so ``tfds.testing.mock_data`` works;
  only when that fails is the builder asked whether it is prepared. The error
  for a split that is not prepared does not chain TFDS's own exception, whose
  text ("already prepared ... in the TFRECORD format") is wrong in that case.

  Args:
    spec: the catalogue entry.
    split: a TFDS split name.
    data_dir: TFDS data directory (None: TFDS's default).
    decoders: TFDS decoders per feature (e.g. ``tfds.decode.SkipDecoding()`` to
      get an image's stored bytes); ArrayRecord sources only.

  Raises:
    DatasetNotFoundError: the dataset is not prepared in ``data_dir``.
  """
  builder = _builder(spec, data_dir)
  try:
    return builder.as_data_source(split=split, decoders=decoders)
  except NotImplementedError:  # Prepared as tfrecord, or not at all.
    if not builder.is_prepared():
      raise DatasetNotFoundError(
          _not_prepared_message(spec, builder, data_dir)) from None
    if decoders:
      raise ValueError(
          f'Dataset {spec.name!r} is prepared as TFRecord files, which the '
          'streamed loader cannot read; prepare it again with '
          f'`tfds build {spec.tfds_name} --file_format=array_record`.') from None
    return TFRecordSource(builder.info.splits[split].file_instructions,
                          builder.info.features.deserialize_example_np,
                          data_dir=builder.data_dir)
  except Exception as e:  # pylint: disable=broad-except
    if not builder.is_prepared():
      raise DatasetNotFoundError(
          _not_prepared_message(spec, builder, data_dir)) from None
    raise e


def example_labels(spec: DatasetSpec, example: dict) -> tuple[Any, Any]:
  """(label, difficult) of one example; difficult is None for single-label."""
  if not spec.multilabel:
    return int(example[spec.label_key]), None
  # VOC: 'labels' lists every object's class, 'labels_no_difficult' those of
  # objects not marked difficult.
  present = np.zeros(spec.num_classes, bool)
  present[np.asarray(example[spec.label_key], np.int64)] = True
  easy = present.copy()
  if 'labels_no_difficult' in example:
    easy = np.zeros(spec.num_classes, bool)
    easy[np.asarray(example['labels_no_difficult'], np.int64)] = True
    present |= easy
  return present, present & ~easy


def _dataset_from_examples(spec: DatasetSpec, split: str, examples,
                           count: int, image_size: int) -> ArrayDataset:
  images = np.empty((count, image_size, image_size, 3), np.uint8)
  unlabelled = split in spec.unlabelled_splits
  if spec.multilabel:
    labels = np.zeros((count, spec.num_classes), np.float32)
    difficult = np.zeros((count, spec.num_classes), bool)
  else:
    labels, difficult = np.full(count, -1, np.int32), None
  for i, example in enumerate(examples):
    images[i] = resize_image(np.asarray(example[spec.image_key]), image_size)
    if unlabelled:
      continue
    label, hard = example_labels(spec, example)
    labels[i] = label
    if difficult is not None:
      difficult[i] = hard
  return ArrayDataset(images=images, labels=labels,
                      num_classes=spec.num_classes, multilabel=spec.multilabel,
                      name=f'{spec.name}/{split}', difficult=difficult)


def load_tfds_split(spec: DatasetSpec, split: str, *,
                    data_dir: Optional[str] = None, image_size: int,
                    max_examples: Optional[int] = None) -> ArrayDataset:
  """Reads a whole TFDS split into memory at a fixed square storage size.

  Each image's short side is resized to ``image_size`` and the centre square
  kept. VOC2007 gets multi-hot targets over its 20 classes from the objects'
  labels, plus the ``difficult`` mask; splits in ``spec.unlabelled_splits``
  (STL-10 'unlabelled') get label -1. Memory: N · image_size² · 3 bytes.

  Args:
    spec: the catalogue entry.
    split: a TFDS split name; slices such as 'train[:10%]' work.
    data_dir: TFDS data directory (None: TFDS's default).
    image_size: side of the stored images.
    max_examples: read only the first examples (smoke runs).

  Returns:
    An :class:`ArrayDataset`.

  Raises:
    DatasetNotFoundError: the dataset is not prepared in ``data_dir``.
  """
  source = open_split_source(spec, split, data_dir=data_dir)
  count = len(source) if max_examples is None else min(len(source),
                                                         max_examples)
  examples = (source[i] for i in range(count))
  return _dataset_from_examples(spec, split, examples, count, image_size)


class LazyTfdsDataset:
  """A TFDS split decoded batch by batch: ``ArrayDataset``'s batch interface
  without holding the split in memory (for ImageNet-sized pretext sets)."""

  def __init__(self, spec: DatasetSpec, split: str, source: Sequence[Any],
               image_size: int):
    self.spec, self.split, self._source = spec, split, source
    self.image_size = image_size
    self.num_classes, self.multilabel = spec.num_classes, spec.multilabel
    self.name = f'{spec.name}/{split}'

  def __len__(self) -> int:
    return len(self._source)

  def batch(self, indices) -> dict:
    """Decodes and resizes the examples at ``indices`` (any integer shape)."""
    indices = np.asarray(indices)
    flat = indices.reshape(-1)
    decoded = _dataset_from_examples(
        self.spec, self.split, (self._source[int(i)] for i in flat), len(flat),
        self.image_size)
    shaped = lambda a: a.reshape(indices.shape + a.shape[1:])
    return {'image': shaped(decoded.images), 'label': shaped(decoded.labels)}


def open_tfds_split(spec: DatasetSpec, split: str, *,
                    data_dir: Optional[str] = None,
                    image_size: int) -> LazyTfdsDataset:
  """Opens a split for on-demand decoding (no up-front memory cost).

  Raises:
    DatasetNotFoundError: the dataset is not prepared in ``data_dir``.
  """
  return LazyTfdsDataset(spec, split, open_split_source(spec, split,
                                                        data_dir=data_dir),
                         image_size)


def _split_off_validation(train: ArrayDataset, val_fraction: float, seed: int
                          ) -> tuple[ArrayDataset, ArrayDataset]:
  kept, held = stratified_split(split_strata(train), val_fraction, seed=seed)
  name = train.name.rsplit('/', 1)[0]
  new_train, val = train.subset(kept), train.subset(held)
  new_train.name, val.name = f'{name}/train', f'{name}/validation'
  return new_train, val


def load_splits(name: str, *, data_dir: Optional[str] = None, image_size: int,
                val_fraction: float = 0.2, seed: int = 0,
                max_examples: Optional[int] = None) -> dict[str, ArrayDataset]:
  """Loads the train, validation and test splits of a catalogue dataset.

  Where the dataset has no validation split, a stratified ``val_fraction`` of
  the training split becomes the validation split (multi-label sets are
  stratified on their lowest-index positive class). All splits are checked to
  exist before any is read, so a missing dataset fails at once.

  Args:
    name: a catalogue name or alias, ``folder:<path>`` or ``tfds:<name>`` (see
      ``catalogue.get_spec``).
    data_dir: TFDS data directory, or the folder holding FGVC-Aircraft. Unused
      for 'digits'.
    image_size: side of the stored square images.
    val_fraction: validation share carved out of train where needed (and of
      the non-test digits).
    seed: seed of the carved-out splits.
    max_examples: cap per TFDS/folder split read (smoke runs).

  Returns:
    ``{'train', 'validation', 'test'}`` → :class:`ArrayDataset`.

  Raises:
    DatasetNotFoundError: the dataset is not available locally.
  """
  spec = get_spec(name, data_dir)
  if spec.source == 'sklearn':
    return load_digits_splits(image_size=image_size, val_fraction=val_fraction,
                              seed=seed)
  if spec.source == 'imagefolder':
    return image_folder.load_splits(name, image_size=image_size,
                                    val_fraction=val_fraction, seed=seed,
                                    split_off=_split_off_validation,
                                    max_examples=max_examples)
  if spec.source == 'folder':
    root = folder.find_fgvc_root(data_dir or '.')
    read = lambda split: folder.load_fgvc_aircraft(
        root, split, image_size=image_size, max_examples=max_examples)
  else:
    needed = [s for s in (spec.train_split, spec.val_split, spec.test_split)
              if s is not None]
    for split in needed:  # Fail early, before the (slow) reads.
      open_split_source(spec, split, data_dir=data_dir)
    read = lambda split: load_tfds_split(spec, split, data_dir=data_dir,
                                         image_size=image_size,
                                         max_examples=max_examples)
  train = read(spec.train_split)
  if spec.val_split is None:
    train, validation = _split_off_validation(train, val_fraction, seed)
  else:
    validation = read(spec.val_split)
  return {'train': train, 'validation': validation,
          'test': read(spec.test_split)}


def load_pretext_split(name: str, *, data_dir: Optional[str] = None,
                       image_size: int, max_examples: Optional[int] = None
                       ) -> ArrayDataset:
  """Loads the split used for self-supervised pretraining.

  STL-10 → 'unlabelled' (labels -1), ImageNet → 'train' (materialised: see
  the module docstring, or use :func:`open_tfds_split`), digits → its train
  split, FGVC-Aircraft → 'train', any other set → its training split.

  Raises:
    DatasetNotFoundError: the dataset is not available locally.
  """
  spec = get_spec(name, data_dir)
  if spec.source == 'sklearn':
    return load_digits_splits(image_size=image_size)['train']
  if spec.source == 'imagefolder':
    return image_folder.load_pretext(name, image_size=image_size,
                                     max_examples=max_examples)
  if spec.source == 'folder':
    return folder.load_fgvc_aircraft(data_dir or '.', spec.pretext_split,
                                     image_size=image_size,
                                     max_examples=max_examples)
  return load_tfds_split(spec, spec.pretext_split, data_dir=data_dir,
                         image_size=image_size, max_examples=max_examples)
