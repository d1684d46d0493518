"""Tests for the per-level batch stacks (BiSSL paper Appendix B.4; docs/sources.md, "Data stacks")."""
import numpy as np
import pytest

from bissl_jax.data.stacks import BatchStack, StackState


def _expected_take_plan(batches_per_epoch, num_batches, num_takes):
  """The reshuffle rule written out by hand: (epoch, first batch) per take."""
  plan, epoch, cursor = [], 0, 0
  for _ in range(num_takes):
    if batches_per_epoch - cursor < num_batches:
      epoch, cursor = epoch + 1, 0
    plan.append((epoch, cursor))
    cursor += num_batches
  return plan


def test_reshuffles_every_second_take_with_two_batches_skipped():
  # 10 full batches per epoch (the 5 extra examples are the dropped remainder).
  stack = BatchStack(num_examples=10 * 8 + 5, batch_size=8, seed=7)
  epochs = []
  for take in range(20):
    batches = stack.take(4)
    epoch = stack.state.epoch
    epochs.append(epoch)
    perm = np.random.default_rng([7, epoch]).permutation(85)
    first = 0 if take % 2 == 0 else 4
    np.testing.assert_array_equal(
        batches.reshape(-1), perm[first * 8:(first + 4) * 8])
  # Takes 0,1 in epoch 0, takes 2,3 in epoch 1, ...: 9 reshuffles in 20 takes,
  # each leaving batches 8 and 9 of the epoch unused.
  assert epochs == [t // 2 for t in range(20)]
  assert stack.state == StackState(epoch=9, cursor=8)


@pytest.mark.parametrize('batches_per_epoch,num_batches',
                         [(10, 4), (10, 5), (7, 3), (5, 5), (9, 1)])
def test_take_plan_matches_rule(batches_per_epoch, num_batches):
  stack = BatchStack(batches_per_epoch * 4, 4, seed=0)
  plan = _expected_take_plan(batches_per_epoch, num_batches, 25)
  for epoch, cursor in plan:
    batches = stack.take(num_batches)
    perm = stack.permutation(epoch)
    np.testing.assert_array_equal(
        batches, perm[cursor * 4:(cursor + num_batches) * 4].reshape(-1, 4))


def test_no_index_repeats_within_an_epoch():
  stack = BatchStack(num_examples=103, batch_size=10, seed=1)
  seen = {}
  for _ in range(30):
    batches = stack.take(3)
    seen.setdefault(stack.state.epoch, []).extend(batches.reshape(-1).tolist())
  for indices in seen.values():
    assert len(indices) == len(set(indices))
    assert all(0 <= i < 103 for i in indices)
  # Epochs differ from each other.
  assert seen[0][:10] != seen[1][:10]


def test_small_set_draws_batch_by_batch():
  # 3 full batches per epoch but stages of 8: reshuffle whenever it runs out.
  stack = BatchStack(num_examples=14, batch_size=4, seed=2)
  batches = stack.take(8)
  assert batches.shape == (8, 4)
  for b, row in enumerate(batches):
    epoch, position = divmod(b, 3)
    perm = np.random.default_rng([2, epoch]).permutation(14)
    np.testing.assert_array_equal(row, perm[position * 4:(position + 1) * 4])
  assert stack.state == StackState(epoch=2, cursor=2)
  # The next take continues the current epoch before reshuffling.
  row = stack.take(8)[0]
  np.testing.assert_array_equal(
      row, np.random.default_rng([2, 2]).permutation(14)[8:12])


def test_resume_from_state_equals_uninterrupted():
  uninterrupted = BatchStack(95, 8, seed=5)
  reference = [uninterrupted.take(n) for n in (4, 4, 3, 4, 13, 4, 4)]
  first = BatchStack(95, 8, seed=5)
  got = [first.take(n) for n in (4, 4, 3)]
  state = first.state
  assert isinstance(state.epoch, int) and isinstance(state.cursor, int)
  resumed = BatchStack(95, 8, seed=5, state=StackState(*tuple(state)))
  got += [resumed.take(n) for n in (4, 13, 4, 4)]
  for a, b in zip(reference, got):
    np.testing.assert_array_equal(a, b)
  assert resumed.state == uninterrupted.state


def test_errors():
  with pytest.raises(ValueError, match='exceeds the dataset size 5'):
    BatchStack(5, 8, seed=0)
  with pytest.raises(ValueError, match='Invalid stack state'):
    BatchStack(16, 4, seed=0, state=StackState(0, 5))
  with pytest.raises(ValueError, match='num_batches'):
    BatchStack(16, 4, seed=0).take(0)
