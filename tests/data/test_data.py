"""Tests for dataset loading and splitting (bissl_jax.data)."""
import json
import os
import struct

import numpy as np
import PIL.Image
import pytest
import tensorflow_datasets as tfds

from bissl_jax import data
from bissl_jax.data import arrays, catalogue, folder, tfds_loader


# --- arrays -----------------------------------------------------------------

def test_resize_image_short_side_and_centre_crop():
  # A 4x8 image: columns 0..7 hold the values 0, 10, ..., 70. Resizing the
  # short side 4 -> 4 keeps the scale, and the centre crop keeps columns 2..5.
  image = np.tile((np.arange(8, dtype=np.uint8) * 10)[None, :, None], (4, 1, 3))
  out = arrays.resize_image(image, 4)
  assert out.shape == (4, 4, 3) and out.dtype == np.uint8
  np.testing.assert_array_equal(out[0, :, 0], [20, 30, 40, 50])
  # Grayscale (H, W) input comes back with 3 equal channels.
  gray = arrays.resize_image(np.full((5, 7), 9, np.uint8), 3)
  assert gray.shape == (3, 3, 3) and np.all(gray == 9)
  with pytest.raises(ValueError, match='uint8'):
    arrays.resize_image(np.zeros((4, 4), np.float32), 2)


def test_stratified_split_exact_counts_and_proportions():
  strata = np.repeat(np.arange(4), [50, 30, 15, 5])
  kept, held = arrays.stratified_split(strata, 0.2, seed=3)
  assert len(held) == 20 and len(kept) == 80
  assert np.intersect1d(kept, held).size == 0
  np.testing.assert_array_equal(np.sort(np.concatenate([kept, held])),
                                np.arange(100))
  np.testing.assert_array_equal(np.bincount(strata[held]), [10, 6, 3, 1])
  # A class with a single member does not break the split.
  kept, held = arrays.stratified_split(np.array([0, 0, 0, 0, 1]), 0.4, seed=0)
  assert len(held) == 2 and len(kept) == 3


def test_array_dataset_batch_subset_and_validation():
  images = np.arange(5 * 2 * 2 * 3, dtype=np.uint8).reshape(5, 2, 2, 3)
  ds = arrays.ArrayDataset(images, np.array([0, 1, 2, 0, 1]), num_classes=3)
  batch = ds.batch(np.array([[4, 0], [1, 1]]))
  assert batch['image'].shape == (2, 2, 2, 2, 3)
  np.testing.assert_array_equal(batch['label'], [[1, 0], [1, 1]])
  assert batch['label'].dtype == np.int32
  sub = ds.subset([3, 4])
  assert len(sub) == 2 and np.array_equal(sub.images, images[3:])
  with pytest.raises(ValueError, match='out of range'):
    arrays.ArrayDataset(images, np.array([0, 1, 2, 3, 1]), num_classes=3)
  with pytest.raises(ValueError, match='multi-hot'):
    arrays.ArrayDataset(images, np.zeros(5), num_classes=3, multilabel=True)


# --- digits -----------------------------------------------------------------

@pytest.fixture(scope='module')
def digits():
  return data.load_digits_splits(image_size=16, seed=0)


def test_digits_shapes_counts_and_disjointness(digits):
  assert {k: len(v) for k, v in digits.items()} == {
      'train': 1150, 'validation': 288, 'test': 359}
  for split in digits.values():
    assert split.images.dtype == np.uint8
    assert split.images.shape[1:] == (16, 16, 3)
    assert split.labels.dtype == np.int32 and split.num_classes == 10
    # Gray digits: the three channels are equal; ink reaches full intensity.
    assert np.array_equal(split.images[..., 0], split.images[..., 2])
    assert split.images.max() == 255
  # Disjoint and complete: every original image appears exactly once. The
  # images are matched by content against sklearn's copy.
  from sklearn.datasets import load_digits  # pylint: disable=import-outside-toplevel
  reference = arrays.resize_images(
      np.round(load_digits().images * 255 / 16).astype(np.uint8), 16)
  keys = {img.tobytes(): i for i, img in enumerate(reference)}
  seen = [keys[img.tobytes()] for s in digits.values() for img in s.images]
  assert len(set(seen)) == len(seen) == len(reference)


def test_digits_stratified(digits):
  overall = np.bincount(np.concatenate([s.labels for s in digits.values()]),
                        minlength=10) / 1797
  for split in digits.values():
    share = np.bincount(split.labels, minlength=10) / len(split)
    # Largest-remainder allocation: within one example of proportional.
    assert np.max(np.abs(share - overall)) <= 1.0 / len(split) + 1e-9


def test_digits_deterministic_in_seed(digits):
  again = data.load_digits_splits(image_size=16, seed=0)
  other = data.load_digits_splits(image_size=16, seed=1)
  np.testing.assert_array_equal(again['test'].images, digits['test'].images)
  np.testing.assert_array_equal(again['train'].labels, digits['train'].labels)
  assert not np.array_equal(other['test'].images, digits['test'].images)


# --- catalogue --------------------------------------------------------------

def test_catalogue_entries_and_aliases():
  assert data.get_spec('pets') is data.get_spec('oxford_iiit_pet')
  voc = data.get_spec('voc/2007')
  assert voc.multilabel and voc.val_split == 'validation'
  assert voc.num_classes == 20
  assert data.get_spec('stl10').pretext_split == 'unlabelled'
  assert data.get_spec('imagenet2012').manual_download
  assert data.get_spec('fgvc_aircraft').source == 'folder'
  assert data.get_spec('digits').source == 'sklearn'
  with pytest.raises(ValueError, match='Valid names: .*oxford_iiit_pet'):
    data.get_spec('mnist')


def test_catalogue_matches_tfds_builders():
  """Each TFDS entry names a real builder with that label feature and class
  count (TFDS builds the builder from code; nothing is read or fetched)."""
  for spec in catalogue.CATALOGUE.values():
    if spec.source != 'tfds':
      continue
    builder = tfds.builder(spec.tfds_name, data_dir='/nonexistent-bissl')
    feature = builder.info.features[spec.label_key]
    feature = getattr(feature, 'feature', feature)  # VOC: Sequence(ClassLabel)
    assert feature.num_classes == spec.num_classes, spec.name
    assert spec.image_key in builder.info.features, spec.name


# --- TFDS: mocked ------------------------------------------------------------

def test_mock_tfds_pets_splits_with_carved_validation():
  with tfds.testing.mock_data(num_examples=40):
    splits = data.load_splits('oxford_iiit_pet', data_dir='/unused',
                              image_size=16, seed=0)
  # Pets has no validation split: 20% of its 40 training images are carved out.
  assert {k: len(v) for k, v in splits.items()} == {
      'train': 32, 'validation': 8, 'test': 40}
  for ds in splits.values():
    assert ds.images.shape[1:] == (16, 16, 3) and ds.images.dtype == np.uint8
    assert ds.labels.dtype == np.int32 and ds.num_classes == 37
    assert ds.labels.min() >= 0 and ds.labels.max() < 37
  train_images = {img.tobytes() for img in splits['train'].images}
  assert not any(img.tobytes() in train_images
                 for img in splits['validation'].images)


def test_mock_tfds_cifar10_stratified_validation():
  with tfds.testing.mock_data(num_examples=100):
    full = tfds_loader.load_tfds_split(data.get_spec('cifar10'), 'train',
                                       image_size=8)
    splits = data.load_splits('cifar10', image_size=8, seed=1)
  counts = np.bincount(full.labels, minlength=10)
  val_counts = np.bincount(splits['validation'].labels, minlength=10)
  assert val_counts.sum() == 20
  # Stratified: each class gives 20% of its members, rounded either way.
  assert np.all(np.abs(val_counts - 0.2 * counts) < 1.0)
  np.testing.assert_array_equal(
      np.bincount(splits['train'].labels, minlength=10) + val_counts, counts)


def test_mock_tfds_voc_multihot_and_stl10_unlabelled():
  with tfds.testing.mock_data(num_examples=6, num_sub_examples=3):
    source = tfds_loader.open_split_source(data.get_spec('voc2007'), 'test')
    raw = [source[i] for i in range(6)]
    voc = tfds_loader.load_tfds_split(data.get_spec('voc2007'), 'test',
                                      image_size=8)
    stl = data.load_pretext_split('stl10', image_size=8, max_examples=4)
    lazy = data.open_tfds_split(data.get_spec('voc2007'), 'test', image_size=8)
    lazy_batch = lazy.batch(np.array([[5, 0]]))
  assert voc.multilabel and voc.labels.shape == (6, 20)
  for i, example in enumerate(raw):
    present = set(example['labels']) | set(example['labels_no_difficult'])
    assert set(np.flatnonzero(voc.labels[i])) == present
    assert set(np.flatnonzero(voc.difficult[i])) == (
        present - set(example['labels_no_difficult']))
  assert len(stl) == 4 and np.all(stl.labels == -1)
  assert lazy_batch['image'].shape == (1, 2, 8, 8, 3)
  np.testing.assert_array_equal(lazy_batch['label'][0], voc.labels[[5, 0]])
  np.testing.assert_array_equal(lazy_batch['image'][0], voc.images[[5, 0]])


# --- TFDS: real files written here ------------------------------------------

class BisslTinyPets(tfds.core.GeneratorBasedBuilder):
  """A 3-class image dataset written by this test (array_record, no TF)."""
  VERSION = tfds.core.Version('1.0.0')

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        'image': tfds.features.Image(shape=(None, None, 3)),
        'label': tfds.features.ClassLabel(num_classes=3)}))

  def _split_generators(self, dl_manager):
    del dl_manager
    return {'train': self._generate_examples(12),
            'test': self._generate_examples(5)}

  def _generate_examples(self, count):
    for i in range(count):
      # Image i is constant with value 10·i, of varying size, label i mod 3.
      image = np.full((6 + i % 3, 9, 3), 10 * i, np.uint8)
      yield i, {'image': PIL.Image.fromarray(image), 'label': i % 3}


TINY_SPEC = catalogue.DatasetSpec(
    name='tiny', tfds_name='bissl_tiny_pets', train_split='train',
    val_split=None, test_split='test', num_classes=3)


@pytest.fixture(scope='module')
def tiny_data_dir(tmp_path_factory):
  data_dir = str(tmp_path_factory.mktemp('tfds'))
  BisslTinyPets(data_dir=data_dir, file_format='array_record'
                ).download_and_prepare()
  return data_dir


def _expected_tiny(split):
  # Order of examples in the prepared files is TFDS's shuffled order, so
  # compare as (value, label) multisets: value 10·i always has label i mod 3.
  count = {'train': 12, 'test': 5}[split]
  return sorted((10 * i, i % 3) for i in range(count))


def test_prepared_array_record_split(tiny_data_dir):
  ds = tfds_loader.load_tfds_split(TINY_SPEC, 'train', data_dir=tiny_data_dir,
                                   image_size=4)
  assert ds.images.shape == (12, 4, 4, 3)
  got = sorted(zip(ds.images[:, 0, 0, 0].tolist(), ds.labels.tolist()))
  assert got == _expected_tiny('train')


def test_prepared_tfrecord_split_read_without_tf(tiny_data_dir, tmp_path):
  """Rewrites the array_record shards as TFRecord files (framing written
  plainly here) and reads them back through the TFRecord fallback."""
  from array_record.python import array_record_module  # pylint: disable=import-outside-toplevel
  variant = os.path.join(tiny_data_dir, 'bissl_tiny_pets', '1.0.0')
  out_variant = tmp_path / 'bissl_tiny_pets' / '1.0.0'
  out_variant.mkdir(parents=True)
  for name in os.listdir(variant):
    if '.array_record-' not in name:
      continue
    reader = array_record_module.ArrayRecordReader(os.path.join(variant, name))
    records = reader.read_all()
    reader.close()
    with open(out_variant / name.replace('.array_record-', '.tfrecord-'),
              'wb') as f:
      for record in records:  # uint64 length, uint32 crc, data, uint32 crc
        f.write(struct.pack('<Q', len(record)) + b'\0' * 4 + record + b'\0' * 4)
  for name in ('features.json', 'dataset_info.json'):
    with open(os.path.join(variant, name)) as f:
      content = json.load(f)
    if name == 'dataset_info.json':
      content['fileFormat'] = 'tfrecord'
    with open(out_variant / name, 'w') as f:
      json.dump(content, f)

  ds = tfds_loader.load_tfds_split(TINY_SPEC, 'test', data_dir=str(tmp_path),
                                   image_size=4)
  got = sorted(zip(ds.images[:, 0, 0, 0].tolist(), ds.labels.tolist()))
  assert got == _expected_tiny('test')
  # Split slicing goes through TFDS's file instructions.
  head = tfds_loader.load_tfds_split(TINY_SPEC, 'train[:5]',
                                     data_dir=str(tmp_path), image_size=4)
  full = tfds_loader.load_tfds_split(TINY_SPEC, 'train',
                                     data_dir=str(tmp_path), image_size=4)
  np.testing.assert_array_equal(head.images, full.images[:5])


def test_missing_dataset_error_names_builder_and_fix(tmp_path):
  with pytest.raises(data.DatasetNotFoundError) as err:
    data.load_splits('oxford_iiit_pet', data_dir=str(tmp_path), image_size=8)
  message = str(err.value)
  assert "'oxford_iiit_pet'" in message
  assert f'tfds build oxford_iiit_pet --data_dir={tmp_path}' in message
  assert 'config.data.data_dir' in message
  assert not os.listdir(tmp_path)  # Nothing was downloaded or written.
  with pytest.raises(data.DatasetNotFoundError) as err:
    data.load_pretext_split('imagenet2012', data_dir=str(tmp_path),
                            image_size=8)
  assert os.path.join(str(tmp_path), 'downloads', 'manual') in str(err.value)
  assert 'ILSVRC2012_img_train.tar' in str(err.value)
  assert isinstance(err.value, ValueError)


# --- FGVC-Aircraft folder ----------------------------------------------------

def _write_fgvc(root, banner_value=255):
  data_dir = root / folder.ARCHIVE_DIR / 'data'
  (data_dir / 'images').mkdir(parents=True)
  variants = ['707-320', 'Cessna 172', 'F-16A/B']
  (data_dir / 'variants.txt').write_text('\n'.join(variants) + '\n')
  split_lines = {'train': [], 'val': [], 'test': []}
  for i in range(12):
    image_id, label = f'{1000000 + i:07d}', i % 3
    split = 'train' if i < 6 else ('val' if i < 9 else 'test')
    # Body: 40 rows of value 40·label + 20; banner: 20 bottom rows of 255.
    pixels = np.full((60, 50, 3), 40 * label + 20, np.uint8)
    pixels[-folder.BANNER_HEIGHT:] = banner_value
    PIL.Image.fromarray(pixels).save(data_dir / 'images' / f'{image_id}.jpg',
                                     quality=95)
    split_lines[split].append(f'{image_id} {variants[label]}')
  for split, lines in split_lines.items():
    (data_dir / f'images_variant_{split}.txt').write_text('\n'.join(lines))
  return split_lines


def test_fgvc_aircraft_folder(tmp_path):
  split_lines = _write_fgvc(tmp_path)
  splits = data.load_splits('fgvc_aircraft', data_dir=str(tmp_path),
                            image_size=8)
  for split, key in (('train', 'train'), ('validation', 'val'),
                     ('test', 'test')):
    ds = splits[split]
    assert len(ds) == len(split_lines[key]) and ds.num_classes == 3
    expected = [i % 3 for i in range(12)
                if f'{1000000 + i:07d}' in ' '.join(split_lines[key])]
    np.testing.assert_array_equal(ds.labels, expected)
    # The banner is gone: every pixel is close to the body value (JPEG noise).
    body = 40 * ds.labels[:, None, None, None] + 20
    assert np.max(np.abs(ds.images.astype(int) - body)) <= 6
  assert splits['train'].labels.tolist().count(1) >= 1  # "Cessna 172" parsed


def test_fgvc_aircraft_missing_folder(tmp_path):
  with pytest.raises(data.DatasetNotFoundError, match='fgvc-aircraft-2013b'):
    data.load_splits('fgvc_aircraft', data_dir=str(tmp_path), image_size=8)
