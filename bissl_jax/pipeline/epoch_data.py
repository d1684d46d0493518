"""A stage's batches, resumable at any step: one dataset, a fresh permutation per epoch.

What :func:`bissl_jax.pipeline.stage_loop.run_stage` reads its batches from (the
:class:`StageData` protocol), and its epoch-based implementation, in memory
(:class:`EpochData`) or streamed by Grain workers (:func:`epoch_data`).
"""
from typing import Any, Callable, Optional, Protocol


class StageData(Protocol):
  """Where a stage's batches come from, resumable at any step."""

  def batch(self, step: int) -> Any:
    """The host batch of step ``step`` (0-based)."""

  def position(self, steps_done: int) -> dict:
    """A JSON record from which :meth:`restore` continues after ``steps_done`` steps."""

  def restore(self, position: dict, steps_done: int) -> None:
    """Continues from a record written by :meth:`position`."""


class EpochData:
  """Batches of one dataset, a fresh permutation per epoch, the remainder dropped.

  Each process reads only its rows of every global batch
  (:func:`bissl_jax.data.process_shard`); ``parallel.shard_batch`` assembles the
  global array. With one process that is the whole batch.

  Args:
    dataset: anything with ``__len__`` and ``batch(indices) -> dict``.
    batch_size: examples per step (global, over all processes).
    seed: seed of the permutations.
    steps_per_epoch: batches per epoch (at most ``len(dataset) // batch_size``).
    process_index, process_count: this process's shard (default: JAX's).
  """

  def __init__(self, dataset, batch_size: int, *, seed: int, steps_per_epoch: int,
               process_index: Optional[int] = None, process_count: Optional[int] = None):
    from bissl_jax.data import BatchStack, process_shard  # pylint: disable=g-import-not-at-top
    self._new_stack = lambda state=None: BatchStack(len(dataset), batch_size, seed=seed,
                                                    state=state)
    first, rows = process_shard(batch_size, process_index, process_count)
    self._local = slice(first, first + rows)
    self.dataset, self.steps_per_epoch = dataset, int(steps_per_epoch)
    self.stack = self._new_stack()
    self._epoch_start, self._rows = stack_position(self.stack), None

  def batch(self, step: int) -> dict:
    i = step % self.steps_per_epoch
    if i == 0 or self._rows is None:
      self._epoch_start = stack_position(self.stack)
      self._rows = self.stack.take(self.steps_per_epoch)
    return self.dataset.batch(self._rows[i][self._local])

  def position(self, steps_done: int) -> dict:
    # Mid-epoch, the current epoch's rows are re-drawn from its start position.
    if steps_done % self.steps_per_epoch == 0:
      return {"stack": stack_position(self.stack)}
    return {"stack": self._epoch_start}

  def restore(self, position: dict, steps_done: int) -> None:
    self.stack = restore_stack(self._new_stack, position["stack"])
    self._rows = None
    if steps_done % self.steps_per_epoch:
      self._epoch_start = position["stack"]
      self._rows = self.stack.take(self.steps_per_epoch)


def epoch_data(dataset, batch_size: int, *, seed: int, steps_per_epoch: int,
               total_steps: int, place: Optional[Callable[[Any], Any]] = None,
               device_prefetch: int = 0, process_index: Optional[int] = None,
               process_count: Optional[int] = None):
  """The data of an epoch-based stage.

  :class:`EpochData` for an in-memory dataset; ``grain_stream.StreamedEpochData``
  (the same batches, decoded by Grain's worker processes, resumable from Grain's
  iterator state) for streamed ``bissl_jax.data.ImageRecords``. Either way each
  process reads only its rows of the global batch.

  Args:
    dataset: the dataset.
    batch_size, seed, steps_per_epoch, total_steps: as :class:`EpochData`.
    place: puts a host batch on the devices (``StageContext.shard``); with
      ``device_prefetch > 0`` a streamed dataset's next ``device_prefetch``
      batches are placed ahead (``bissl_jax.data.prefetch.PrefetchedData``).
    device_prefetch: batches placed ahead (``config.data.device_prefetch``).
    process_index, process_count: this process's shard (default: JAX's).
  """
  from bissl_jax.data import grain_stream, image_records, prefetch  # pylint: disable=g-import-not-at-top
  shard = dict(process_index=process_index, process_count=process_count)
  if not isinstance(dataset, image_records.ImageRecords):
    return EpochData(dataset, batch_size, seed=seed, steps_per_epoch=steps_per_epoch, **shard)
  data = grain_stream.StreamedEpochData(
      dataset, batch_size, seed=seed, steps_per_epoch=steps_per_epoch,
      total_steps=total_steps, **shard)
  if place is None or not device_prefetch:
    return data
  return prefetch.PrefetchedData(data, place, size=device_prefetch, total_steps=total_steps)


def stack_position(stack) -> dict:
  """A :class:`bissl_jax.data.BatchStack`'s position as JSON ``{'epoch', 'cursor'}``."""
  return {"epoch": int(stack.state.epoch), "cursor": int(stack.state.cursor)}


def restore_stack(new_stack: Callable, position: dict):
  """``new_stack(state)`` at a position written by :func:`stack_position`."""
  from bissl_jax.data import StackState  # pylint: disable=g-import-not-at-top
  return new_stack(StackState(int(position["epoch"]), int(position["cursor"])))
