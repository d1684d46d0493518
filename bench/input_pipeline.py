"""Decoded + resized images per second of the input pipelines, side by side.

The bench writes its own data: ``--images`` synthetic photos (``--photo`` pixels,
smooth colour fields with noise, saved as JPEG at quality 90, about the size and
file size of an ImageNet photo) once as a TFDS ArrayRecord dataset (the layout
``tfds build --file_format=array_record`` writes) and once as image files in the
FGVC-Aircraft folder layout. It then decodes them into batches of ``--batch``
square images at each ``--sizes`` side with

* **today's loaders**, in the training process: ``LazyTfdsDataset.batch`` (TFDS
  decodes the JPEG, then ``resize_image``) and the folder loader
  (``folder.read_fgvc_image``);
* **the Grain stream** (``bissl_jax.data.grain_stream``) over the same files, with
  0 (decoding in the calling process), 1, 2, ... worker processes, with and
  without the reduced-scale JPEG decode (``draft``).

Every contender reads the same batches in the same order (a fresh stack per
run); worker start-up is timed apart (first batch) and not in the images/s.
Rounds are interleaved (each round times every contender once); medians.

Run: ``python -m bench.input_pipeline`` (about 5 min on a shared 2-core CPU;
``--no-record`` to only print; ``--tiny`` for the smoke test).
"""
import argparse
import os
import sys
import tempfile
import time
from typing import List, Optional, Sequence

import numpy as np
import PIL.Image

from bench import common

SPEC_NAME = 'bench_photos'


def write_photos(directory: str, count: int, size: tuple, seed: int = 0) -> List[str]:
  """``count`` JPEG photos of ``size`` (w, h) under ``directory``; their paths."""
  os.makedirs(directory, exist_ok=True)
  rng = np.random.default_rng(seed)
  paths = []
  for i in range(count):
    coarse = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
    field = np.asarray(PIL.Image.fromarray(coarse).resize(size, PIL.Image.BICUBIC), np.int16)
    noise = rng.integers(-24, 25, field.shape, dtype=np.int16)
    pixels = np.clip(field + noise, 0, 255).astype(np.uint8)
    path = os.path.join(directory, f'{i:07d}.jpg')
    PIL.Image.fromarray(pixels).save(path, quality=90)
    paths.append(path)
  return paths


def write_tfds(data_dir: str, paths: Sequence[str]):
  """The photos as a prepared TFDS ArrayRecord dataset; returns its DatasetSpec."""
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  from bissl_jax.data import catalogue  # pylint: disable=import-outside-toplevel

  class BenchPhotos(tfds.core.GeneratorBasedBuilder):
    """The bench's JPEG photos (stored as their JPEG bytes), 10 classes."""
    VERSION = tfds.core.Version('1.0.0')

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
          'image': tfds.features.Image(shape=(None, None, 3), encoding_format='jpeg'),
          'label': tfds.features.ClassLabel(num_classes=10)}))

    def _split_generators(self, dl_manager):
      del dl_manager
      return {'train': self._generate_examples()}

    def _generate_examples(self):
      for i, path in enumerate(paths):
        yield i, {'image': path, 'label': i % 10}

  # TFDS looks for a builder's code through its module; one in a package (bench.*)
  # needs importlib_resources, which TFDS does not install. A one-part name skips that.
  BenchPhotos.__module__ = 'bench_input_pipeline'
  BenchPhotos(data_dir=data_dir, file_format='array_record').download_and_prepare()
  return catalogue.DatasetSpec(name=SPEC_NAME, tfds_name='bench_photos', train_split='train',
                               val_split=None, test_split='train', num_classes=10)


def write_folder(root: str, paths: Sequence[str]) -> str:
  """The photos in the FGVC-Aircraft layout (links to the same files); the root."""
  from bissl_jax.data import folder  # pylint: disable=import-outside-toplevel
  images = os.path.join(root, folder.ARCHIVE_DIR, 'data', 'images')
  os.makedirs(images, exist_ok=True)
  with open(os.path.join(images, '..', 'variants.txt'), 'w', encoding='utf-8') as f:
    f.write('\n'.join(f'v{c}' for c in range(10)) + '\n')
  lines = []
  for i, path in enumerate(paths):
    os.link(path, os.path.join(images, os.path.basename(path)))
    lines.append(f'{os.path.basename(path)[:-4]} v{i % 10}')
  with open(os.path.join(images, '..', 'images_variant_train.txt'), 'w',
            encoding='utf-8') as f:
    f.write('\n'.join(lines) + '\n')
  return root


class _InProcess:
  """Today's loader: ``dataset.batch(rows)`` in this process, for the stack's rows."""

  def __init__(self, dataset, batch: int, batches: int, seed: int):
    from bissl_jax.data import BatchStack  # pylint: disable=import-outside-toplevel
    self.dataset, self.rows = dataset, BatchStack(len(dataset), batch, seed=seed).take(batches)
    self.next_row = 0

  def next(self):
    out = self.dataset.batch(self.rows[self.next_row])
    self.next_row += 1
    return out

  def close(self):
    pass


class _FolderToday:
  """Today's folder loader (``read_fgvc_image`` per image, full decode)."""

  def __init__(self, records, size: int):
    self.records, self.size = records, size
    self.name, self.num_classes, self.multilabel = 'folder', records.num_classes, False

  def __len__(self):
    return len(self.records)

  def batch(self, indices):
    from bissl_jax.data import folder  # pylint: disable=import-outside-toplevel
    return {'image': np.stack([folder.read_fgvc_image(self.records.paths[int(i)], self.size)
                               for i in indices]),
            'label': self.records.labels[np.asarray(indices)]}


def add_arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument('--tiny', action='store_true', help='smoke test: 16 small photos.')
  parser.add_argument('--images', type=int, default=256, help='photos written.')
  parser.add_argument('--photo', default='500x375', help='photo size WxH.')
  parser.add_argument('--batch', type=int, default=32, help='images per batch.')
  parser.add_argument('--batches', type=int, default=6, help='timed batches per round.')
  parser.add_argument('--sizes', default='96,224', help='output sides in pixels.')
  parser.add_argument('--workers', default='0,1,2,4',
                      help='Grain worker counts (full decode and folder: the first and 2).')
  parser.add_argument('--repeats', type=int, default=2, help='interleaved rounds.')
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--no-record', action='store_true',
                      help='print only; do not write to docs/benchmarks/runs/.')
  parser.add_argument('--doc', default=None, help='the markdown file to record into (default: docs/benchmarks/runs/input_pipeline.md).')


def main(argv: Optional[Sequence[str]] = None) -> List[common.Table]:
  """Runs the benchmark; returns (and prints, and records) its table."""
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  add_arguments(parser)
  argv = list(sys.argv[1:] if argv is None else argv)
  args = parser.parse_args(argv)
  args.argv = argv
  if args.tiny:
    args.images, args.photo, args.batch, args.batches = 16, '64x48', 4, 2
    args.sizes, args.workers, args.repeats = '16', '0', 1
  from bissl_jax.data import grain_stream, image_records  # pylint: disable=import-outside-toplevel
  from bissl_jax.data import tfds_loader  # pylint: disable=import-outside-toplevel
  sizes = [int(s) for s in args.sizes.split(',')]
  workers = [int(w) for w in args.workers.split(',')]
  photo = tuple(int(v) for v in args.photo.split('x'))
  full_decode_workers = {workers[0], 2} if 2 in workers else {workers[0]}
  warmup = lambda w: 1 + 2 * max(w, 1)  # batches drawn before the clock starts

  with tempfile.TemporaryDirectory() as tmp:
    paths = write_photos(os.path.join(tmp, 'jpeg'), args.images, photo, args.seed)
    mean_kb = np.mean([os.path.getsize(p) for p in paths]) / 1024
    spec = write_tfds(os.path.join(tmp, 'tfds'), paths)
    root = write_folder(os.path.join(tmp, 'folder'), paths)
    data_dir = os.path.join(tmp, 'tfds')

    def contenders(size):
      """name -> (make loader, batches to draw before the clock starts)."""
      from bissl_jax.data import catalogue  # pylint: disable=import-outside-toplevel
      options = lambda w: image_records.LoaderOptions(workers=w, buffer=1)
      tfds_records = lambda draft, w: image_records.open_records(
          spec, 'train', data_dir=data_dir, image_size=size, draft=draft, options=options(w))
      folder_records = lambda draft, w: image_records.open_records(
          catalogue.get_spec('fgvc_aircraft'), 'train', data_dir=root, image_size=size,
          draft=draft, options=options(w))
      # Start-up, then until the buffers (one batch per thread and per worker queue)
      # have filled once: the clock then sees the steady rate, not the buffered batches.
      stream = lambda records, w: (lambda: grain_stream.level_stream(
          records, args.batch, seed=args.seed, takes=[1] * (warmup(w) + args.batches),
          process_index=0, process_count=1), warmup(w))
      out = {
          'today: TFDS loader (LazyTfdsDataset), in process': (lambda: _InProcess(
              tfds_loader.open_tfds_split(spec, 'train', data_dir=data_dir, image_size=size),
              args.batch, 1 + args.batches, args.seed), 1),
          'today: folder loader, in process': (lambda: _InProcess(
              _FolderToday(folder_records(False, 0), size), args.batch, 1 + args.batches,
              args.seed), 1),
      }
      for w in workers:
        if w in full_decode_workers:
          out[f'Grain, TFDS ArrayRecord, full decode, {w} workers'] = stream(
              tfds_records(False, w), w)
        out[f'Grain, TFDS ArrayRecord, draft decode, {w} workers'] = stream(
            tfds_records(True, w), w)
        if w in full_decode_workers:
          out[f'Grain, folder, draft decode, {w} workers'] = stream(folder_records(True, w), w)
      return out

    rows = []
    for size in sizes:
      makers = contenders(size)
      rates = {name: [] for name in makers}
      startup = {name: [] for name in makers}
      for _ in range(args.repeats):
        for name, (make, skip) in makers.items():
          start = time.perf_counter()
          loader = make()
          loader.next()
          first = time.perf_counter()
          for _ in range(skip - 1):
            loader.next()
          steady = time.perf_counter()
          for _ in range(args.batches):
            batch = loader.next()
          end = time.perf_counter()
          loader.close()
          assert batch['image'].shape == (args.batch, size, size, 3), name
          startup[name].append(first - start)
          rates[name].append(args.batch * args.batches / (end - steady))
      base = {'tfds': common.median(rates['today: TFDS loader (LazyTfdsDataset), in process']),
              'folder': common.median(rates['today: folder loader, in process'])}
      for name in makers:
        rate = common.median(rates[name])
        ref = base['folder' if 'folder' in name else 'tfds']
        rows.append([name, size, common.median(startup[name]), rate, rate / ref])

  env = common.environment()
  notes = [
      f'{args.images} synthetic JPEG photos of {photo[0]}×{photo[1]} px (mean '
      f'{mean_kb:.0f} KiB, quality 90), batches of {args.batch}; per round, {args.batches} '
      'timed batches after the start-up batch and, for Grain, 2 per worker (or per '
      'thread) more, so the buffers are full and the rate is the steady one; median of '
      f'{args.repeats} interleaved rounds. Buffers: 1 batch per thread and per worker.',
      "'vs today' divides by today's loader of the same source (TFDS or folder) at the "
      'same size, measured in the same run.',
      'Worker processes are spawned (Grain), so the start-up column includes importing '
      'JAX, Grain and (for TFDS) tensorflow_datasets in each worker.',
      f'CPU cores: {os.cpu_count()}; load average at the end (1, 5, 15 min): '
      f"{env['load']}. On a shared machine more workers than free cores cannot help.",
  ]
  table = common.Table(
      title='Decoded + resized images per second, one process feeding batches',
      columns=['Loader', 'side px', 'start-up s', 'images/s', 'vs today'], rows=rows,
      notes=notes)
  return common.finish('input_pipeline', [table], args)


if __name__ == '__main__':
  main()
