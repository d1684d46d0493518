"""The datasets of a run: opened before any compute, so a missing one fails at once."""
import numpy as np

from bissl_jax import data as data_lib
from bissl_jax.data import detection_sets
from bissl_jax.data import text_sets
from bissl_jax.runtime.seeds import derive_seed


def load_data(config, need_pretext: bool, need_downstream: bool):
  """Opens the datasets a run needs; raises DatasetNotFoundError before any compute.

  Every dataset the run needs is checked first, and all missing ones are named in
  one message with their preparation commands (``bissl_jax.data.check_prepared``).

  When pretext and downstream data are the same set (the digits default), the
  pretext data is the downstream *training* split, never validation or test.
  ``data.max_train_examples`` subsamples the training split (fixed by
  ``data.split_seed``). ``data.labels_per_class`` then keeps that many labelled
  images per class in the downstream training split (:func:`labels_per_class_subset`,
  drawn with ``config.seed``); the pretext set keeps every training image.

  Returns:
    ``(splits, pretext_set)``: ``{'train', 'validation', 'test'}`` datasets (or None)
    and the pretext dataset (or None). Everything is held in memory except ImageNet,
    which is a streamed ``bissl_jax.data.ImageRecords`` (``data.loader_workers``
    Grain processes decode it; the stages see the same batches either way).
  """
  d = config.data
  if text_sets.is_text_dataset(d.downstream_dataset) or text_sets.is_text_dataset(
      d.pretext_dataset):
    return load_text_data(config, need_pretext, need_downstream)
  if detection_sets.is_detection_dataset(d.downstream_dataset):
    return load_detection_data(config, need_pretext, need_downstream)
  wanted = ([("pretext", d.pretext_dataset)] if need_pretext else []) + (
      [("downstream", d.downstream_dataset)] if need_downstream else [])
  data_lib.check_prepared(wanted, d.data_dir)  # every missing set named, before TFDS
  pretext_spec = data_lib.get_spec(d.pretext_dataset, d.data_dir)
  same = (data_lib.get_spec(d.downstream_dataset, d.data_dir).name == pretext_spec.name
          and pretext_spec.pretext_split == pretext_spec.train_split)
  splits = pretext_set = None
  if need_downstream or (need_pretext and same):
    splits = data_lib.load_splits(d.downstream_dataset, data_dir=d.data_dir,
                                  image_size=d.image_size, val_fraction=d.val_fraction,
                                  seed=d.split_seed)
    _subsample_train(splits, d)
  if need_pretext:
    pretext_set = splits["train"] if same else _pretext_images(d, pretext_spec)
  if splits is not None and d.get("labels_per_class"):
    keep = labels_per_class_subset(splits["train"].labels, int(d.labels_per_class),
                                   seed=int(config.seed))
    splits["train"] = splits["train"].subset(keep)
  return splits, pretext_set


def _pretext_images(d, pretext_spec):
  """The pretext set of another dataset than the downstream one (its training images)."""
  if pretext_spec.name == "imagenet2012":
    # Too large for host memory: streamed, decoded by Grain worker processes.
    return data_lib.open_records(
        pretext_spec, pretext_spec.pretext_split, data_dir=d.data_dir,
        image_size=d.image_size,
        options=data_lib.LoaderOptions(workers=d.get("loader_workers", 0)))
  return data_lib.load_pretext_split(d.pretext_dataset, data_dir=d.data_dir,
                                     image_size=d.image_size)


def load_detection_data(config, need_pretext: bool, need_downstream: bool):
  """:func:`load_data` for a detection set (``bissl_jax.data.detection_sets``).

  The pretext data is the detection set's training images (labels unused) when
  ``data.pretext_dataset`` names the same set, else that image set's pretext split.
  """
  d = config.data
  same = d.pretext_dataset == d.downstream_dataset
  if need_pretext and not same:
    data_lib.check_prepared([("pretext", d.pretext_dataset)], d.data_dir)
  splits = pretext_set = None
  if need_downstream or (need_pretext and same):
    splits = detection_sets.load_splits(d)
  if need_pretext:
    pretext_set = (splits["train"] if same else
                   _pretext_images(d, data_lib.get_spec(d.pretext_dataset, d.data_dir)))
  return splits, pretext_set


def _subsample_train(splits: dict, d) -> None:
  """``data.max_train_examples``: a fixed (``data.split_seed``) subset of train, in order."""
  if d.max_train_examples and d.max_train_examples < len(splits["train"]):
    keep = np.random.default_rng(d.split_seed).permutation(len(splits["train"]))
    splits["train"] = splits["train"].subset(np.sort(keep[:d.max_train_examples]))


def load_text_data(config, need_pretext: bool, need_downstream: bool):
  """The text counterpart of :func:`load_data`: ``TokenDataset`` splits and pretext chunks.

  Batches are ``{'tokens', 'label'}``; the downstream inputs are formatted with the
  special tokens of the run's GPT (:func:`bissl_jax.pipeline.context.build_text_model`).
  A missing GLUE task raises ``DatasetNotFoundError`` here, before any compute.
  """
  from bissl_jax.pipeline import context as context_lib  # pylint: disable=g-import-not-at-top
  d = config.data
  context_lib.check_model_and_task(config)
  splits = pretext_set = None
  if need_downstream:
    model = context_lib.build_text_model(config)
    splits = text_sets.load_downstream(d.downstream_dataset, d, model.special_ids)
    _subsample_train(splits, d)
  if need_pretext:
    pretext_set = text_sets.load_pretext(d.pretext_dataset, d)
  return splits, pretext_set


def labels_per_class_subset(labels, per_class: int, *, seed: int) -> np.ndarray:
  """Sorted indices of ``per_class`` examples of every class (all of a smaller class).

  The examples of each class are ranked by one permutation of ``seed``, so the subsets
  of one seed are nested (the 5 per class are among the 10 per class).
  """
  labels = np.asarray(labels)
  if labels.ndim != 1:
    raise ValueError("data.labels_per_class needs single-label data (class indices); "
                     "unset it for a multi-label set.")
  if per_class < 1:
    raise ValueError(f"data.labels_per_class={per_class}: must be >= 1 (None: all labels).")
  order = np.random.default_rng(derive_seed(seed, "labels_per_class")).permutation(len(labels))
  keep = [order[labels[order] == c][:per_class] for c in np.unique(labels)]
  return np.sort(np.concatenate(keep))
