"""M-FAC (BiSSLight) against dense NumPy solves and a NumPy Sherman–Morrison recursion."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bissl_jax.implicit.solvers import mfac
from bissl_jax.models import resnet

# A ResNet-like tree: a stem outside any layer, two blocks with two modules each.
SHAPES = {
    "conv1": {"kernel": (2, 3)},
    "bn1": {"scale": (3,), "bias": (3,)},
    "layer1_0": {"conv1": {"kernel": (3, 2)}, "bn1": {"scale": (2,)}},
    "layer1_1": {"conv1": {"kernel": (2, 2)}},
}
LAM = 0.05


def make_tree(rng, shapes=SHAPES, lead=()):
  return jax.tree_util.tree_map(
      lambda s: jnp.asarray(rng.normal(size=lead + s), jnp.float32), shapes,
      is_leaf=lambda x: isinstance(x, tuple))


def leaves64(tree):
  return [np.asarray(x, np.float64) for x in jax.tree_util.tree_leaves(tree)]


def dense_block_solve(grads, v, groups, lam):
  """Per block: ``numpy.linalg.solve(I + GᵀG/(mλ), v_b)``; ``groups`` lists leaf indices."""
  g_leaves, v_leaves = leaves64(grads), leaves64(v)
  m = g_leaves[0].shape[0]
  out = [None] * len(v_leaves)
  for group in groups:
    g = np.concatenate([g_leaves[i].reshape(m, -1) for i in group], axis=1)
    vb = np.concatenate([v_leaves[i].reshape(-1) for i in group])
    xb = np.linalg.solve(np.eye(len(vb)) + g.T @ g / (m * lam), vb)
    offset = 0
    for i in group:
      size = v_leaves[i].size
      out[i] = xb[offset:offset + size].reshape(v_leaves[i].shape)
      offset += size
  return out


def sherman_morrison_block(g, vb, lam):
  """BiSSLight's recursion, in NumPy: ``λ·(λI + F)⁻¹ v`` built one gradient at a time.

  With H_0⁻¹ = I/λ and H_i = H_{i−1} + g_i g_iᵀ/m, every step is a rank-one
  Sherman–Morrison update with denominator ``m + g_iᵀ H_{i−1}⁻¹ g_i``; the inverse is
  kept as the list of vectors ``H_{i−1}⁻¹ g_i`` and their denominators.
  """
  m = g.shape[0]
  hg, denom = [], []
  for i in range(m):
    u = g[i] / lam
    for k in range(i):
      u = u - (hg[k] @ g[i]) / denom[k] * hg[k]
    hg.append(u)
    denom.append(m + g[i] @ u)
  x = vb / lam
  for k in range(m):
    x = x - (hg[k] @ vb) / denom[k] * hg[k]
  return lam * x


GROUPS = {   # leaf order of SHAPES: bn1/bias, bn1/scale, conv1/kernel, l10/bn1, l10/conv1, l11
    "per_leaf": [[0], [1], [2], [3], [4], [5]],
    "per_module": [[0, 1], [2], [3], [4], [5]],   # a LoRA adapter's A and B together
    "per_layer": [[0, 1], [2], [3, 4], [5]],
    "global": [[0, 1, 2, 3, 4, 5]],
}


@pytest.mark.parametrize("rule", sorted(GROUPS))
def test_mfac_matches_dense_solve_per_block(rule):
  rng = np.random.default_rng(0)
  m = 4
  grads, v = make_tree(rng, lead=(m,)), make_tree(rng)
  x, info = mfac.mfac_solve(grads, v, LAM, blocks=rule)
  expected = dense_block_solve(grads, v, GROUPS[rule], LAM)
  for got, want in zip(leaves64(x), expected):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
  assert float(info.residual) < 1e-4 and int(info.iterations) == 0
  assert float(info.min_curvature) >= 1.0 - 1e-5 and not bool(info.nonfinite)
  # ...and it is not the identity (so the checks above can fail).
  assert max(np.abs(g - w).max() for g, w in zip(leaves64(x), leaves64(v))) > 0.1


def test_mfac_matches_sherman_morrison_recursion():
  rng = np.random.default_rng(1)
  m = 5
  grads, v = make_tree(rng, lead=(m,)), make_tree(rng)
  x, _ = mfac.mfac_solve(grads, v, LAM, blocks="per_layer")
  g_leaves, v_leaves = leaves64(grads), leaves64(v)
  for group in GROUPS["per_layer"]:
    g = np.concatenate([g_leaves[i].reshape(m, -1) for i in group], axis=1)
    vb = np.concatenate([v_leaves[i].reshape(-1) for i in group])
    got = np.concatenate([leaves64(x)[i].reshape(-1) for i in group])
    np.testing.assert_allclose(got, sherman_morrison_block(g, vb, LAM), rtol=1e-4, atol=1e-5)


def test_block_rules_on_resnet_and_vit_trees():
  ids, n = mfac.block_assignment(make_tree(np.random.default_rng(2)), "per_layer")
  assert (ids, n) == ([0, 0, 1, 2, 2, 3], 4)
  assert mfac.block_assignment(make_tree(np.random.default_rng(2)), "global") == ([0] * 6, 1)
  # A real ResNet-18 tree: one block per residual block, the stem split by module.
  model = resnet.build_model("resnet18", width_multiplier=0.125)
  params, _ = jax.eval_shape(functools.partial(model.init, image_size=16),
                             jax.random.PRNGKey(0))
  paths = mfac.leaf_paths(params["backbone"])
  blocks = {mfac.per_layer_block(p) for p in paths}
  assert {("layer1_0",), ("layer4_1",), ("conv1",), ("bn1",)} <= blocks
  assert len(blocks) == 8 + 2
  # A ViT-like tree with LoRA leaves: all of one attention block together.
  vit = {"patch_embed": {"kernel": 0},
         "blocks_3": {"attn": {"q": {"lora_a": 0, "lora_b": 0}, "v": {"lora_a": 0}},
                      "mlp": {"fc1": {"kernel": 0}}},
         "blocks_10": {"attn": {"q": {"lora_a": 0}}}}
  assert {mfac.per_layer_block(p) for p in mfac.leaf_paths(vit)} == {
      ("blocks_3",), ("blocks_10",), ("patch_embed",)}
  # A callable rule and a mask; None excludes a leaf.
  rule = lambda path: None if path[0] == "conv1" else path[0]
  ids, n = mfac.block_assignment(make_tree(np.random.default_rng(2)), rule)
  assert ids[2] is None and n == 3
  with pytest.raises(ValueError, match="block rule"):
    mfac.block_assignment(vit, "per_row")


def test_masked_leaves_are_excluded():
  rng = np.random.default_rng(3)
  m = 3
  grads, v = make_tree(rng, lead=(m,)), make_tree(rng)
  mask = jax.tree_util.tree_map(lambda _: True, v)
  mask["layer1_0"] = {"conv1": {"kernel": False}, "bn1": {"scale": False}}
  x, _ = mfac.mfac_solve(grads, v, LAM, blocks="global", mask=mask)
  np.testing.assert_array_equal(np.asarray(x["layer1_0"]["conv1"]["kernel"]),
                                np.asarray(v["layer1_0"]["conv1"]["kernel"]))
  groups = [[0, 1, 2, 5]]   # global over the kept leaves only
  expected = dense_block_solve(grads, v, groups, LAM)
  for i in groups[0]:
    np.testing.assert_allclose(leaves64(x)[i], expected[i], rtol=1e-4, atol=1e-5)


def test_jit_and_vmap_compose():
  rng = np.random.default_rng(4)
  m = 4
  grads = make_tree(rng, lead=(m,))
  vs = make_tree(rng, lead=(3,))
  fn = lambda v, lam: mfac.mfac_solve(grads, v, lam, blocks="per_layer")[0]
  batched = jax.jit(jax.vmap(fn, in_axes=(0, None)))(vs, LAM)
  for i in range(3):
    row = fn(jax.tree_util.tree_map(lambda a: a[i], vs), LAM)
    for got, want in zip(leaves64(batched), leaves64(row)):
      np.testing.assert_allclose(got[i], want, rtol=1e-5, atol=1e-6)


def test_window_rolls_and_counts_valid_rows():
  rng = np.random.default_rng(5)
  v = make_tree(rng)
  pushed = [make_tree(rng) for _ in range(5)]
  window = mfac.init(v, 3)
  assert int(mfac.num_valid(window)) == 0
  x0, _ = mfac.solve(window, v, LAM)                  # no gradients yet: x = v
  for got, want in zip(leaves64(x0), leaves64(v)):
    np.testing.assert_array_equal(got, want)
  push = jax.jit(mfac.push)
  stack = lambda trees: jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *trees)
  for t, g in enumerate(pushed):
    window = push(window, g)
    n = min(t + 1, 3)
    assert int(mfac.num_valid(window)) == n and int(window.count) == t + 1
    stored, valid = mfac.ordered(window)
    assert np.asarray(valid).sum() == n
    expected_rows = stack(pushed[max(0, t + 1 - 3):t + 1])   # the last n, oldest first
    for got, want in zip(leaves64(stored), leaves64(expected_rows)):
      np.testing.assert_array_equal(got[:n], want)
    # Before the window is full, only the valid rows count (F over n gradients).
    x, _ = jax.jit(mfac.solve, static_argnames="blocks")(window, v, LAM, blocks="per_leaf")
    x_ref, _ = mfac.mfac_solve(expected_rows, v, LAM, blocks="per_leaf")
    for got, want in zip(leaves64(x), leaves64(x_ref)):
      np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_window_bfloat16_storage_is_close_to_float32_and_half_the_memory():
  rng = np.random.default_rng(6)
  v = make_tree(rng)
  w32, w16 = mfac.init(v, 4), mfac.init(v, 4, dtype="bfloat16")
  for _ in range(4):
    g = make_tree(rng)
    w32, w16 = mfac.push(w32, g), mfac.push(w16, g)
  assert jax.tree_util.tree_leaves(w16.grads)[0].dtype == jnp.bfloat16
  x32, _ = mfac.solve(w32, v, LAM, "global")
  x16, _ = mfac.solve(w16, v, LAM, "global")
  a, b = np.concatenate([x.ravel() for x in leaves64(x32)]), np.concatenate(
      [x.ravel() for x in leaves64(x16)])
  assert np.linalg.norm(a - b) / np.linalg.norm(a) < 2e-2
  size = sum(x.size for x in leaves64(v))
  assert mfac.window_bytes(w32) == 4 * size * 4 + 4        # + the int32 count
  assert mfac.window_bytes(v, 4, "bfloat16") == 4 * size * 2 + 4
  with pytest.raises(ValueError, match="dtype"):
    mfac.init(v, 4, dtype="float16")


def test_window_mask_stores_nothing_for_frozen_leaves():
  rng = np.random.default_rng(7)
  v = make_tree(rng)
  mask = jax.tree_util.tree_map(lambda _: True, v)
  mask["conv1"]["kernel"] = False
  window = mfac.init(v, 2, mask=mask)
  assert window.grads["conv1"]["kernel"].shape == (2, 0)
  g1, g2 = make_tree(rng), make_tree(rng)
  window = mfac.push(mfac.push(window, g1), g2)
  x, info = mfac.solve(window, v, LAM, "global")
  np.testing.assert_array_equal(np.asarray(x["conv1"]["kernel"]), np.asarray(v["conv1"]["kernel"]))
  stacked = jax.tree_util.tree_map(lambda a, b: jnp.stack([a, b]), g1, g2)
  x_ref, _ = mfac.mfac_solve(stacked, v, LAM, blocks="global", mask=mask)
  for got, want in zip(leaves64(x), leaves64(x_ref)):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  assert float(info.residual) < 1e-4
  size = sum(x.size for x in leaves64(v)) - 6
  assert mfac.window_bytes(window) == 2 * size * 4 + 4
