"""bfloat16 ResNets: bfloat16 convolutions, float32 parameters, statistics and losses.

The references are the same networks computing in float32 from the same parameters.
The tolerances are measured: at this tiny size (width 8, 8 px, 8 images, so the last
stage's BatchNorm normalises 8 values per channel) bfloat16's 8-bit significand gives
a forward error of 4 % and SimCLR gradient and Hessian-vector product cosines of 0.93
and 0.90 with float32's; float16 (three more significand bits) cuts each error by 3-8x,
which is what rounding, not a wrong computation, does.
"""
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from bissl_jax.core import alternation as ts
from bissl_jax.models import resnet
from bissl_jax.tasks import augment, pretext

from tests.core import test_train_state as tt

IMG = 8


def _models():
  kw = dict(width_multiplier=0.125, cifar_stem=True, projector="16-16-8")
  return (resnet.build_model("resnet18", **kw),
          resnet.build_model("resnet18", dtype="bfloat16", **kw))


@pytest.fixture(scope="module")
def pair():
  f32, bf16 = _models()
  params, stats = f32.init(jax.random.PRNGKey(0), IMG)
  images = np.random.default_rng(0).integers(0, 256, (8, IMG, IMG, 3), dtype=np.uint8)
  views = augment.pretext_views(jax.random.PRNGKey(1), images, size=IMG)
  return f32, bf16, params, stats, views


def _rel(a, b):
  return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


def _cos(a, b):
  return float(jnp.vdot(a, b) / (jnp.linalg.norm(a) * jnp.linalg.norm(b)))


def test_parameters_and_statistics_stay_float32(pair):
  f32, bf16, params, stats, views = pair
  own_params, own_stats = bf16.init(jax.random.PRNGKey(0), IMG)
  for leaf in jax.tree_util.tree_leaves((own_params, own_stats)):
    assert leaf.dtype == jnp.float32
  # The same initial values: the compute dtype does not touch the initialisation.
  jax.tree_util.tree_map(np.testing.assert_array_equal, own_params, params)
  out, new_stats = bf16.features(params["backbone"], stats["backbone"], views[0], train=True)
  assert out.dtype == jnp.float32
  for leaf in jax.tree_util.tree_leaves(new_stats):
    assert leaf.dtype == jnp.float32


def test_bfloat16_forward_matches_float32(pair):
  f32, bf16, params, stats, views = pair
  ref, ref_stats = f32.features(params["backbone"], stats["backbone"], views[0], train=True)
  got, got_stats = bf16.features(params["backbone"], stats["backbone"], views[0], train=True)
  assert 1e-4 < _rel(got, ref) < 6e-2  # lower bound: bfloat16 really computed
  for a, b in zip(jax.tree_util.tree_leaves(got_stats), jax.tree_util.tree_leaves(ref_stats)):
    np.testing.assert_allclose(a, b, rtol=5e-2, atol=5e-3)


def _pretext_grad_and_hvp(model, params, stats, views, direction):
  task = pretext.SimCLR(model)
  flat, unravel = ravel_pytree(params["backbone"])

  def loss(theta):
    return task.loss({"backbone": unravel(theta), "pretext_head": params["pretext_head"]},
                     stats, views)[0]

  value, grad = jax.value_and_grad(loss)(flat)
  hvp = jax.jvp(jax.grad(loss), (flat,), (direction,))[1]
  return value, grad, hvp


def test_bfloat16_gradient_and_hvp_match_float32(pair):
  f32, bf16, params, stats, views = pair
  f16 = dataclasses.replace(bf16, backbone=bf16.backbone.clone(dtype=jnp.float16))
  size = ravel_pytree(params["backbone"])[0].size
  direction = jax.random.normal(jax.random.PRNGKey(2), (size,))
  ref, got, finer = (jax.jit(functools.partial(_pretext_grad_and_hvp, m))(
      params, stats, views, direction) for m in (f32, bf16, f16))
  assert got[0].dtype == got[1].dtype == got[2].dtype == jnp.float32
  assert abs(float(got[0] - ref[0])) < 1e-2 * abs(float(ref[0]))
  assert _cos(got[1], ref[1]) > 0.9 and _rel(got[1], ref[1]) < 0.5
  assert _cos(got[2], ref[2]) > 0.85 and _rel(got[2], ref[2]) < 0.6
  # Rounding: three more significand bits shrink both errors at least twofold.
  assert _rel(finer[1], ref[1]) < 0.5 * _rel(got[1], ref[1])
  assert _rel(finer[2], ref[2]) < 0.5 * _rel(got[2], ref[2])


def test_one_bfloat16_alternation_stays_finite():
  # Two one-block stages keep the compile short; build_model's dtype is tested below.
  model = resnet.BisslModel(
      backbone=resnet.ResNet(stage_sizes=(1, 1), block="basic", width=4, cifar_stem=True,
                             dtype=jnp.bfloat16),
      projector=resnet.MLPHead((8, 8, 4)), predictor=None)
  setup = tt.make_setup(model=model, residual_every=1)  # every metric is computed
  state = tt.make_state(setup)
  new_state, metrics = jax.jit(functools.partial(ts.alternation, setup))(
      state, tt.make_batches(setup), jax.random.PRNGKey(0))
  for name, value in metrics.items():
    assert np.all(np.isfinite(np.asarray(value))), name
  moved = jax.tree_util.tree_map(lambda a, b: float(jnp.max(jnp.abs(a - b))),
                                 new_state.upper.params["backbone"], state.upper.params["backbone"])
  assert max(jax.tree_util.tree_leaves(moved)) > 0
  for leaf in jax.tree_util.tree_leaves(new_state):
    if jnp.issubdtype(leaf.dtype, jnp.floating):
      assert leaf.dtype == jnp.float32


def test_config_dtype_selects_a_bfloat16_resnet():
  from bissl_jax.config_validation import validate_config
  from bissl_jax.pipeline import context
  from configs import digits_simclr
  config = digits_simclr.get_config("runlocal")
  config.model.dtype = "bfloat16"
  validate_config(config, num_devices=1)  # accepted: a ResNet computes in it
  model = context.build_model(config)
  assert model.backbone.dtype == jnp.bfloat16
  boundary = digits_simclr.get_config("runlocal")
  boundary.model.dtype, boundary.model.backbone_ends_at = "bfloat16", "res4"
  assert context.build_model(boundary).tail.dtype == jnp.bfloat16
