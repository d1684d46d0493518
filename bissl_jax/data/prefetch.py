"""Batches copied to the devices ahead of the step that uses them.

``jax.device_put`` (and ``jax.make_array_from_process_local_data``) return before
the copy is done, so placing the next ``size`` batches while the current step
runs overlaps the host-to-device copy with compute (flax's
``jax_utils.prefetch_to_device``, for a mesh's ``NamedSharding``: ``place`` is
``bissl_jax.runtime.mesh.shard_batch`` on the run's mesh).

:class:`PrefetchedData` wraps a stage's data (``bissl_jax.pipeline.stage_loop``'s
``batch``/``position``/``restore``). Its position is the one after the batches
the stage *consumed*, recorded when each batch was drawn, never that of the
batches copied ahead: a checkpoint resumes on the first batch not yet trained on.
"""
import collections
import copy
import itertools
from typing import Any, Callable, Iterable, Iterator, Optional


def prefetch_to_device(iterator: Iterable, size: int,
                       place: Callable[[Any], Any]) -> Iterator:
  """Yields ``place(x)`` for each ``x`` of ``iterator``, ``size`` placed ahead.

  Args:
    iterator: host batches.
    size: batches placed before they are asked for (0: none ahead).
    place: puts one batch on the devices (e.g. ``parallel.shard_batch``).
  """
  if size < 0:
    raise ValueError(f'Prefetch size {size} must be >= 0 (config.data.device_prefetch).')
  queue = collections.deque()
  iterator = iter(iterator)

  def enqueue(n):
    for x in itertools.islice(iterator, n):
      queue.append(place(x))

  enqueue(size + 1)
  while queue:
    yield queue.popleft()
    enqueue(1)


class PrefetchedData:
  """A stage's data with ``size`` batches placed on the devices ahead.

  Args:
    data: the stage's data (``batch(step)``, ``position(steps_done)``,
      ``restore(position, steps_done)``, optionally ``close()``), read in step order.
    place: puts one host batch on the devices.
    size: batches placed ahead (``config.data.device_prefetch``).
    total_steps: steps of the stage (nothing past the last one is drawn).
  """

  def __init__(self, data, place: Callable[[Any], Any], *, size: int, total_steps: int):
    if size < 0:
      raise ValueError(f'Prefetch size {size} must be >= 0 (config.data.device_prefetch).')
    self.data, self.place, self.size, self.total_steps = data, place, int(size), int(total_steps)
    self._batches: Optional[Iterator] = None
    self._next = None       # the step the next batch is for
    self._consumed = None   # (steps done, data position after them)

  def _drawn(self, start: int) -> Iterator:
    # The position after each batch is taken when it is drawn: later draws (the
    # batches placed ahead) advance the data past it.
    for step in range(start, self.total_steps):
      batch = self.data.batch(step)
      yield batch, copy.deepcopy(self.data.position(step + 1))

  def batch(self, step: int) -> Any:
    if self._batches is None:
      self._batches = prefetch_to_device(
          self._drawn(step), self.size, lambda item: (self.place(item[0]), item[1]))
      self._next = step
    if step != self._next:
      raise ValueError(f'Prefetched data is read in order: asked for step {step}, but the '
                       f'next batch is step {self._next}.')
    batch, position = next(self._batches)
    self._next, self._consumed = step + 1, (step + 1, position)
    return batch

  def position(self, steps_done: int) -> dict:
    if self._consumed is None:  # nothing drawn since the start or a restore
      return self.data.position(steps_done)
    done, position = self._consumed
    if steps_done != done:
      raise ValueError(f'Prefetched data was consumed up to step {done}, not {steps_done}.')
    return position

  def restore(self, position: dict, steps_done: int) -> None:
    self._batches, self._next, self._consumed = None, None, None
    self.data.restore(position, steps_done)

  def close(self) -> None:
    self._batches = None
    if hasattr(self.data, 'close'):
      self.data.close()
