"""The datasets bissl_jax knows, with their TFDS names and split conventions.

Split choices follow the BiSSL paper, appendix B.1:
- FGVC-Aircraft, Oxford Flowers 102, DTD and VOC2007 have their own validation
  split; every other downstream set gets a stratified 20% of its training split
  (``val_split=None``).
- DTD and SUN397 use their first official train/test partition (TFDS ``dtd`` is
  partition 1; SUN397 is ``sun397/standard-part1-120k``).
- Caltech-101 in TFDS already follows the "30 training images per class" rule.
- Food-101 and ImageNet have no labelled test split in TFDS; their
  ``validation`` split (the official test set) is used as the test set.
"""
import dataclasses
from typing import Optional


class DatasetNotFoundError(ValueError):
  """A dataset is not available locally; the message says how to prepare it."""


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
  """How to read one dataset.

  Attributes:
    name: our short name (the key in ``CATALOGUE``).
    tfds_name: TFDS builder name, with config where needed ('voc/2007');
      None for non-TFDS sources.
    train_split: split used for training.
    val_split: validation split, or None to carve a stratified 20% out of
      ``train_split``.
    test_split: split the reported numbers come from.
    num_classes: number of classes.
    multilabel: multi-hot targets (VOC2007) instead of one class per image.
    image_key: feature holding the image.
    label_key: feature holding the label(s).
    manual_download: the source files must be fetched by hand (imagenet2012).
    source: 'tfds', 'folder' (FGVC-Aircraft), 'sklearn' (digits) or 'imagefolder'
      (your own images, ``folder:<path>``: bissl_jax/data/image_folder.py).
    pretext_split: split used for self-supervised pretraining (default: the
      training split).
    unlabelled_splits: splits without labels (their labels are stored as -1).
  """
  name: str
  tfds_name: Optional[str]
  train_split: str
  val_split: Optional[str]
  test_split: str
  num_classes: int
  multilabel: bool = False
  image_key: str = 'image'
  label_key: str = 'label'
  manual_download: bool = False
  source: str = 'tfds'
  pretext_split: Optional[str] = None
  unlabelled_splits: tuple[str, ...] = ()

  def __post_init__(self):
    if self.source not in ('tfds', 'folder', 'sklearn', 'imagefolder'):
      raise ValueError(f'DatasetSpec {self.name!r}: unknown source '
                       f'{self.source!r}; use tfds, folder or sklearn.')
    if self.pretext_split is None:
      object.__setattr__(self, 'pretext_split', self.train_split)


def _tfds(name, tfds_name, num_classes, *, test='test', val=None, **kwargs):
  return DatasetSpec(name=name, tfds_name=tfds_name, train_split='train',
                     val_split=val, test_split=test, num_classes=num_classes,
                     **kwargs)


CATALOGUE: dict[str, DatasetSpec] = {spec.name: spec for spec in [
    # Pretext sets.
    _tfds('imagenet2012', 'imagenet2012', 1000, test='validation',
          manual_download=True),
    _tfds('stl10', 'stl10', 10, pretext_split='unlabelled',
          unlabelled_splits=('unlabelled',)),
    # Downstream sets (paper Table 1 order).
    _tfds('food101', 'food101', 101, test='validation'),
    _tfds('cifar10', 'cifar10', 10),
    _tfds('cifar100', 'cifar100', 100),
    _tfds('caltech_birds2011', 'caltech_birds2011', 200),
    _tfds('sun397', 'sun397/standard-part1-120k', 397),
    _tfds('cars196', 'cars196', 196),
    DatasetSpec(name='fgvc_aircraft', tfds_name=None, train_split='train',
                val_split='val', test_split='test', num_classes=100,
                source='folder'),
    _tfds('voc2007', 'voc/2007', 20, val='validation', multilabel=True,
          label_key='labels'),
    _tfds('dtd', 'dtd', 47, val='validation'),
    _tfds('oxford_iiit_pet', 'oxford_iiit_pet', 37),
    _tfds('caltech101', 'caltech101', 102),
    _tfds('oxford_flowers102', 'oxford_flowers102', 102, val='validation'),
    # Offline default: scikit-learn's bundled 8x8 digits, upscaled.
    DatasetSpec(name='digits', tfds_name=None, train_split='train',
                val_split='validation', test_split='test', num_classes=10,
                source='sklearn'),
]}

# Other spellings accepted by get_spec: TFDS names and the paper's short names.
ALIASES: dict[str, str] = {
    'imagenet': 'imagenet2012', 'food': 'food101', 'cub200': 'caltech_birds2011',
    'birds': 'caltech_birds2011', 'sun397/standard-part1-120k': 'sun397',
    'cars': 'cars196', 'aircraft': 'fgvc_aircraft', 'aircrafts': 'fgvc_aircraft',
    'voc07': 'voc2007', 'voc/2007': 'voc2007', 'pets': 'oxford_iiit_pet',
    'flowers': 'oxford_flowers102', 'flowers102': 'oxford_flowers102',
}


def get_spec(name: str, data_dir: Optional[str] = None) -> DatasetSpec:
  """Looks a dataset up by short name, TFDS name or paper alias.

  Args:
    name: e.g. 'oxford_iiit_pet', 'pets', 'voc/2007' or 'digits'
      (case-insensitive), ``folder:<path>`` for a folder of your own images, or
      ``tfds:<name>`` for any TFDS dataset prepared in ``data_dir``.
    data_dir: where ``tfds:<name>`` is prepared (None: TFDS's default folder).

  Returns:
    The :class:`DatasetSpec`.

  Raises:
    ValueError: for an unknown name; the message lists the valid choices.
    DatasetNotFoundError: a ``folder:`` or ``tfds:`` dataset that cannot be read.
  """
  from bissl_jax.data import image_folder  # pylint: disable=g-import-not-at-top  (imports us)
  if image_folder.is_folder_name(name):
    return image_folder.spec_of(name)
  from bissl_jax.data import tfds_by_name  # pylint: disable=g-import-not-at-top  (imports us)
  if tfds_by_name.is_tfds_name(name):
    return tfds_by_name.spec_of(name, data_dir)
  key = name.strip().lower()
  key = ALIASES.get(key, key)
  if key not in CATALOGUE:
    raise ValueError(
        f'Unknown dataset {name!r}. Valid names: {", ".join(sorted(CATALOGUE))}'
        f' (aliases: {", ".join(sorted(ALIASES))}).')
  return CATALOGUE[key]
