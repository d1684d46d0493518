"""LoRA adapters against dense NumPy weights; trainable masks under optax optimizers."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from bissl_jax.core.params import init_params
from bissl_jax.tasks.downstream.classification import Classification
from bissl_jax.models import lora
from bissl_jax.core import partition
from bissl_jax.models.vit_bundle import build_vit_model


@functools.lru_cache(maxsize=None)
def _models(targets=("q", "v"), rank=2, alpha=None, train_norms=False):
  base = build_vit_model("vit_test_patch4", decoder=None)
  adapted = build_vit_model("vit_test_patch4", decoder=None, lora_rank=rank,
                            lora_alpha=alpha, lora_targets=targets, train_norms=train_norms)
  params, _ = jax.jit(lambda k: init_params(adapted, _head(adapted), k, 8))(jax.random.key(0))
  return base, adapted, params


def _head(model):
  return Classification(model, 8, num_classes=3, head_init="trunc_normal")


def _images():
  return jax.random.normal(jax.random.key(1), (3, 8, 8, 3))


def _without_lora(tree):
  if isinstance(tree, dict):
    return {k: _without_lora(v) for k, v in tree.items() if not k.startswith("lora_")}
  return tree


def test_adapter_leaves_sit_under_the_adapted_module():
  _, _, params = _models(targets=("q", "v", "fc1"))
  attn = params["backbone"]["blocks_1"]["attn"]
  assert set(attn) == {"qkv", "proj", "lora_q", "lora_v"}
  assert set(attn["lora_q"]) == {"lora_a", "lora_b"}
  assert attn["lora_q"]["lora_a"].shape == (16, 2) and attn["lora_q"]["lora_b"].shape == (2, 16)
  assert set(params["backbone"]["blocks_1"]["mlp"]) == {"fc1", "fc2", "lora_fc1"}
  # B = 0, A uniform on ±1/sqrt(d_in).
  assert float(jnp.abs(attn["lora_q"]["lora_b"]).max()) == 0.0
  a = np.asarray(attn["lora_q"]["lora_a"])
  assert np.abs(a).max() <= 1 / np.sqrt(16) and a.std() > 0.1


def test_zero_b_gives_exactly_the_base_model():
  base, adapted, params = _models(targets=("q", "k", "v", "proj", "fc1", "fc2"))
  x = _images()
  out = adapted.features(params["backbone"], {}, x, train=False)[0]
  ref = base.features(_without_lora(params["backbone"]), {}, x, train=False)[0]
  np.testing.assert_array_equal(np.asarray(out), np.asarray(ref))


def _randomise_adapters(params, seed=3):
  leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  new = [jax.random.normal(k, x.shape) * 0.3 if lora.is_lora_path(lora.path_names(p)) else x
         for k, (p, x) in zip(keys, leaves)]
  return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(params), new)


@pytest.mark.parametrize("targets, alpha", [(("q", "v"), None), (("k", "proj", "fc2"), 6.0)])
def test_nonzero_b_equals_the_dense_update(targets, alpha):
  rank = 2
  base, adapted, params = _models(targets=targets, alpha=alpha)
  params = _randomise_adapters(params)
  scale = (alpha or rank) / rank
  dense = jax.tree_util.tree_map(np.array, _without_lora(params["backbone"]))
  where = {"q": ("attn", "qkv", 0), "k": ("attn", "qkv", 1), "v": ("attn", "qkv", 2),
           "proj": ("attn", "proj", None), "fc1": ("mlp", "fc1", None),
           "fc2": ("mlp", "fc2", None)}
  for i in range(2):
    block = params["backbone"][f"blocks_{i}"]
    for t in targets:
      module, layer, third = where[t]
      a = np.asarray(block[module][f"lora_{t}"]["lora_a"], np.float64)
      b = np.asarray(block[module][f"lora_{t}"]["lora_b"], np.float64)
      kernel = dense[f"blocks_{i}"][module][layer]["kernel"]
      cols = slice(None) if third is None else slice(16 * third, 16 * (third + 1))
      # Flax (in, out) layout: W_eff = W + (α/r)·A B, i.e. W + (α/r)·B A in torch's.
      kernel[:, cols] = kernel[:, cols] + scale * (a @ b)
  x = _images()
  out = adapted.features(params["backbone"], {}, x, train=False)[0]
  ref = base.features(dense, {}, x, train=False)[0]
  np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)
  assert float(jnp.abs(out - base.features(_without_lora(params["backbone"]), {}, x,
                                           train=False)[0]).max()) > 1e-2


def test_trainable_marks_adapters_heads_and_optionally_norms():
  _, adapted, params = _models()
  mask = adapted.trainable(params)
  bb = mask["backbone"]
  assert bb["blocks_0"]["attn"]["lora_q"]["lora_a"] and bb["blocks_0"]["attn"]["lora_v"]["lora_b"]
  assert not bb["blocks_0"]["attn"]["qkv"]["kernel"] and not bb["patch_embed"]["proj"]["kernel"]
  assert not bb["norm"]["scale"] and not bb["cls_token"]
  assert all(jax.tree_util.tree_leaves(mask["downstream_head"]))
  _, with_norms, p2 = _models(train_norms=True)
  m2 = with_norms.trainable(p2)["backbone"]
  assert m2["norm"]["scale"] and m2["blocks_1"]["norm2"]["bias"]
  assert not m2["blocks_1"]["mlp"]["fc1"]["kernel"]
  base, _, _ = _models()
  bp, _ = jax.jit(base.init, static_argnums=1)(jax.random.key(0), 8)
  full = base.trainable(bp)["backbone"]  # no LoRA: everything but the fixed table trains
  assert full["blocks_0"]["attn"]["qkv"]["kernel"] and not full["pos_embed"]


def test_frozen_leaves_never_change_and_have_no_optimizer_state():
  _, adapted, params = _models()
  mask = adapted.trainable(params)
  adamw = optax.adamw(1e-2, weight_decay=0.1)
  tx = partition.level_optimizer({g: adamw for g in params}, params, mask)
  state = tx.init(params)
  x = _images()
  labels = jnp.array([0, 1, 2])

  def loss(p):
    feats, _ = adapted.features(p["backbone"], {}, x, train=True)
    logits = _head(adapted).head_outputs(p["downstream_head"], feats)
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

  p = params
  for _ in range(3):
    updates, state = tx.update(jax.grad(loss)(p), state, p)
    p = optax.apply_updates(p, updates)
  flat_mask = jax.tree_util.tree_leaves(mask)
  for before, after, m in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(p),
                              flat_mask):
    if m:
      continue
    np.testing.assert_array_equal(np.asarray(before), np.asarray(after))
  lora_b = p["backbone"]["blocks_0"]["attn"]["lora_q"]["lora_b"]
  assert float(jnp.abs(lora_b).max()) > 0  # the adapters did train
  # Adam's first and second moments exist for the trainable leaves only.
  n_train = sum(int(np.prod(x.shape)) for x, m in
                zip(jax.tree_util.tree_leaves(params), flat_mask) if m)
  moments = [leaf for leaf in jax.tree_util.tree_leaves(state)
             if hasattr(leaf, "shape") and leaf.ndim > 0]
  assert sum(int(np.prod(x.shape)) for x in moments) == 2 * n_train


def test_partition_and_combine_round_trip():
  _, adapted, params = _models()
  mask = adapted.trainable(params)
  train, frozen = partition.split(params, mask)
  n = lambda t: len(jax.tree_util.tree_leaves(t))
  assert n(train) + n(frozen) == n(params) and n(train) == sum(jax.tree_util.tree_leaves(mask))
  back = partition.merge(train, frozen)
  assert jax.tree_util.tree_structure(back) == jax.tree_util.tree_structure(params)
  for a, b in zip(jax.tree_util.tree_leaves(back), jax.tree_util.tree_leaves(params)):
    assert a is b
  full = partition.fill_frozen(train, params)
  for x, m in zip(jax.tree_util.tree_leaves(full), jax.tree_util.tree_leaves(mask)):
    assert m or float(jnp.abs(x).max()) == 0.0
  with pytest.raises(ValueError, match="structure"):
    partition.split(params, mask["backbone"])


def test_mfac_block_rules():
  _, adapted, params = _models()
  train, _ = partition.split(params, lora.lora_mask(params))
  layer = set(jax.tree_util.tree_leaves(lora.mfac_block_labels(train, "layer")))
  assert layer == {"backbone/blocks_0", "backbone/blocks_1"}
  block = set(jax.tree_util.tree_leaves(lora.mfac_block_labels(train, "block")))
  assert block == {f"backbone/blocks_{i}/attn/lora_{t}" for i in (0, 1) for t in "qv"}
  per_leaf = jax.tree_util.tree_leaves(lora.mfac_block_labels(train, "per_leaf"))
  assert len(set(per_leaf)) == len(per_leaf) == 8
  assert lora.mfac_block_key(("backbone", "norm", "scale"), "layer") == "backbone/norm"
  with pytest.raises(ValueError, match="grouping"):
    lora.mfac_block_key(("backbone",), "blocks")


def test_bad_lora_configs_name_the_fix():
  with pytest.raises(ValueError, match="rank"):
    lora.LoRAConfig(0)
  with pytest.raises(ValueError, match="targets"):
    lora.LoRAConfig(4, targets=("q", "out"))
