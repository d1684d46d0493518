"""ViT backbones: sizes against timm's published counts, position tables, drop-path, remat."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bissl_jax.core import protocols
from bissl_jax.core.params import init_params
from bissl_jax.tasks.downstream.classification import Classification
from bissl_jax.models import vit
from bissl_jax.models.vit_bundle import build_vit_model


def _count(tree):
  return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(tree))


@pytest.mark.parametrize("arch, expected", [
    ("vit_base_patch16", 86_567_656),    # timm vit_base_patch16_224, 1000-class head
    ("vit_large_patch16", 304_326_632),  # timm vit_large_patch16_224
])
def test_parameter_counts_equal_timm(arch, expected):
  model = build_vit_model(arch, decoder=None, posemb="learn")
  head = Classification(model, 224, num_classes=1000, head_init="trunc_normal")
  params, _ = jax.eval_shape(lambda k: init_params(model, head, k, 224), jax.random.key(0))
  assert params["pretext_head"] == {}
  assert _count(params["backbone"]) + _count(params["downstream_head"]) == expected


def test_mae_decoder_adds_the_official_decoder_size():
  # MAE ViT-B decoder (512 wide, 8 blocks, p=16), counted layer by layer from MAE's
  # models_mae.py: 26,109,184 incl. the fixed table and the mask token.
  model = build_vit_model("vit_base_patch16")
  params, _ = jax.eval_shape(lambda k: model.init(k, 224), jax.random.key(0))
  dec = params["pretext_head"]["decoder"]
  per_block = 2 * 1024 + 512 * 1536 + 1536 + 512 * 512 + 512 + 2 * (512 * 2048) + 2048 + 512
  expected = (768 * 512 + 512) + 512 + 197 * 512 + 8 * per_block + 1024 + (512 * 768 + 768)
  assert _count(dec) == expected == 26_109_184


def _mae_reference_table(dim, grid):
  """MAE's get_2d_sincos_pos_embed, transcribed (meshgrid with w first)."""
  def one_d(d, pos):
    omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
    out = np.einsum("m,d->md", pos.reshape(-1), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)
  g = np.meshgrid(np.arange(grid, dtype=np.float32), np.arange(grid, dtype=np.float32))
  g = np.stack(g, axis=0).reshape(2, 1, grid, grid)
  emb = np.concatenate([one_d(dim // 2, g[0]), one_d(dim // 2, g[1])], axis=1)
  return np.concatenate([np.zeros((1, dim)), emb], axis=0)


def test_sincos_table_matches_mae():
  np.testing.assert_allclose(vit.sincos_2d(32, 3), _mae_reference_table(32, 3), atol=1e-6)


@functools.lru_cache(maxsize=None)
def _tiny(**kwargs):
  model = build_vit_model("vit_test_patch4", decoder=None, **kwargs)
  head = Classification(model, 8, num_classes=3, head_init="trunc_normal")
  params, stats = jax.jit(lambda k: init_params(model, head, k, 8))(jax.random.key(0))
  x = jax.random.normal(jax.random.key(1), (3, 8, 8, 3))
  return model, params, stats, x


def test_tiny_model_follows_the_protocol():
  model, params, stats, x = _tiny()
  assert isinstance(model, protocols.Model)
  hash(model)
  assert set(params) == {"backbone", "pretext_head", "downstream_head"}
  assert stats == {"backbone": {}, "pretext_head": {}}
  names = set(params["backbone"]["blocks_0"])
  assert names == {"norm1", "attn", "norm2", "mlp"}
  assert set(params["backbone"]["blocks_0"]["attn"]) == {"qkv", "proj"}
  feats, new_stats = model.features(params["backbone"], stats["backbone"], x, train=False)
  assert feats.shape == (3, 16) and new_stats == {}
  assert params["downstream_head"]["dense"]["kernel"].shape == (16, 3)  # the task's head


def test_fixed_position_table_gets_no_gradient_and_is_frozen():
  model, params, stats, x = _tiny()
  w = jax.random.normal(jax.random.key(2), (3, 16))
  loss = lambda p: jnp.sum(model.features(p, {}, x, train=False)[0] * w)
  grads = jax.grad(loss)(params["backbone"])
  assert float(jnp.abs(grads["pos_embed"]).max()) == 0.0
  assert float(jnp.abs(grads["cls_token"]).max()) > 0.0
  mask = model.trainable(params)
  assert mask["backbone"]["pos_embed"] is False and mask["backbone"]["cls_token"] is True
  learned, lp, _, _ = _tiny(posemb="learn")
  assert learned.trainable(lp)["backbone"]["pos_embed"] is True


def test_drop_path_is_per_sample_and_scaled():
  x = jnp.ones((4, 3, 2))
  u = jnp.array([0.1, 0.95, 0.5, 0.8])
  out = vit.drop_path(x, u, rate=0.25)  # keep where u < 0.75, scale by 1/0.75
  np.testing.assert_allclose(out[:, 0, 0], [1 / 0.75, 0.0, 1 / 0.75, 0.0], rtol=1e-6)
  assert vit.drop_path(x, None, 0.25) is x


def test_drop_path_is_a_pure_function_of_its_key():
  model, params, _, x = _tiny(drop_path_rate=0.5)
  base, bp, _, _ = _tiny()
  f = lambda rng, train: model.features(params["backbone"], {}, x, train=train, rng=rng)[0]
  deterministic = f(None, True)
  # No key (or evaluation mode) = no drop-path: same as the rate-0 model.
  np.testing.assert_allclose(deterministic, base.features(params["backbone"], {}, x,
                                                          train=True)[0], atol=0)
  np.testing.assert_allclose(f(jax.random.key(5), False), deterministic, atol=0)
  a, b = f(jax.random.key(5), True), f(jax.random.key(5), True)
  np.testing.assert_array_equal(a, b)
  assert float(jnp.abs(a - deterministic).max()) > 1e-3
  assert float(jnp.abs(a - f(jax.random.key(6), True)).max()) > 1e-3


def test_remat_gives_the_same_values_and_gradients():
  model, params, _, x = _tiny()
  remat, _, _, _ = _tiny(remat=True)
  w = jax.random.normal(jax.random.key(2), (3, 16))
  def loss(m, p):  # a random projection (a squared LayerNorm output is nearly constant)
    return jnp.sum(m.features(p, {}, x, train=True)[0] * w)
  np.testing.assert_allclose(loss(remat, params["backbone"]), loss(model, params["backbone"]),
                             rtol=1e-6)
  g1 = jax.grad(functools.partial(loss, model))(params["backbone"])
  g2 = jax.grad(functools.partial(loss, remat))(params["backbone"])
  for a, b in zip(jax.tree_util.tree_leaves(g1), jax.tree_util.tree_leaves(g2)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_bfloat16_compute_keeps_float32_parameters():
  model, params, _, x = _tiny()
  bf16, bp, _, _ = _tiny(dtype="bfloat16")
  assert all(leaf.dtype == jnp.float32 for leaf in jax.tree_util.tree_leaves(bp))
  out = bf16.features(params["backbone"], {}, x, train=False)[0]
  ref = model.features(params["backbone"], {}, x, train=False)[0]
  assert out.dtype == jnp.float32
  np.testing.assert_allclose(out, ref, atol=0.1)
  assert float(jnp.abs(out - ref).max()) > 0  # really computed in bfloat16


def test_bad_inputs_name_the_fix():
  model, params, _, _ = _tiny()
  with pytest.raises(ValueError, match="multiple of the patch size"):
    model.features(params["backbone"], {}, jnp.zeros((1, 10, 10, 3)), train=False)
  with pytest.raises(ValueError, match="vit_base_patch16"):
    vit.parse_arch("vit_giant16")
  with pytest.raises(ValueError, match="pool"):
    build_vit_model("vit_test_patch4", pool="max")


def test_mean_pool_averages_the_patch_tokens():
  model, params, _, x = _tiny(pool="mean")
  tokens = model.encode(params["backbone"], x)
  np.testing.assert_allclose(model.features(params["backbone"], {}, x, train=False)[0],
                             tokens[:, 1:].mean(axis=1), rtol=1e-6)
