"""Batch stacks: per-level iterators that survive across BiSSL alternations.

BiSSL paper Appendix B.4 and docs/sources.md, "Data stacks": each level draws its batches from
its own stack. A stage of ``n`` steps takes ``n`` batches at once; the stack is
reshuffled only when fewer than ``n`` full batches remain in the current epoch,
and the leftover tail is skipped. With 10 batches per epoch and stages of 4,
the stack reshuffles before every second take and skips 2 batches each time.

A dataset holding fewer than ``n`` full batches at all (a small downstream set)
cannot serve a stage from one epoch; its batches are then drawn one at a time,
reshuffling whenever the current epoch runs out of full batches (paper: "the
data is simply reshuffled every time the remaining number of data points is
smaller than the batch size").

Batches never straddle epochs and drop the remainder (examples beyond the last
full batch of a permutation are unused in that epoch). The permutation of epoch
``e`` is ``np.random.default_rng([seed, e]).permutation(num_examples)``, so the
stack's whole future is fixed by ``(seed, epoch, cursor)``: checkpoint
:attr:`BatchStack.state` (two ints) and resume exactly.
"""
from typing import NamedTuple, Optional

import numpy as np


class StackState(NamedTuple):
  """Position of a :class:`BatchStack`.

  Attributes:
    epoch: index of the current permutation.
    cursor: number of batches already taken from it.
  """
  epoch: int
  cursor: int


class BatchStack:
  """Deterministic, resumable source of example-index batches.

  Args:
    num_examples: size of the dataset.
    batch_size: examples per batch.
    seed: seed of the per-epoch permutations.
    state: a :class:`StackState` to resume from (default: epoch 0, cursor 0).
  """

  def __init__(self, num_examples: int, batch_size: int, *, seed: int,
               state: Optional[StackState] = None):
    if batch_size < 1:
      raise ValueError(f'batch_size must be positive, got {batch_size}.')
    if batch_size > num_examples:
      raise ValueError(
          f'batch_size {batch_size} exceeds the dataset size {num_examples}: '
          'not one full batch can be drawn. Lower the batch size or use a '
          'larger dataset.')
    self.num_examples, self.batch_size, self.seed = (
        int(num_examples), int(batch_size), int(seed))
    self.batches_per_epoch = self.num_examples // self.batch_size
    epoch, cursor = (0, 0) if state is None else (int(state.epoch),
                                                  int(state.cursor))
    if epoch < 0 or not 0 <= cursor <= self.batches_per_epoch:
      raise ValueError(f'Invalid stack state {state}: need epoch >= 0 and '
                       f'0 <= cursor <= {self.batches_per_epoch}.')
    self._epoch, self._cursor = epoch, cursor
    self._cached_epoch, self._cached_perm = None, None

  @property
  def state(self) -> StackState:
    """The position to checkpoint (plain ints)."""
    return StackState(self._epoch, self._cursor)

  def permutation(self, epoch: int) -> np.ndarray:
    """The example order of ``epoch`` (a pure function of seed and epoch)."""
    if epoch != self._cached_epoch:
      rng = np.random.default_rng([self.seed, epoch])
      self._cached_perm = rng.permutation(self.num_examples)
      self._cached_epoch = epoch
    return self._cached_perm

  def _next_epoch(self):
    self._epoch, self._cursor = self._epoch + 1, 0

  def plan(self, num_batches: int) -> np.ndarray:
    """Advances like :meth:`take` but returns where each batch lies, not its rows.

    The one implementation of the reshuffle rule: :meth:`take` gathers the rows
    of this plan, and the streamed loaders (``bissl_jax.data.grain_stream``) plan
    a whole stage ahead with it, so both see the same batches.

    Args:
      num_batches: number of batches (the stage's step count).

    Returns:
      int64 (num_batches, 2): the ``(epoch, batch position in that epoch)`` of
      each batch; its rows are ``rows(epoch, position)``.
    """
    if num_batches < 1:
      raise ValueError(f'num_batches must be positive, got {num_batches}.')
    if num_batches <= self.batches_per_epoch:
      if self.batches_per_epoch - self._cursor < num_batches:
        self._next_epoch()
      start = self._cursor
      self._cursor += num_batches
      return np.stack([np.full(num_batches, self._epoch, np.int64),
                       np.arange(start, start + num_batches, dtype=np.int64)], 1)
    # Small set: one batch at a time, a new epoch whenever this one runs out.
    places = []
    for _ in range(num_batches):
      if self._cursor >= self.batches_per_epoch:
        self._next_epoch()
      places.append((self._epoch, self._cursor))
      self._cursor += 1
    return np.asarray(places, np.int64)

  def rows(self, epoch: int, position: int) -> np.ndarray:
    """The example indices of batch ``position`` of epoch ``epoch``."""
    start = int(position) * self.batch_size
    return self.permutation(int(epoch))[start:start + self.batch_size]

  def take(self, num_batches: int) -> np.ndarray:
    """Takes the batches for one stage.

    Args:
      num_batches: number of batches (the stage's step count).

    Returns:
      int64 (num_batches, batch_size) example indices.
    """
    return np.stack([self.rows(e, p) for e, p in self.plan(num_batches)])


def process_shard(batch_size: int, process_index: Optional[int] = None,
                  process_count: Optional[int] = None) -> tuple[int, int]:
  """``(first row, rows)`` of this process's part of a global batch.

  Process ``p`` of ``P`` reads rows ``[p·B/P, (p+1)·B/P)`` of every global batch
  of ``B`` (the rows its devices hold on a mesh from
  ``bissl_jax.runtime.mesh.make_mesh``); the default is JAX's
  ``jax.process_index()`` and ``jax.process_count()``.
  """
  if process_index is None or process_count is None:
    import jax  # pylint: disable=import-outside-toplevel
    process_index, process_count = jax.process_index(), jax.process_count()
  if batch_size % process_count:
    raise ValueError(f'Global batch {batch_size} does not split over '
                     f'{process_count} processes; use a multiple of '
                     f'{process_count}.')
  rows = batch_size // process_count
  return process_index * rows, rows
