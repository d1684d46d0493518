"""Streamed batches on Grain: decoding in worker processes, resumable mid-epoch.

The order of the examples is the batch stacks' (:mod:`bissl_jax.data.stacks`,
docs/sources.md, "Data stacks"): a stage plans its whole future with :meth:`BatchStack.plan` (the
``(epoch, position)`` of every batch it will take, in take order), so a
streamed level draws exactly the batches the in-memory path draws. Grain does
the work: a ``MapDataset`` whose element ``k`` is batch ``k`` of that plan,
decoded and resized (:class:`bissl_jax.data.image_records.ImageRecords`) by
``threads`` threads in each of ``workers`` processes (``mp_prefetch``: worker
``w`` makes batches ``w, w + workers, ...``, which are reassembled in order, so
the batches do not depend on the worker count), with ``buffer`` batches kept
ready per process. Random crops, flips and colour augmentations stay on the
device (``bissl_jax.tasks.augment``).

**Processes.** Each of ``process_count`` processes (``jax.process_index()``,
``jax.process_count()`` by default) decodes only its rows
``[p·B/P, (p+1)·B/P)`` of each global batch of ``B``: the shards are disjoint
and together the whole batch (:func:`bissl_jax.data.stacks.process_shard`).
``bissl_jax.runtime.mesh.shard_batch`` assembles the global array.

**Resume.** :meth:`BatchStream.get_state` is Grain's iterator state (JSON);
the stage loop keeps it as its own item of the orbax checkpoint
(``RunCheckpointer.save(..., iterators=...)``) and :meth:`BatchStream.set_state`
continues on exactly the batch an uninterrupted run would see next.
"""
from typing import Optional, Sequence

import numpy as np

from bissl_jax.data.image_records import ImageRecords, LoaderOptions
from bissl_jax.data.stacks import BatchStack, process_shard


def plan_takes(stack: BatchStack, takes: Sequence[int]) -> np.ndarray:
  """``(epoch, position)`` of every batch of ``stack.take(n) for n in takes``.

  Advances ``stack`` as those takes would (the reshuffle rule of docs/sources.md is
  :meth:`BatchStack.plan`'s). No takes (a stage of 0 steps, e.g. 0 pretext epochs)
  plan no batches.
  """
  plans = [stack.plan(int(n)) for n in takes]
  return np.concatenate(plans) if plans else np.zeros((0, 2), np.int64)


class _PlannedRows(Sequence):
  """Example ``j`` of the flat, per-process stream: row ``j mod rows`` of
  this process's part of planned batch ``j // rows`` (picklable: a fresh
  stack recomputes the permutations in each worker)."""

  def __init__(self, stack: BatchStack, places: np.ndarray, first: int, rows: int):
    self.places, self.first, self.rows = np.asarray(places, np.int64), first, rows
    self.num_examples, self.batch_size, self.seed = (
        stack.num_examples, stack.batch_size, stack.seed)
    self._stack = None

  def __getstate__(self):
    state = dict(self.__dict__)
    state['_stack'] = None
    return state

  def __len__(self) -> int:
    return len(self.places) * self.rows

  def __getitem__(self, j: int) -> int:
    if self._stack is None:
      self._stack = BatchStack(self.num_examples, self.batch_size, seed=self.seed)
    k, r = divmod(int(j), self.rows)
    epoch, position = self.places[k]
    return int(self._stack.rows(epoch, position)[self.first + r])


class _Decode:
  """Grain map: example index -> decoded example (runs in the workers)."""

  def __init__(self, records: ImageRecords):
    self.records = records

  def __call__(self, index: int) -> dict:
    return self.records[index]


def _flags_parsed() -> None:
  # Grain's worker processes read absl flags; outside an absl app (tests,
  # notebooks) they were never parsed, so take the defaults.
  from absl import flags  # pylint: disable=import-outside-toplevel
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


class BatchStream:
  """The planned batches of one level, decoded by Grain, in order.

  Args:
    records: the examples (:class:`ImageRecords`).
    stack: a fresh :class:`BatchStack` of the level (its seed and batch size);
      it is not advanced.
    places: the ``(epoch, position)`` plan of every batch the stage takes
      (:func:`plan_takes` on a copy of ``stack``).
    options: workers, threads and buffer (default ``records.options``).
    process_index, process_count: this process's shard (default: JAX's).
  """

  def __init__(self, records: ImageRecords, stack: BatchStack, places: np.ndarray, *,
               options: Optional[LoaderOptions] = None,
               process_index: Optional[int] = None,
               process_count: Optional[int] = None):
    import grain  # pylint: disable=import-outside-toplevel
    if len(records) != stack.num_examples:
      raise ValueError(f'{records.name}: {len(records)} examples, but the stack '
                       f'was made for {stack.num_examples}.')
    self.options = options or records.options
    first, rows = process_shard(stack.batch_size, process_index, process_count)
    self.rows, self.num_batches = rows, len(places)
    dataset = (grain.MapDataset.source(_PlannedRows(stack, places, first, rows))
               .map(_Decode(records)).batch(rows, drop_remainder=True))
    iterable = dataset.to_iter_dataset(grain.ReadOptions(
        num_threads=self.options.threads,
        prefetch_buffer_size=self.options.buffer))
    if self.options.workers:
      _flags_parsed()
      iterable = iterable.mp_prefetch(grain.MultiprocessingOptions(
          num_workers=self.options.workers,
          per_worker_buffer_size=self.options.buffer))
    self._iterable, self._iterator, self.consumed = iterable, None, 0
    self._closed = False

  @property
  def _it(self):
    if self._iterator is None:  # workers start on the first batch asked for
      if self._closed:
        raise ValueError('This stream was closed; open a new one.')
      self._iterator = iter(self._iterable)
    return self._iterator

  def next(self) -> dict:
    """The next batch: ``{'image': uint8 (rows, S, S, 3), 'label': ...}``."""
    if self.consumed >= self.num_batches:
      raise ValueError(f'All {self.num_batches} planned batches were drawn; '
                       'plan the stage with more takes.')
    batch = next(self._it)
    self.consumed += 1
    return batch

  def draw(self, count: int) -> dict:
    """The next ``count`` batches, stacked: ``(count, rows, ...)``."""
    batches = [self.next() for _ in range(count)]
    return {key: np.stack([b[key] for b in batches]) for key in batches[0]}

  def get_state(self) -> dict:
    """Grain's iterator state after the batches drawn so far (JSON)."""
    return {'grain': self._it.get_state(), 'consumed': self.consumed}

  def set_state(self, state: dict) -> None:
    """Continues after the batches counted in ``state`` (from :meth:`get_state`)."""
    self._it.set_state(state['grain'])
    self.consumed = int(state['consumed'])

  def close(self) -> None:
    """Stops the worker processes (also done on garbage collection)."""
    if self._iterator is not None and hasattr(self._iterator, 'close'):
      self._iterator.close()
    self._iterator, self._closed = None, True


def level_stream(records: ImageRecords, batch_size: int, *, seed: int,
                 takes: Sequence[int], **kwargs) -> BatchStream:
  """A :class:`BatchStream` for the stacks' takes ``takes`` from the start.

  Example: BiSSL's lower level over T alternations takes
  ``[lower_steps, 1] * T`` (N_L batches, then the HVP batch).
  """
  new_stack = lambda: BatchStack(len(records), batch_size, seed=seed)
  return BatchStream(records, new_stack(), plan_takes(new_stack(), takes), **kwargs)


class StreamedEpochData:
  """:class:`bissl_jax.pipeline.stage_loop.EpochData` for streamed records.

  The same batches as ``EpochData`` (one take of ``steps_per_epoch`` batches per
  epoch), decoded by Grain. ``position`` carries Grain's iterator state under
  ``'iterators'`` (the stage loop stores it as its own checkpoint item).

  Args:
    records: the examples.
    batch_size: examples per step (global).
    seed: seed of the permutations.
    steps_per_epoch: batches per epoch.
    total_steps: steps of the stage.
    **kwargs: for :class:`BatchStream` (options, process_index, process_count).
  """

  def __init__(self, records: ImageRecords, batch_size: int, *, seed: int,
               steps_per_epoch: int, total_steps: int, **kwargs):
    epochs = -(-int(total_steps) // int(steps_per_epoch))
    self.stream = level_stream(records, batch_size, seed=seed,
                               takes=[steps_per_epoch] * epochs, **kwargs)

  def batch(self, step: int) -> dict:
    if step != self.stream.consumed:
      raise ValueError(f'Streamed data is read in order: asked for step {step}, '
                       f'but the next batch is step {self.stream.consumed}.')
    return self.stream.next()

  def position(self, steps_done: int) -> dict:
    del steps_done
    return {'iterators': {'data': self.stream.get_state()}}

  def restore(self, position: dict, steps_done: int) -> None:
    if 'data' not in position.get('iterators', {}):
      raise ValueError('The checkpoint holds no streamed-data iterator state (it was '
                       'written by an in-memory run); resume it with the same data '
                       'or start with a fresh --workdir.')
    self.stream.set_state(position['iterators']['data'])
    if self.stream.consumed != steps_done:
      raise ValueError(f'The checkpoint\'s data iterator is at step '
                       f'{self.stream.consumed}, its state at {steps_done}.')

  def close(self) -> None:
    self.stream.close()
