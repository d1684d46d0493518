"""Pretext losses: NT-Xent against NumPy, BYOL closed forms, EMA, and twice-differentiability."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bissl_jax.models import resnet
from bissl_jax.tasks import pretext
from config_helpers import REPO_ROOT


def _numpy_nt_xent(z1, z2, tau):
  """Straightforward loop over anchors (SimCLR's definition)."""
  z = np.concatenate([z1, z2]).astype(np.float64)
  z /= np.linalg.norm(z, axis=1, keepdims=True)
  n, b = len(z), len(z1)
  losses = []
  for i in range(n):
    pos = (i + b) % n
    sims = np.array([z[i] @ z[k] / tau for k in range(n) if k != i])
    losses.append(-(z[i] @ z[pos] / tau) + np.log(np.sum(np.exp(sims))))
  return np.mean(losses)


@pytest.mark.parametrize("tau", [0.5, 0.1])
def test_nt_xent_matches_numpy(tau):
  rng = np.random.default_rng(0)
  z1, z2 = rng.standard_normal((2, 6, 5)).astype(np.float32) * 3
  got = pretext.nt_xent(jnp.asarray(z1), jnp.asarray(z2), tau)
  np.testing.assert_allclose(got, _numpy_nt_xent(z1, z2, tau), rtol=1e-5)


def test_nt_xent_identical_views_beat_random():
  rng = np.random.default_rng(1)
  z1 = rng.standard_normal((16, 32)).astype(np.float32)
  z2 = rng.standard_normal((16, 32)).astype(np.float32)
  same = pretext.nt_xent(z1, 2.0 * z1)  # same direction, different norm
  rand = pretext.nt_xent(z1, z2)
  assert same < rand - 0.5
  # Lower bound with perfectly aligned positives: log(2B−2 others·e^{s/τ} + ...) > 0.
  assert same > 0


def test_byol_regression_loss_closed_forms():
  rng = np.random.default_rng(2)
  p = rng.standard_normal((5, 7)).astype(np.float32)
  z = rng.standard_normal((5, 7)).astype(np.float32)
  np.testing.assert_allclose(pretext.byol_regression_loss(p, 3.0 * p), 0.0, atol=1e-6)
  np.testing.assert_allclose(pretext.byol_regression_loss(p, -p), 4.0, atol=1e-6)
  cos = np.sum(p * z, 1) / np.linalg.norm(p, axis=1) / np.linalg.norm(z, axis=1)
  np.testing.assert_allclose(pretext.byol_regression_loss(p, z), np.mean(2 - 2 * cos), rtol=1e-5)
  # No gradient reaches the target argument.
  g = jax.grad(pretext.byol_regression_loss, argnums=1)(jnp.asarray(p), jnp.asarray(z))
  assert float(jnp.abs(g).max()) == 0.0


def test_ema_update_closed_form():
  rng = np.random.default_rng(3)
  target = {"a": rng.standard_normal((3,)).astype(np.float32), "b": np.ones((2, 2), np.float32)}
  online = {"a": rng.standard_normal((3,)).astype(np.float32), "b": np.zeros((2, 2), np.float32)}
  t = jax.tree_util.tree_map(jnp.asarray, target)
  for _ in range(5):
    t = pretext.ema_update(t, online, 0.9)
  # Fixed online: t_n = d^n t_0 + (1 − d^n) online.
  for k in target:
    np.testing.assert_allclose(t[k], 0.9**5 * target[k] + (1 - 0.9**5) * online[k], rtol=1e-5)


# ----------------------------------------------------------------------------- tasks on a tiny net

def _tiny_model(predictor):
  return resnet.BisslModel(
      backbone=resnet.ResNet(stage_sizes=(1,), block="basic", width=4, cifar_stem=True),
      projector=resnet.MLPHead((8, 6)),
      predictor=resnet.MLPHead((8, 6)) if predictor else None)


def _views(seed=0, batch=4, size=6):
  k1, k2 = jax.random.split(jax.random.key(seed))
  return (jax.random.normal(k1, (batch, size, size, 3)),
          jax.random.normal(k2, (batch, size, size, 3)))


def test_simclr_loss_structure_and_reference():
  model = _tiny_model(predictor=False)
  task = pretext.make_pretext_task("SimCLR", model, temperature=0.5)
  assert not task.has_target
  params, stats = model.init(jax.random.key(0), image_size=6)
  views = _views()
  loss, aux = jax.jit(task.loss)(params, stats, views)  # 'downstream_head' is ignored
  # Reference: the same networks called directly, then the NumPy NT-Xent.
  x = jnp.concatenate(views)
  h, _ = model.features(params["backbone"], stats["backbone"], x, train=True)
  z, _ = model.project(params["pretext_head"]["projector"], stats["pretext_head"]["projector"],
                       h, train=True)
  np.testing.assert_allclose(loss, _numpy_nt_xent(np.asarray(z[:4]), np.asarray(z[4:]), 0.5),
                             rtol=1e-4)
  assert jax.tree_util.tree_structure(aux["batch_stats"]) == jax.tree_util.tree_structure(stats)
  np.testing.assert_allclose(aux["metrics"]["loss"], loss)
  # One BN statistic over both views: the updated running mean of the stem BN
  # moves by 0.1·(mean over all 2B examples).
  h0 = jax.lax.conv_general_dilated(x, params["backbone"]["conv1"]["kernel"], (1, 1),
                                    ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC"))
  np.testing.assert_allclose(aux["batch_stats"]["backbone"]["bn1"]["mean"],
                             0.1 * np.asarray(h0).mean(axis=(0, 1, 2)), rtol=1e-4, atol=1e-6)


def test_simclr_loss_is_twice_differentiable():
  """Forward-over-reverse HVP matches a central difference of the gradient (float64)."""
  with jax.enable_x64(True):
    f64 = lambda tree: jax.tree_util.tree_map(lambda x: jnp.asarray(x, jnp.float64), tree)
    model = resnet.BisslModel(
        backbone=resnet.ResNet(stage_sizes=(1,), block="basic", width=4, cifar_stem=True,
                               dtype=jnp.float64),
        projector=resnet.MLPHead((8, 6)), predictor=None)
    task = pretext.SimCLR(model)
    params, stats = f64(model.init(jax.random.key(1), image_size=6))
    views = f64(_views(1))
    head = {"pretext_head": params["pretext_head"]}
    grad = jax.jit(jax.grad(lambda t: task.loss({"backbone": t, **head}, stats, views)[0]))
    theta = params["backbone"]
    v = jax.tree_util.tree_map(lambda x: jax.random.normal(jax.random.key(7), x.shape, x.dtype),
                               theta)
    hvp = jax.jit(lambda t, v: jax.jvp(grad, (t,), (v,))[1])(theta, v)
    eps = 1e-5
    shift = lambda s: jax.tree_util.tree_map(lambda t, d: t + s * eps * d, theta, v)
    fd = jax.tree_util.tree_map(lambda a, b: (a - b) / (2 * eps), grad(shift(1.0)),
                                grad(shift(-1.0)))
    flat = lambda t: np.concatenate([np.ravel(x) for x in jax.tree_util.tree_leaves(t)])
    hv, fdv = flat(hvp), flat(fd)
    assert hv.dtype == np.float64 and np.all(np.isfinite(hv))
    assert np.linalg.norm(hv - fdv) <= 1e-4 * np.linalg.norm(fdv)


def _byol_setup(seed=0):
  model = _tiny_model(predictor=True)
  task = pretext.make_pretext_task("byol", model, ema_decay=0.9)
  params, stats = model.init(jax.random.key(seed), image_size=6)
  return model, task, params, stats


def test_byol_target_copy_update_and_loss():
  model, task, params, stats = _byol_setup()
  assert task.has_target
  target = task.init_target(params, stats)
  assert set(target) == {"params", "batch_stats"}
  assert set(target["params"]) == {"backbone", "projector"}
  chex_equal = jax.tree_util.tree_map(lambda a, b: bool(jnp.array_equal(a, b)),
                                      target["params"]["backbone"], params["backbone"])
  assert all(jax.tree_util.tree_leaves(chex_equal))
  assert target["params"]["projector"]["dense_0"]["kernel"] is not \
      params["pretext_head"]["projector"]["dense_0"]["kernel"]

  views = _views(2)
  loss, aux = task.loss(params, stats, views, target)
  assert 0.0 <= float(loss) <= 8.0
  swapped, _ = task.loss(params, stats, views[::-1], target)
  np.testing.assert_allclose(loss, swapped, rtol=1e-5)  # symmetric in the two views
  assert set(aux["batch_stats"]["pretext_head"]) == {"projector", "predictor"}
  # Targets are under stop_gradient.
  g_target = jax.grad(lambda t: task.loss(params, stats, views, t)[0])(target)
  assert max(float(jnp.abs(x).max()) for x in jax.tree_util.tree_leaves(g_target)) == 0.0

  # EMA: with a perturbed online network, target = 0.9·target + 0.1·online.
  online = jax.tree_util.tree_map(lambda x: x + 1.0, params)
  online_stats = jax.tree_util.tree_map(lambda x: x + 2.0, stats)
  new = task.update_target(target, online, online_stats)
  np.testing.assert_allclose(new["params"]["backbone"]["conv1"]["kernel"],
                             target["params"]["backbone"]["conv1"]["kernel"] + 0.1, rtol=1e-5,
                             atol=1e-6)
  np.testing.assert_allclose(new["batch_stats"]["projector"]["bn_1"]["var"],
                             target["batch_stats"]["projector"]["bn_1"]["var"] + 0.2, rtol=1e-5)


def test_byol_loss_against_manual_forward():
  model, task, params, stats = _byol_setup(3)
  target = task.init_target(params, stats)
  target = jax.tree_util.tree_map(lambda x: x * 1.1, target)  # target ≠ online
  views = _views(4)
  loss, _ = task.loss(params, stats, views, target)
  x = jnp.concatenate(views)

  def forward(bb, bbs, proj, projs, x):
    h, _ = model.features(bb, bbs, x, train=True)
    return model.project(proj, projs, h, train=True)[0]

  hp, sp = params["pretext_head"], stats["pretext_head"]
  z = forward(params["backbone"], stats["backbone"], hp["projector"], sp["projector"], x)
  p = model.predict(hp["predictor"], sp["predictor"], z, train=True)[0]
  tp, ts = target["params"], target["batch_stats"]
  zt = forward(tp["backbone"], ts["backbone"], tp["projector"], ts["projector"], x)
  p, zt = np.asarray(p), np.asarray(zt)
  cos = lambda a, b: np.sum(a * b, 1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
  expected = np.mean(2 - 2 * cos(p[:4], zt[4:])) + np.mean(2 - 2 * cos(p[4:], zt[:4]))
  np.testing.assert_allclose(loss, expected, rtol=1e-5)


def test_make_pretext_task_errors():
  with pytest.raises(ValueError, match="simclr"):
    pretext.make_pretext_task("moco", _tiny_model(False))
  with pytest.raises(ValueError, match="predictor"):
    pretext.make_pretext_task("byol", _tiny_model(False))
  with pytest.raises(ValueError, match="init_target"):
    model, task, params, stats = _byol_setup()
    task.loss(params, stats, _views(), None)


_SHARDED_SCRIPT = r"""
import os
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
os.environ["JAX_PLATFORMS"] = "cpu"
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec
jax.config.update("jax_disable_most_optimizations", True)
from bissl_jax.models import resnet
from bissl_jax.tasks import pretext

assert len(jax.devices()) == 2
model = resnet.BisslModel(
    backbone=resnet.ResNet(stage_sizes=(1,), block="basic", width=4, cifar_stem=True),
    projector=resnet.MLPHead((8, 6)), predictor=None)
task = pretext.SimCLR(model)
params, stats = model.init(jax.random.key(0), image_size=6)
k1, k2 = jax.random.split(jax.random.key(1))
views = (jax.random.normal(k1, (4, 6, 6, 3)), jax.random.normal(k2, (4, 6, 6, 3)))
fn = jax.jit(jax.value_and_grad(task.loss, has_aux=True))
(loss1, aux1), g1 = fn(params, stats, views)
mesh = Mesh(np.array(jax.devices()), ("data",))
batch, rep = NamedSharding(mesh, PartitionSpec("data")), NamedSharding(mesh, PartitionSpec())
sharded_views = jax.device_put(views, batch)
assert len(sharded_views[0].sharding.device_set) == 2
(loss2, aux2), g2 = fn(jax.device_put(params, rep), jax.device_put(stats, rep), sharded_views)
np.testing.assert_allclose(loss1, loss2, rtol=1e-5)
for a, b in zip(jax.tree_util.tree_leaves((aux1, g1)), jax.tree_util.tree_leaves((aux2, g2))):
  np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
print("SHARDED_OK")
"""


def test_simclr_loss_same_on_two_devices():
  """The global-batch loss (NT-Xent negatives and BN statistics) is unchanged by sharding."""
  import os
  import subprocess
  import sys
  root = REPO_ROOT
  env = {**os.environ, "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}
  env.pop("XLA_FLAGS", None)
  result = subprocess.run([sys.executable, "-c", _SHARDED_SCRIPT], cwd=root, env=env,
                          capture_output=True, text=True, timeout=300)
  assert result.returncode == 0 and "SHARDED_OK" in result.stdout, result.stderr[-3000:]


@pytest.mark.parametrize("task_name", ["simclr", "byol"])
def test_bn_grouping_per_view_and_joint_match_separate_and_concatenated_passes(task_name):
  # per_view: each view through the network on its own, statistics per view and the
  # running averages updated twice (the reference's order); joint: one pass of 2B.
  model = _tiny_model(task_name == "byol")
  params, stats = model.init(jax.random.PRNGKey(0), 16)
  rng = np.random.default_rng(0)
  v1, v2 = (jnp.asarray(rng.normal(size=(4, 16, 16, 3)), jnp.float32) for _ in range(2))
  feats = lambda st, x: model.features(params["backbone"], st, x, train=True)
  h1, s1 = feats(stats["backbone"], v1)
  h2, s2 = feats(s1, v2)
  hj, sj = feats(stats["backbone"], jnp.concatenate([v1, v2]))
  for grouping, (h_ref, s_ref) in (("per_view", (jnp.concatenate([h1, h2]), s2)),
                                   ("joint", (hj, sj))):
    h, s = pretext.two_view_apply(lambda p, st, x: model.features(p, st, x, train=True),
                                  params["backbone"], stats["backbone"], (v1, v2), grouping)
    np.testing.assert_allclose(h, h_ref, rtol=1e-5, atol=1e-6)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                           s, s_ref)
  # The groupings really differ, and the task's loss follows its grouping.
  assert float(jnp.max(jnp.abs(jnp.concatenate([h1, h2]) - hj))) > 1e-4
  task = pretext.make_pretext_task(task_name, model, bn_grouping="per_view")
  joint = pretext.make_pretext_task(task_name, model, bn_grouping="joint")
  target = task.init_target(params, stats) if task.has_target else None
  lp = task.loss(params, stats, (v1, v2), target)[0]
  lj = joint.loss(params, stats, (v1, v2), target)[0]
  assert abs(float(lp) - float(lj)) > 1e-6
  if hasattr(task, "outputs"):  # the Gauss-Newton split follows the same grouping
    np.testing.assert_allclose(task.output_loss(task.outputs(params, stats, (v1, v2), target),
                                                (v1, v2), target), lp, rtol=1e-5)
  with pytest.raises(ValueError, match="bn_grouping"):
    pretext.make_pretext_task(task_name, model, bn_grouping="per_batch").loss(
        params, stats, (v1, v2), target)
