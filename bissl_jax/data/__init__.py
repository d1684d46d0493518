"""Datasets, splits and batch stacks (docs/sources.md, "Data stacks"; BiSSL paper §4.1).

- ``arrays``: :class:`ArrayDataset` (uint8 images at one square size) and the
  host-side resize / stratified split helpers.
- ``catalogue``: the known datasets (:func:`get_spec`).
- ``digits``: the offline default, scikit-learn's bundled digits.
- ``tfds_loader``: TFDS datasets read without TensorFlow (:func:`load_splits`,
  :func:`load_pretext_split`).
- ``folder``: FGVC-Aircraft from a local folder.
- ``availability``: :func:`check_prepared`, every missing dataset of a run in one
  message, checked on the files before TFDS is asked.
- ``stacks``: :class:`BatchStack`, the resumable per-level batch iterator, and
  :func:`process_shard`, the rows of a global batch each process reads.
- ``image_records``: :class:`ImageRecords`, datasets decoded example by example
  (TFDS ArrayRecord splits, image folders), for the streamed loader.
- ``grain_stream``: the stacks' batches decoded by Grain worker processes, sharded
  by process, resumable mid-epoch from Grain's iterator state.
- ``prefetch``: batches copied to the devices ahead of the step that uses them,
  resumable at the batches consumed (not those copied ahead).

TensorFlow Datasets is imported only when a TFDS dataset is read.
"""
from bissl_jax.data.availability import check_prepared
from bissl_jax.data.arrays import (ArrayDataset, resize_image, resize_images,
                                   stratified_split)
from bissl_jax.data.catalogue import (CATALOGUE, DatasetNotFoundError,
                                      DatasetSpec, get_spec)
from bissl_jax.data.digits import load_digits_splits
from bissl_jax.data.folder import load_fgvc_aircraft
from bissl_jax.data.image_records import (ImageRecords, LoaderOptions,
                                          open_records)
from bissl_jax.data.stacks import BatchStack, StackState, process_shard
from bissl_jax.data.tfds_loader import (LazyTfdsDataset, load_pretext_split,
                                        load_splits, load_tfds_split,
                                        open_tfds_split)

__all__ = [
    'ArrayDataset', 'BatchStack', 'CATALOGUE', 'DatasetNotFoundError',
    'DatasetSpec', 'ImageRecords', 'LazyTfdsDataset', 'LoaderOptions', 'check_prepared', 'StackState', 'get_spec',
    'load_digits_splits', 'load_fgvc_aircraft', 'load_pretext_split',
    'load_splits', 'load_tfds_split', 'open_records', 'open_tfds_split', 'process_shard',
    'resize_image',
    'resize_images', 'stratified_split',
]
