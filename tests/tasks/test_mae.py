"""MAE pretext task: masking, the loss against NumPy, and the implicit gradient on LoRA leaves."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bissl_jax import implicit
from bissl_jax.models import lora
from bissl_jax.tasks.pretext import mae
from bissl_jax.core import protocols
from bissl_jax.core import partition
from bissl_jax.models.vit_bundle import build_vit_model


@functools.lru_cache(maxsize=None)
def _setup(lora_rank=0, image_size=8, patch=4, drop_path_rate=0.0):
  model = build_vit_model(f"vit_test_patch{patch}", decoder_width=8,
                          decoder_depth=1, decoder_heads=2, lora_rank=lora_rank,
                          drop_path_rate=drop_path_rate)
  params, stats = jax.jit(model.init, static_argnums=1)(jax.random.key(0), image_size)
  task = mae.MAE(model, image_size=image_size)
  images = jax.random.randint(jax.random.key(1), (3, image_size + 2, image_size + 2, 3), 0,
                              256).astype(jnp.uint8)
  inputs = jax.jit(task.prepare)(jax.random.key(2), images)
  return model, params, stats, task, inputs


@pytest.mark.parametrize("n, ratio", [(4, 0.75), (16, 0.75), (196, 0.75), (10, 0.33)])
def test_masking_keeps_exactly_the_configured_fraction(n, ratio):
  noise = jax.random.uniform(jax.random.key(n), (5, n))
  ids_keep, ids_restore, mask = mae.masking_from_noise(noise, ratio)
  masked = int(round(ratio * n))
  np.testing.assert_array_equal(np.asarray(mask.sum(axis=1)), masked)
  assert ids_keep.shape == (5, n - masked)
  # The kept patches are the visible ones, and they are the lowest-noise ones.
  np.testing.assert_array_equal(np.take_along_axis(np.asarray(mask), np.asarray(ids_keep), 1), 0)
  np.testing.assert_array_equal(np.sort(np.asarray(ids_keep), 1),
                                np.sort(np.argsort(np.asarray(noise), 1)[:, :n - masked], 1))
  assert len({tuple(r) for r in np.asarray(ids_keep)}) > 1  # per-sample, not shared
  # ids_restore inverts the shuffle.
  shuffle = np.argsort(np.asarray(noise), 1)
  np.testing.assert_array_equal(np.take_along_axis(shuffle, np.asarray(ids_restore), 1),
                                np.tile(np.arange(n), (5, 1)))


def test_bad_mask_ratio_is_rejected():
  with pytest.raises(ValueError, match="at least one visible"):
    mae.num_masked(4, 0.99)
  model, *_ = _setup()
  with pytest.raises(ValueError, match="mask_ratio"):
    mae.MAE(model, mask_ratio=1.0)
  with pytest.raises(ValueError, match="decoder"):
    mae.MAE(build_vit_model("vit_test_patch4", decoder=None))


def _numpy_loss(images, pred, mask, p, norm_pix):
  """MAE's forward_loss, transcribed for NCHW inputs."""
  imgs = np.transpose(np.asarray(images, np.float64), (0, 3, 1, 2))
  n, c, hh, _ = imgs.shape
  h = hh // p
  x = imgs.reshape(n, c, h, p, h, p).transpose(0, 2, 4, 3, 5, 1).reshape(n, h * h, p * p * c)
  if norm_pix:
    x = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, ddof=1, keepdims=True) + 1e-6)
  per_patch = ((np.asarray(pred, np.float64) - x) ** 2).mean(-1)
  mask = np.asarray(mask, np.float64)
  return (per_patch * mask).sum() / mask.sum()


@pytest.mark.parametrize("norm_pix", [True, False])
def test_loss_equals_numpy_on_masked_patches_only(norm_pix):
  model, params, stats, task, inputs = _setup()
  task = mae.MAE(model, image_size=8, norm_pix_loss=norm_pix)
  loss, aux = task.loss(params, stats, inputs)
  assert set(aux["metrics"]) == {"loss"}
  assert aux["batch_stats"] == {"backbone": {}, "pretext_head": {}}
  ids_keep, ids_restore, mask = mae.masking_from_noise(inputs["noise"], 0.75)
  latent = model.encode(params["backbone"], inputs["images"], keep_ids=ids_keep)
  pred = model.decode(params["pretext_head"]["decoder"], latent, ids_restore)
  np.testing.assert_allclose(loss, _numpy_loss(inputs["images"], pred, mask, 4, norm_pix),
                             rtol=1e-5)
  # d loss / d pred vanishes on the visible patches.
  g = jax.grad(lambda q: mae.reconstruction_loss(inputs["images"], q, mask, 4, norm_pix))(pred)
  visible = np.asarray(mask) == 0
  assert float(np.abs(np.asarray(g)[visible]).max()) == 0.0
  assert float(np.abs(np.asarray(g)[~visible]).min()) > 0.0


def test_encoder_sees_the_visible_patches_only():
  model, params, _, _, inputs = _setup()
  ids_keep, _, mask = mae.masking_from_noise(inputs["noise"], 0.75)
  images = np.array(inputs["images"])
  # Overwrite every masked 4x4 patch with noise: the latent must not move.
  changed = images.copy()
  rng = np.random.default_rng(0)
  for b in range(images.shape[0]):
    for patch in np.flatnonzero(np.asarray(mask[b])):
      r, c = divmod(int(patch), 2)
      changed[b, 4 * r:4 * r + 4, 4 * c:4 * c + 4] = rng.normal(size=(4, 4, 3))
  enc = lambda x: model.encode(params["backbone"], jnp.asarray(x), keep_ids=ids_keep)
  assert enc(images).shape == (3, 2, 16)  # class token + 1 visible patch of 4
  np.testing.assert_array_equal(np.asarray(enc(images)), np.asarray(enc(changed)))


def test_prepare_puts_all_randomness_in_the_inputs():
  model, params, stats, task, inputs = _setup(drop_path_rate=0.2)
  assert isinstance(task, protocols.PretextTask) and not task.has_target
  assert inputs["images"].shape == (3, 8, 8, 3) and inputs["noise"].shape == (3, 4)
  assert inputs["drop_noise"].shape == (3, 2, 2)
  images = jnp.zeros((3, 10, 10, 3), jnp.uint8) + 7
  again = task.prepare(jax.random.key(2), images)
  other = task.prepare(jax.random.key(3), images)
  np.testing.assert_array_equal(task.prepare(jax.random.key(2), images)["noise"], again["noise"])
  assert float(jnp.abs(again["noise"] - other["noise"]).max()) > 0
  _, _, _, _, no_drop = _setup()
  assert no_drop["drop_noise"] is None


def _lora_problem():
  model, params, stats, task, inputs = _setup(lora_rank=1)
  # Make B nonzero so the Hessian is generic.
  rng = np.random.default_rng(0)
  params = jax.tree_util.tree_map_with_path(
      lambda p, x: x + 0.3 * rng.normal(size=x.shape).astype(np.float32)
      if lora.is_lora_path(lora.path_names(p)) else x, params)
  mask = lora.lora_mask(params)
  train, frozen = partition.split(params, mask)
  loss = lambda t: task.loss(partition.merge(t, frozen), stats, inputs)[0]
  return params, mask, train, frozen, loss


def test_implicit_gradient_on_lora_leaves_matches_a_dense_solve():
  params, mask, train, frozen, loss = _lora_problem()
  flat, unravel = jax.flatten_util.ravel_pytree(train)
  assert flat.size == 2 * 2 * (16 + 16)  # 2 blocks × (q, v) × rank-1 (A, B)
  hess = np.asarray(jax.jit(jax.hessian(lambda f: loss(unravel(f))))(flat), np.float64)
  hess = 0.5 * (hess + hess.T)
  eig = np.linalg.eigvalsh(hess)
  lam = 2.0 * float(np.abs(eig).max())  # I + H/λ is then positive definite
  v = jax.random.normal(jax.random.key(9), flat.shape)
  dense = np.linalg.solve(np.eye(flat.size) + hess / lam, np.asarray(v, np.float64))
  solve = jax.jit(lambda t, b: implicit.implicit_grad(loss, t, b, lam=lam, solver="cg",
                                                      maxiter=24, unroll=False)[0])
  x = solve(train, unravel(v))
  np.testing.assert_allclose(jax.flatten_util.ravel_pytree(x)[0], dense, rtol=2e-4,
                             atol=2e-5)
  assert float(np.abs(dense - np.asarray(v)).max()) > 1e-2  # H really matters

  # Solving over the full tree with H and v masked to the LoRA leaves gives the same
  # LoRA block and exactly zero on every frozen leaf.
  full_loss = lambda p: loss(partition.split(p, mask)[0])

  @jax.jit
  def full_solve(p, b):
    h_full = implicit.hessian_operator(full_loss, p)
    masked_h = lambda t: partition.zeros_on_frozen(h_full(partition.zeros_on_frozen(t, mask)),
                                                   mask)
    return implicit.implicit_solve(masked_h, b, lam=lam, solver="cg", maxiter=24,
                                   unroll=False)[0]

  y = full_solve(params, partition.fill_frozen(unravel(v), params))
  for leaf, m in zip(jax.tree_util.tree_leaves(y), jax.tree_util.tree_leaves(mask)):
    if not m:
      assert float(jnp.abs(leaf).max()) == 0.0
  y_train, _ = partition.split(y, mask)
  np.testing.assert_allclose(jax.flatten_util.ravel_pytree(y_train)[0], dense, rtol=2e-4,
                             atol=2e-5)
