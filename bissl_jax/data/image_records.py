"""Image datasets read one example at a time, for the streamed loader.

An :class:`ImageRecords` is a random-access sequence of decoded, resized
examples ``{'image': uint8 (S, S, 3), 'label': int32 or float32 (C,)}``: the
source :mod:`bissl_jax.data.grain_stream` decodes in Grain's worker processes.
Only the file locations travel to a worker (it pickles the object and opens the
files on first use), never an open reader.

- :class:`TfdsRecords`: a prepared TFDS split, read with TFDS's ArrayRecord data
  source (``builder.as_data_source``: no TensorFlow). The image feature is read
  as its stored bytes (``tfds.decode.SkipDecoding``) and decoded here, so a JPEG
  can be decoded at a reduced scale.
- :class:`FolderRecords`: image files listed with their labels (FGVC-Aircraft).

Both also have the in-memory datasets' ``batch(indices)``, decoding in the
calling process, so every stage accepts them as they are; the stages stream
them through Grain instead (``bissl_jax.data.grain_stream``).
"""
from typing import Optional, Sequence

import numpy as np

from bissl_jax.data import folder
from bissl_jax.data.arrays import decode_image
from bissl_jax.data.catalogue import DatasetSpec
from bissl_jax.data.tfds_loader import example_labels, open_split_source


class LoaderOptions:
  """How the streamed loader decodes a dataset.

  Attributes:
    workers: Grain worker processes (0: decode in the training process).
    threads: decoding threads per process (each works on one batch).
    buffer: decoded batches each process keeps ready.
  """

  def __init__(self, workers: int = 0, threads: int = 1, buffer: int = 2):
    if workers < 0 or threads < 1 or buffer < 1:
      raise ValueError(f'Loader options workers={workers}, threads={threads}, '
                       f'buffer={buffer}: need workers >= 0, threads >= 1 and '
                       f'buffer >= 1 (config.data.loader_workers).')
    self.workers, self.threads, self.buffer = int(workers), int(threads), int(buffer)

  def __repr__(self):
    return (f'LoaderOptions(workers={self.workers}, threads={self.threads}, '
            f'buffer={self.buffer})')


class ImageRecords(Sequence):
  """Decoded examples by index; see the module docstring.

  Subclasses set ``name``, ``num_classes``, ``multilabel``, ``image_size`` and
  implement ``__len__`` and ``__getitem__``.
  """
  name: str
  num_classes: int
  multilabel: bool = False
  image_size: int
  options: LoaderOptions = LoaderOptions()

  def label_shape(self) -> tuple:
    return (self.num_classes,) if self.multilabel else ()

  def batch(self, indices) -> dict:
    """Decodes the examples at ``indices`` (any integer shape), in this process."""
    indices = np.asarray(indices)
    examples = [self[int(i)] for i in indices.reshape(-1)]
    stack = lambda key, shape, dtype: np.asarray(
        [e[key] for e in examples], dtype).reshape(indices.shape + shape)
    size = self.image_size
    return {'image': stack('image', (size, size, 3), np.uint8),
            'label': stack('label', self.label_shape(),
                           np.float32 if self.multilabel else np.int32)}


class TfdsRecords(ImageRecords):
  """One prepared TFDS split (ArrayRecord), decoded example by example.

  Args:
    spec: the catalogue entry.
    split: a TFDS split name (slices such as 'train[:10%]' work).
    data_dir: the TFDS data directory (None: TFDS's default).
    image_size: side of the square output images.
    draft: decode JPEGs at a reduced scale (``arrays.decode_image``).
    options: :class:`LoaderOptions` of the streamed loader.

  Raises:
    DatasetNotFoundError: the split is not prepared in ``data_dir``.
  """

  def __init__(self, spec: DatasetSpec, split: str, *, data_dir: Optional[str],
               image_size: int, draft: bool = True,
               options: Optional[LoaderOptions] = None):
    self.spec, self.split, self.data_dir = spec, split, data_dir
    self.image_size, self.draft = int(image_size), draft
    self.num_classes, self.multilabel = spec.num_classes, spec.multilabel
    self.name = f'{spec.name}/{split}'
    self.options = options or LoaderOptions()
    self._unlabelled = split in spec.unlabelled_splits
    self._source = None
    self._length = len(self._open())  # here, so a missing split fails at once

  def _open(self):
    if self._source is None:
      import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
      self._source = open_split_source(
          self.spec, self.split, data_dir=self.data_dir,
          decoders={self.spec.image_key: tfds.decode.SkipDecoding()})
    return self._source

  def __getstate__(self):
    state = dict(self.__dict__)
    state['_source'] = None  # each worker opens its own reader
    return state

  def __len__(self) -> int:
    return self._length

  def __getitem__(self, index: int) -> dict:
    example = self._open()[int(index)]
    image = decode_image(example[self.spec.image_key], self.image_size,
                         draft=self.draft)
    if self._unlabelled:
      label = np.int32(-1)
    else:
      label, _ = example_labels(self.spec, example)
      label = np.asarray(label, np.float32 if self.multilabel else np.int32)
    return {'image': image, 'label': label}


class FolderRecords(ImageRecords):
  """Image files with their labels, decoded one at a time.

  Args:
    paths: one image file per example.
    labels: int32 (N,) class indices.
    num_classes: number of classes.
    image_size: side of the square output images.
    name: a short name for logs.
    crop_bottom: rows cut off the bottom of each full-size image first.
    draft: decode JPEGs at a reduced scale (``arrays.decode_image``).
    options: :class:`LoaderOptions` of the streamed loader.
  """

  def __init__(self, paths: Sequence[str], labels, num_classes: int, *,
               image_size: int, name: str, crop_bottom: int = 0,
               draft: bool = True, options: Optional[LoaderOptions] = None):
    self.paths, self.labels = list(paths), np.asarray(labels, np.int32)
    if len(self.paths) != len(self.labels):
      raise ValueError(f'{name}: {len(self.paths)} paths but '
                       f'{len(self.labels)} labels.')
    self.num_classes, self.image_size, self.name = num_classes, int(image_size), name
    self.crop_bottom, self.draft = crop_bottom, draft
    self.options = options or LoaderOptions()

  def __len__(self) -> int:
    return len(self.paths)

  def __getitem__(self, index: int) -> dict:
    index = int(index)
    image = decode_image(self.paths[index], self.image_size,
                         crop_bottom=self.crop_bottom, draft=self.draft)
    return {'image': image, 'label': self.labels[index]}


def open_records(spec: DatasetSpec, split: str, *, data_dir: Optional[str],
                 image_size: int, draft: bool = True,
                 options: Optional[LoaderOptions] = None) -> ImageRecords:
  """The :class:`ImageRecords` of a catalogue split (TFDS or FGVC-Aircraft).

  Raises:
    DatasetNotFoundError: the split is not available locally.
    ValueError: an in-memory-only source (digits).
  """
  if spec.source == 'folder':
    paths, labels, num_classes = folder.fgvc_entries(data_dir or '.', split)
    return FolderRecords(paths, labels, num_classes, image_size=image_size,
                         name=f'{spec.name}/{split}',
                         crop_bottom=folder.BANNER_HEIGHT, draft=draft,
                         options=options)
  if spec.source != 'tfds':
    raise ValueError(f'Dataset {spec.name!r} (source {spec.source!r}) is held '
                     'in memory; use bissl_jax.data.load_splits().')
  return TfdsRecords(spec, split, data_dir=data_dir, image_size=image_size,
                     draft=draft, options=options)
