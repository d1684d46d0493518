"""Parameter partition: labels, exact-coverage check, per-group optimizers, group moves."""
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from config_helpers import REPO_ROOT

from bissl_jax.core import partition


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
  assert set(masks) == set(params)
  assert masks["pretext_head"]["pretext_head"]["projector"]["dense_0"]["kernel"]
  assert not masks["pretext_head"]["backbone"]["conv1"]["kernel"]
  partition.check_coverage(params, masks)  # exact: no error
  assert partition.group_labels({**params, "lam_rho": jnp.zeros(())})["lam_rho"] == "lam_rho"
  with pytest.raises(ValueError, match="lam_roh"):
    partition.group_labels({**params, "lam_roh": jnp.zeros(())})
  frozen = partition.group_labels(params, _frozen_conv(params))
  assert frozen["backbone"]["conv1"]["kernel"] == partition.FROZEN


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


def _frozen_conv(params):
  # Freeze the conv kernel, as LoRA freezes base weights.
  mask = partition.all_trainable(params)
  mask["backbone"]["conv1"]["kernel"] = False
  return mask


def test_level_optimizer_freezes_masked_leaves_without_state():
  params = _params()
  trainable = _frozen_conv(params)
  tx = partition.level_optimizer(
      {g: optax.sgd(0.5, momentum=0.9) for g in params}, params, trainable)
  grads = jax.tree_util.tree_map(jnp.ones_like, params)
  state = tx.init(params)
  # The frozen leaf has no momentum buffer: only the three trainable leaves carry one...
  momenta = [x for x in jax.tree_util.tree_leaves(state) if getattr(x, "ndim", 0) > 0]
  assert sorted(x.shape for x in momenta) == sorted(
      [(2,), (2, 4), (2, 3), (3,)]), [x.shape for x in momenta]
  updates, state = tx.update(grads, state, params)
  new = optax.apply_updates(params, updates)
  # ... trained leaves move by −0.5·g, the frozen one not at all, bit for bit.
  np.testing.assert_allclose(new["backbone"]["bn1"]["scale"], 0.5)
  np.testing.assert_allclose(new["downstream_head"]["dense"]["bias"], -0.5)
  np.testing.assert_array_equal(new["backbone"]["conv1"]["kernel"],
                                params["backbone"]["conv1"]["kernel"])


def test_level_optimizer_checks_its_groups():
  params = _params()
  with pytest.raises(ValueError, match="unknown group"):
    partition.level_optimizer({"head": optax.sgd(1.0)}, params)
  with pytest.raises(ValueError, match=r"No optimizer for the trainable group\(s\) \['downstream_head'"):
    partition.level_optimizer({"backbone": optax.sgd(1.0), "pretext_head": optax.sgd(1.0)},
                              params)
  # lam_rho is a group of its own (the learnable λ of the upper level).
  upper = {"backbone": params["backbone"], "lam_rho": jnp.zeros(())}
  tx = partition.level_optimizer({"backbone": optax.sgd(1.0), "lam_rho": optax.sgd(2.0)}, upper)
  updates, _ = tx.update(jax.tree_util.tree_map(jnp.ones_like, upper), tx.init(upper), upper)
  np.testing.assert_allclose(updates["lam_rho"], -2.0)


def test_level_optimizer_per_group_transforms_and_subset_tree():
  # The lower level's tree has no downstream head; groups use different optimizers.
  params = {k: v for k, v in _params().items() if k != "downstream_head"}
  tx = partition.level_optimizer(
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


def test_split_and_merge_round_trip():
  params = _params()
  train, frozen = partition.split(params, _frozen_conv(params))
  assert train["backbone"]["conv1"]["kernel"] is None
  assert frozen["backbone"]["conv1"]["kernel"] is params["backbone"]["conv1"]["kernel"]
  assert len(jax.tree_util.tree_leaves(train)) == 4 and len(jax.tree_util.tree_leaves(frozen)) == 1
  back = partition.merge(train, frozen)
  assert jax.tree_util.tree_structure(back) == jax.tree_util.tree_structure(params)
  full = partition.zeros_for_frozen(jax.tree_util.tree_map(jnp.ones_like, train), frozen)
  np.testing.assert_array_equal(full["backbone"]["conv1"]["kernel"], 0.0)
  np.testing.assert_array_equal(full["backbone"]["bn1"]["scale"], 1.0)
  with pytest.raises(ValueError, match="structure of the parameters"):
    partition.split(params, {"backbone": True})


_LOWER_UPDATE = """
import hashlib, jax, jax.numpy as jnp, optax
from bissl_jax.core import partition
params = {"backbone": {"w": jnp.ones(3)}, "pretext_head": {"w": jnp.ones(2)},
          "downstream_head": {"w": jnp.ones(4)}, "lam_rho": jnp.zeros(())}
tx = partition.level_optimizer({g: optax.sgd(0.1, momentum=0.9) for g in params}, params)
text = jax.jit(tx.update).lower(params, tx.init(params), params).as_text(debug_info=True)
print(hashlib.sha256(text.encode()).hexdigest())
"""


def test_level_optimizer_program_does_not_depend_on_string_hashing():
  """The groups' updates come in one order in every process, whatever PYTHONHASHSEED
  is: otherwise each process lowers another program, and a persistent compilation
  cache (a second run, or the other processes of a job) never hits."""
  digests = set()
  for seed in ("1", "2", "3", "4"):  # 4 groups: 24 orders a set of their names can take
    env = dict(os.environ, PYTHONHASHSEED=seed, JAX_PLATFORMS="cpu", PYTHONPATH=REPO_ROOT)
    digests.add(subprocess.run([sys.executable, "-c", _LOWER_UPDATE], env=env, check=True,
                               capture_output=True, text=True).stdout.strip())
  assert len(digests) == 1, digests
