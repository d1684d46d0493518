"""Streamed data on Grain (bissl_jax.data.grain_stream), on files written here.

The streamed batches must be the in-memory stacks' batches (same order, same
pixels), split into disjoint and complete per-process shards, fixed by the
seed, and resumable mid-epoch through the stage loop's checkpoint.
"""
import functools
import json
import os
import types

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import PIL.Image
import pytest
import tensorflow_datasets as tfds

from bissl_jax import data
from bissl_jax.data import folder, grain_stream, image_records, tfds_loader
from bissl_jax.data.stacks import BatchStack
from bissl_jax.pipeline import bissl_stage, checkpoint, datasets, stage_loop

NUM = 24  # examples of the tiny train split


class BisslTinyStream(tfds.core.GeneratorBasedBuilder):
  """24 constant images of varying size: image i has value 10·i and label i mod 4."""
  VERSION = tfds.core.Version('1.0.0')

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        'image': tfds.features.Image(shape=(None, None, 3)),  # PNG: exact pixels
        'label': tfds.features.ClassLabel(num_classes=4)}))

  def _split_generators(self, dl_manager):
    del dl_manager
    return {'train': self._generate_examples(NUM)}

  def _generate_examples(self, count):
    for i in range(count):
      image = np.full((6 + i % 3, 7, 3), 10 * i, np.uint8)
      yield i, {'image': PIL.Image.fromarray(image), 'label': i % 4}


SPEC = data.DatasetSpec(name='tiny_stream', tfds_name='bissl_tiny_stream',
                        train_split='train', val_split=None, test_split='train',
                        num_classes=4)


@pytest.fixture(scope='module')
def records(tmp_path_factory):
  data_dir = str(tmp_path_factory.mktemp('tfds'))
  BisslTinyStream(data_dir=data_dir, file_format='array_record').download_and_prepare()
  return image_records.open_records(SPEC, 'train', data_dir=data_dir, image_size=4)


@pytest.fixture(scope='module')
def in_memory(records):
  return tfds_loader.load_tfds_split(SPEC, 'train', data_dir=records.data_dir, image_size=4)


def _ids(batch):
  """The example index of every image (its constant value is 10·index)."""
  return batch['image'][..., 0, 0, 0] // 10


def _stream(records, takes, *, seed=5, batch_size=4, **kwargs):
  kwargs.setdefault('process_index', 0)
  kwargs.setdefault('process_count', 1)
  return grain_stream.level_stream(records, batch_size, seed=seed, takes=takes, **kwargs)


def test_streamed_batches_are_the_in_memory_stacks(records, in_memory):
  # 6 batches per epoch, takes of 4 then 1: a reshuffle (and a skipped tail) every
  # few takes, and the small-set rule for the take of 7 (> 6 batches per epoch).
  takes = [4, 1] * 5 + [7]
  stream, stack = _stream(records, takes), BatchStack(NUM, 4, seed=5)
  for count in takes:
    expected = in_memory.batch(stack.take(count))
    got = stream.draw(count)
    np.testing.assert_array_equal(got['image'], expected['image'])
    np.testing.assert_array_equal(got['label'], expected['label'])
  assert stack.state.epoch >= 4  # the takes did cross several reshuffles
  with pytest.raises(ValueError, match='planned batches'):
    stream.next()


def test_a_stage_of_no_steps_plans_no_batches(records):
  # 0 pretext epochs on a streamed set (a smoke run's random backbone): an empty plan.
  assert grain_stream.plan_takes(BatchStack(NUM, 4, seed=0), []).shape == (0, 2)
  stream = _stream(records, [], seed=0)
  with pytest.raises(ValueError, match='planned batches'):
    stream.next()


def test_shuffle_is_a_function_of_the_seed(records):
  first = _ids(_stream(records, [6, 6], seed=1).draw(12))
  again = _ids(_stream(records, [6, 6], seed=1).draw(12))
  other = _ids(_stream(records, [6, 6], seed=2).draw(12))
  np.testing.assert_array_equal(first, again)
  assert not np.array_equal(first, other)
  for epoch in (first[:6], first[6:]):  # each epoch is a permutation of all 24
    assert sorted(epoch.reshape(-1).tolist()) == sorted(_ids(records.batch(np.arange(NUM))))
  assert not np.array_equal(first[:6], first[6:])  # and a new one per epoch


def test_two_processes_see_disjoint_complete_shards(records):
  whole = _stream(records, [6, 6], batch_size=4).draw(12)
  parts = [_stream(records, [6, 6], batch_size=4, process_index=p, process_count=2).draw(12)
           for p in (0, 1)]
  assert parts[0]['image'].shape == (12, 2, 4, 4, 3)
  for key in ('image', 'label'):  # together, in process order, the global batch
    np.testing.assert_array_equal(np.concatenate([p[key] for p in parts], axis=1), whole[key])
  for epoch in (slice(0, 6), slice(6, 12)):
    a, b = (set(_ids(p)[epoch].reshape(-1).tolist()) for p in parts)
    assert not a & b and len(a | b) == NUM  # disjoint, and the whole epoch
  with pytest.raises(ValueError, match='multiple of 3'):
    _stream(records, [1], batch_size=4, process_index=0, process_count=3)


def test_grain_state_resumes_on_the_next_batch(records):
  stream = _stream(records, [4, 1] * 4)
  stream.draw(7)
  state = json.loads(json.dumps(stream.get_state()))  # JSON, as in the checkpoint
  rest = stream.draw(3)
  resumed = _stream(records, [4, 1] * 4)
  resumed.set_state(state)
  np.testing.assert_array_equal(resumed.draw(3)['image'], rest['image'])


@pytest.fixture(scope='module')
def folder_records(tmp_path_factory):
  """24 JPEG files in the FGVC-Aircraft layout (image i: value 10·i, label i mod 2)."""
  root = tmp_path_factory.mktemp('folder')
  images = root / folder.ARCHIVE_DIR / 'data' / 'images'
  images.mkdir(parents=True)
  (images.parent / 'variants.txt').write_text('A\nB\n')
  lines = []
  for i in range(NUM):
    PIL.Image.fromarray(np.full((40, 30, 3), 10 * i, np.uint8)).save(images / f'{i:07d}.jpg')
    lines.append(f'{i:07d} {"AB"[i % 2]}')
  (images.parent / 'images_variant_train.txt').write_text('\n'.join(lines))
  return image_records.open_records(data.get_spec('fgvc_aircraft'), 'train',
                                    data_dir=str(root), image_size=4)


def test_two_worker_processes_give_the_same_batches_and_resume(folder_records):
  # Folder records: the workers need not import TFDS, so they start faster.
  options = data.LoaderOptions(workers=2, buffer=1)
  reference = _stream(folder_records, [6, 6]).draw(12)['image']
  stream = _stream(folder_records, [6, 6], options=options)
  try:
    head = stream.draw(5)['image']
    state = stream.get_state()
  finally:
    stream.close()
  resumed = _stream(folder_records, [6, 6], options=options)
  try:
    resumed.set_state(json.loads(json.dumps(state)))
    tail = resumed.draw(7)['image']
  finally:
    resumed.close()
  np.testing.assert_array_equal(np.concatenate([head, tail]), reference)


def _run_epoch_stage(records, directory, seen, stop_at=None, data=None):
  """A 10-step stage over ``records``; ``data(*args, **kwargs) -> (data, hook)`` wraps
  ``epoch_data``'s arguments (``hook(i)`` runs before step ``i``)."""
  args, kwargs = (records, 4), dict(seed=3, steps_per_epoch=4, total_steps=10)
  data, hook = (data or (lambda *a, **k: (stage_loop.epoch_data(*a, **k), None)))(
      *args, **kwargs)

  def step(state, i, batch):
    if hook is not None:
      hook(i)
    seen.append((i, np.asarray(_ids(batch)).tolist()))
    return {'n': state['n'] + 1}, {'loss': jnp.float32(0.0)}

  def callback(n, state, metrics):
    del state, metrics
    if n == stop_at:
      raise KeyboardInterrupt
  stage = stage_loop.Stage(
      name='stream', total_steps=10, steps_per_epoch=4, step=step,
      data=data, checkpoint_dir=directory, checkpoint_every=1, callback=callback)
  return stage_loop.run_stage(stage, {'n': jnp.int32(0)})


def test_stage_resumes_mid_epoch_on_exactly_the_uninterrupted_batches(records, tmp_path):
  uninterrupted = []
  _run_epoch_stage(records, str(tmp_path / 'a'), uninterrupted)
  first, second = [], []
  with pytest.raises(KeyboardInterrupt):
    _run_epoch_stage(records, str(tmp_path / 'b'), first, stop_at=6)  # mid epoch 2
  saved = os.path.join(tmp_path, 'b', '6', checkpoint.ITERATORS)
  assert os.path.isdir(saved)  # Grain's state is the checkpoint's own item
  result = _run_epoch_stage(records, str(tmp_path / 'b'), second)
  assert result.resumed_from == 6 and int(result.state['n']) == 10
  assert [i for i, _ in second] == list(range(6, 10))
  assert first + second == uninterrupted
  # The same batches as the in-memory EpochData.
  memory = stage_loop.EpochData(records, 4, seed=3, steps_per_epoch=4)
  assert [_ids(memory.batch(i)).tolist() for i in range(10)] == [b for _, b in uninterrupted]


def test_bissl_levels_stream_the_stacks_batches_and_resume(records, in_memory):
  # The ImageNet case: a streamed lower level, an in-memory upper level (here a
  # set of 2 batches < N_U = 3, so the upper level reshuffles whenever it runs out).
  cfg = ml_collections.ConfigDict(dict(lower_steps=2, upper_steps=3, alternations=6,
                                       pretext_batch_size=4, downstream_batch_size=2))
  downstream = in_memory.subset(np.arange(5))
  streamed = bissl_stage.AlternationData(records, downstream, cfg, seed=0)
  memory = bissl_stage.AlternationData(in_memory, downstream, cfg, seed=0)
  got = [streamed.batch(t) for t in range(3)]
  position = json.loads(json.dumps(streamed.position(3)))
  got += [streamed.batch(t) for t in range(3, 6)]
  want = [memory.batch(t) for t in range(6)]
  resumed = bissl_stage.AlternationData(records, downstream, cfg, seed=0)
  resumed.restore(position, 3)
  got += [resumed.batch(t) for t in range(3, 6)]
  assert set(position) == {'upper', checkpoint.ITERATORS}
  for g, w in zip(got, want + want[3:]):
    for field in g._fields:
      np.testing.assert_array_equal(getattr(g, field), getattr(w, field))
  assert got[0].pretext.shape == (2, 4, 4, 4, 3) and got[0].hvp.shape == (4, 4, 4, 3)


def test_folder_records_decode_like_the_folder_loader(tmp_path):
  images = tmp_path / folder.ARCHIVE_DIR / 'data' / 'images'
  images.mkdir(parents=True)
  (images.parent / 'variants.txt').write_text('A\nB\n')
  lines = []
  rng = np.random.default_rng(0)
  for i in range(6):
    pixels = rng.integers(0, 255, (80, 64, 3), dtype=np.uint8)
    PIL.Image.fromarray(pixels).save(images / f'{i:07d}.jpg', quality=90)
    lines.append(f'{i:07d} {"AB"[i % 2]}')
  (images.parent / 'images_variant_train.txt').write_text('\n'.join(lines))
  spec = data.get_spec('fgvc_aircraft')
  exact = image_records.open_records(spec, 'train', data_dir=str(tmp_path), image_size=8,
                                     draft=False)
  drafted = image_records.open_records(spec, 'train', data_dir=str(tmp_path), image_size=8)
  loaded = data.load_fgvc_aircraft(str(tmp_path), 'train', image_size=8)
  batch = _stream(exact, [3], batch_size=2).draw(3)
  order = BatchStack(6, 2, seed=5).take(3)
  np.testing.assert_array_equal(batch['image'], loaded.images[order])
  np.testing.assert_array_equal(batch['label'], loaded.labels[order])
  # A reduced-scale JPEG decode (80x64 -> 40x32 >= 8) stays close to the full one.
  diff = drafted.batch(np.arange(6))['image'].astype(int) - loaded.images.astype(int)
  assert np.mean(np.abs(diff)) < 20


def test_missing_datasets_are_all_named_before_any_read(tmp_path, capfd):
  config = ml_collections.ConfigDict(dict(data=dict(
      pretext_dataset='imagenet2012', downstream_dataset='dtd', data_dir=str(tmp_path),
      image_size=8, val_fraction=0.2, split_seed=0, max_train_examples=None,
      loader_workers=0)))
  with pytest.raises(data.DatasetNotFoundError) as err:
    datasets.load_data(config, need_pretext=True, need_downstream=True)
  message = str(err.value)
  assert message.startswith('2 datasets are not prepared')
  assert f'tfds build imagenet2012 --data_dir={tmp_path}' in message
  assert f'tfds build dtd --data_dir={tmp_path}' in message
  assert 'ILSVRC2012_img_train.tar' in message
  assert not os.listdir(tmp_path)  # nothing read, downloaded or written
  # Below the check, TFDS's own (false) "already prepared" text is not chained in.
  with pytest.raises(data.DatasetNotFoundError) as err:
    image_records.open_records(data.get_spec('dtd'), 'train', data_dir=str(tmp_path),
                               image_size=8)
  assert err.value.__cause__ is None and err.value.__suppress_context__
  assert 'already prepared' not in str(err.value) + capfd.readouterr().err


def _two_process_batches(make, steps, resume_at):
  """Batches of ``make(process_index, process_count)`` for steps 0..steps-1, the ones
  from ``resume_at`` on read by a fresh object restored from the position there."""
  def run(p, count):
    data = make(p, count)
    got = [data.batch(i) for i in range(resume_at)]
    position = json.loads(json.dumps(data.position(resume_at), default=int))
    resumed = make(p, count)
    resumed.restore(position, resume_at)
    return got + [resumed.batch(i) for i in range(resume_at, steps)]
  return run(0, 1), [run(p, 2) for p in (0, 1)]


def _concat(parts, axis):
  return {k: np.concatenate([p[k] for p in parts], axis) for k in parts[0]}


def test_each_process_reads_its_rows_of_every_stage_batch(records, in_memory):
  # Stage loop data, streamed and in memory: 4 steps per epoch, resumed mid-epoch 2.
  for dataset in (records, in_memory):
    whole, parts = _two_process_batches(
        lambda p, n, d=dataset: stage_loop.epoch_data(
            d, 4, seed=3, steps_per_epoch=4, total_steps=10, process_index=p,
            process_count=n), steps=10, resume_at=6)
    for step, (w, a, b) in enumerate(zip(whole, *parts)):
      assert a['image'].shape == (2, 4, 4, 3)
      joined = _concat([a, b], 0)
      for key in w:
        np.testing.assert_array_equal(joined[key], w[key], err_msg=f'step {step}')
      assert not set(_ids(a).tolist()) & set(_ids(b).tolist())
  # BiSSL's two level stacks (streamed lower, in-memory upper), resumed at alternation 2.
  cfg = ml_collections.ConfigDict(dict(lower_steps=2, upper_steps=3, alternations=5,
                                       pretext_batch_size=4, downstream_batch_size=2))
  downstream = in_memory.subset(np.arange(5))
  whole, parts = _two_process_batches(
      lambda p, n: bissl_stage.AlternationData(records, downstream, cfg, seed=0,
                                               process_index=p, process_count=n),
      steps=5, resume_at=2)
  for w, a, b in zip(whole, *parts):
    assert a.pretext.shape == (2, 2, 4, 4, 3) and a.downstream_labels.shape == (3, 1)
    for field in w._fields:  # the stacks split on axis 1, the HVP batch on axis 0
      axis = 0 if field == 'hvp' else 1
      np.testing.assert_array_equal(
          np.concatenate([getattr(a, field), getattr(b, field)], axis), getattr(w, field))
    assert not set(_ids({'image': a.pretext}).ravel()) & set(_ids({'image': b.pretext}).ravel())


def test_prefetched_stage_resumes_on_the_batches_consumed(records, tmp_path):
  from bissl_jax.runtime import mesh as parallel  # pylint: disable=g-import-not-at-top
  mesh = parallel.make_mesh()
  ahead = []

  def prefetched(*args, **kwargs):
    data = stage_loop.epoch_data(*args, **kwargs, device_prefetch=2,
                                 place=lambda b: parallel.shard_batch(b, mesh))
    step = lambda i: ahead.append(data.data.stream.consumed - i)
    return data, step

  uninterrupted = []
  _run_epoch_stage(records, str(tmp_path / 'a'), uninterrupted)  # no prefetch
  first, second = [], []
  with pytest.raises(KeyboardInterrupt):
    _run_epoch_stage(records, str(tmp_path / 'b'), first, stop_at=6, data=prefetched)
  # Batches 6 and 7 were copied ahead at the interrupt; the checkpoint holds the state
  # after the 6 consumed.
  saved = checkpoint.RunCheckpointer(str(tmp_path / 'b'))
  try:
    assert saved.restore_iterators(6)['data']['consumed'] == 6
  finally:
    saved.close()
  _run_epoch_stage(records, str(tmp_path / 'b'), second, data=prefetched)
  assert first + second == uninterrupted
  assert ahead[:3] == [3, 3, 3] and ahead[-1] == 1  # two batches ahead, none past the end


def test_prefetched_bissl_levels_resume_on_the_batches_consumed(records, in_memory):
  from bissl_jax.runtime import mesh as parallel  # pylint: disable=g-import-not-at-top
  from bissl_jax.data import prefetch  # pylint: disable=g-import-not-at-top
  mesh = parallel.make_mesh()
  cfg = ml_collections.ConfigDict(dict(lower_steps=2, upper_steps=3, alternations=5,
                                       pretext_batch_size=4, downstream_batch_size=2))
  downstream = in_memory.subset(np.arange(5))
  ctx = types.SimpleNamespace(shard=lambda tree, axis=0: parallel.shard_batch(tree, mesh, axis))
  place = functools.partial(bissl_stage.place_batches, ctx)  # what run_bissl prefetches with
  new = lambda: prefetch.PrefetchedData(
      bissl_stage.AlternationData(records, downstream, cfg, seed=0), place, size=2,
      total_steps=5)
  reference = bissl_stage.AlternationData(records, downstream, cfg, seed=0)
  want = [reference.batch(t) for t in range(5)]
  data = new()
  got = [data.batch(t) for t in range(2)]
  assert isinstance(got[0].pretext, jax.Array)  # placed on the devices
  assert got[0].pretext.sharding == parallel.batch_sharding(mesh, 1)
  assert got[0].hvp.sharding == parallel.batch_sharding(mesh, 0)
  position = json.loads(json.dumps(data.position(2)))
  with pytest.raises(ValueError, match='consumed up to step 2'):
    data.position(4)
  resumed = new()
  resumed.restore(position, 2)
  got += [resumed.batch(t) for t in range(2, 5)]
  for g, w in zip(got, want):
    for field in g._fields:
      np.testing.assert_array_equal(np.asarray(getattr(g, field)), getattr(w, field))
