"""Parameter partition: labels, exact-coverage check, per-group optimizers, group moves."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from bissl_jax import partition


def _params():
  return {
      "backbone": {"conv1": {"kernel": jnp.ones((3, 3, 1, 2))}, "bn1": {"scale": jnp.ones(2)}},
      "pretext_head": {"projector": {"dense_0": {"kernel": jnp.ones((2, 4))}}},
      "downstream_head": {"dense": {"kernel": jnp.ones((2, 3)), "bias": jnp.zeros(3)}},
  }


def test_group_labels_and_masks():
  params = _params()
  labels = partition.group_labels(params)
  assert labels["backbone"]["bn1"]["scale"] == "backbone"
  assert labels["downstream_head"]["dense"]["bias"] == "downstream_head"
  masks = partition.make_masks(params)
  assert set(masks) == set(partition.GROUPS)
  assert masks["pretext_head"]["pretext_head"]["projector"]["dense_0"]["kernel"]
  assert not masks["pretext_head"]["backbone"]["conv1"]["kernel"]
  partition.check_coverage(params, masks)  # exact: no error
  with pytest.raises(ValueError, match="lam_rho"):
    partition.group_labels({**params, "lam_rho": jnp.zeros(())})


def test_coverage_catches_missing_leaf():
  params = _params()
  masks = partition.make_masks(params)
  masks["backbone"]["backbone"]["bn1"]["scale"] = False
  with pytest.raises(ValueError, match=r"no group.*\['backbone'\]\['bn1'\]\['scale'\]"):
    partition.check_coverage(params, masks)
  # A mask that lacks the path entirely also leaves it uncovered.
  masks = partition.make_masks(params)
  del masks["downstream_head"]["downstream_head"]["dense"]["bias"]
  with pytest.raises(ValueError, match=r"\['downstream_head'\]\['dense'\]\['bias'\]"):
    partition.check_coverage(params, masks)


def test_coverage_catches_doubly_covered_leaf():
  params = _params()
  masks = partition.make_masks(params)
  masks["pretext_head"]["backbone"]["conv1"]["kernel"] = True
  with pytest.raises(ValueError, match=r"more than one.*\['backbone'\]\['conv1'\]\['kernel'\]"):
    partition.check_coverage(params, masks)
  # Prefix masks: a bool on a subtree covers every leaf under it.
  prefix = {"backbone": {"backbone": True, "pretext_head": False, "downstream_head": True}}
  with pytest.raises(ValueError, match="downstream_head.*no group|no group.*pretext_head"):
    partition.check_coverage(params, prefix)


def test_partition_optimizer_freezes_absent_groups():
  params = _params()
  tx = partition.partition_optimizer({"backbone": optax.sgd(0.5)}, params)
  grads = jax.tree_util.tree_map(jnp.ones_like, params)
  state = tx.init(params)
  updates, state = tx.update(grads, state, params)
  new = optax.apply_updates(params, updates)
  # Trained group: p − 0.5·g.
  np.testing.assert_allclose(new["backbone"]["conv1"]["kernel"], 0.5)
  np.testing.assert_allclose(new["backbone"]["bn1"]["scale"], 0.5)
  # Frozen groups unchanged, bit for bit.
  for group in ("pretext_head", "downstream_head"):
    same = jax.tree_util.tree_map(lambda a, b: bool(jnp.array_equal(a, b)), new[group],
                                  params[group])
    assert all(jax.tree_util.tree_leaves(same))
  with pytest.raises(ValueError, match="head"):
    partition.partition_optimizer({"head": optax.sgd(1.0)}, params)


def test_partition_optimizer_per_group_transforms_and_subset_tree():
  # The lower level's tree has no downstream head; groups use different optimizers.
  params = {k: v for k, v in _params().items() if k != "downstream_head"}
  tx = partition.partition_optimizer(
      {"backbone": optax.sgd(1.0), "pretext_head": optax.sgd(0.1, momentum=0.9)}, params)
  grads = jax.tree_util.tree_map(jnp.ones_like, params)
  state = tx.init(params)
  for _ in range(2):
    updates, state = tx.update(grads, state, params)
    params = optax.apply_updates(params, updates)
  np.testing.assert_allclose(params["backbone"]["bn1"]["scale"], 1.0 - 2.0)
  # Momentum: steps of 0.1·1 then 0.1·(1 + 0.9).
  np.testing.assert_allclose(params["pretext_head"]["projector"]["dense_0"]["kernel"],
                             1.0 - 0.1 - 0.19, rtol=1e-6)


def test_take_put_merge_are_functional():
  params = _params()
  theta = partition.take_group(params, "backbone")
  theta_d = jax.tree_util.tree_map(lambda x: x * 2, theta)
  moved = partition.put_group(params, "backbone", theta_d)
  assert moved["backbone"] is theta_d and params["backbone"] is theta  # original untouched
  assert moved["downstream_head"] is params["downstream_head"]
  merged = partition.merge_groups(backbone=theta_d, downstream_head=params["downstream_head"])
  assert list(merged) == ["backbone", "downstream_head"]
  with pytest.raises(ValueError, match="Unknown"):
    partition.merge_groups(backbone=theta, head=theta)
  with pytest.raises(ValueError, match="not in this tree"):
    partition.take_group(merged, "pretext_head")
  with pytest.raises(ValueError, match="Unknown group"):
    partition.put_group(params, "lam", theta)
