"""GeSSL: task construction, divergences against NumPy, the unrolled second-level
gradient against finite differences and closed forms, and no recompilation."""
import dataclasses
from typing import Tuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from bissl_jax.tasks.pretext import gessl
from bissl_jax.tasks import pretext


# ----------------------------------------------------------------------------- a tiny model

@dataclasses.dataclass(frozen=True)
class _Projector:
  features: Tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class TinyModel:
  """Duck-typed model: tanh(flatten(x) W + b) backbone and a linear projector."""
  in_dim: int
  feat_dim: int = 5
  proj_dim: int = 4

  @property
  def projector(self):
    return _Projector((self.proj_dim,))

  def init(self, rng, dtype=jnp.float32):
    k1, k2, k3 = jax.random.split(rng, 3)
    params = {"backbone": {"w": jax.random.normal(k1, (self.in_dim, self.feat_dim), dtype) * 0.5,
                           "b": jax.random.normal(k2, (self.feat_dim,), dtype) * 0.1},
              "pretext_head": {"projector": {
                  "w": jax.random.normal(k3, (self.feat_dim, self.proj_dim), dtype) * 0.5}},
              "downstream_head": {}}
    stats = {"backbone": {}, "pretext_head": {"projector": {}}}
    return params, stats

  def features(self, bb, stats, x, *, train):
    del train
    return jnp.tanh(x.reshape(x.shape[0], -1) @ bb["w"] + bb["b"]), stats

  def project(self, pp, ps, h, *, train):
    del train
    return h @ pp["w"], ps


def _setup(rng=0, *, classes=3, n_tasks=2, views=2, side=2, dtype=jnp.float32, **kwargs):
  model = TinyModel(in_dim=side * side * 3)
  task = gessl.GeSSL(base=pretext.SimCLR(model=model), classes_per_task=classes,
                     n_tasks=n_tasks, num_views=views, **kwargs)
  k1, k2, k3 = jax.random.split(jax.random.PRNGKey(rng), 3)
  params, stats = model.init(k1, dtype)
  params = task.init_head(k2, params)
  params = jax.tree_util.tree_map(lambda a: a.astype(dtype), params)
  x = jax.random.normal(k3, (views, n_tasks * classes, side, side, 3), dtype)
  return task, params, stats, {"views": x}


# ----------------------------------------------------------------------------- tasks

def test_make_tasks_labels_and_views_per_class():
  num_views, n_tasks, classes = 3, 2, 4
  # views[j, i] encodes (view j, image i) in its pixels.
  ids = np.arange(num_views)[:, None] * 100 + np.arange(n_tasks * classes)[None, :]
  views = jnp.asarray(np.broadcast_to(ids[:, :, None, None, None], (num_views, 8, 2, 2, 1)),
                      jnp.float32)
  x, y = gessl.make_tasks(views, n_tasks)
  assert x.shape == (n_tasks, num_views * classes, 2, 2, 1) and y.shape == (n_tasks, 12)
  code = np.asarray(x[:, :, 0, 0, 0]).astype(int)
  image, view = code % 100, code // 100
  for l in range(n_tasks):
    # Every sample's pseudo-label is its image's index inside the task ...
    np.testing.assert_array_equal(np.asarray(y[l]), image[l] - l * classes)
    for c in range(classes):
      members = np.asarray(y[l]) == c
      # ... and each class holds exactly the A views of one image.
      assert members.sum() == num_views
      assert set(image[l][members]) == {l * classes + c}
      assert sorted(view[l][members]) == list(range(num_views))
  with pytest.raises(ValueError, match="multiple of n_tasks"):
    gessl.make_tasks(views, 3)


def test_prepare_gives_a_views_of_each_image_with_base_pair_first():
  model = TinyModel(in_dim=8 * 8 * 3)
  task = gessl.GeSSL(base=pretext.SimCLR(model=model), classes_per_task=2, n_tasks=2,
                     num_views=5)
  images = np.random.default_rng(0).integers(0, 256, (4, 8, 8, 3), dtype=np.uint8)
  rng = jax.random.PRNGKey(3)
  views = jax.jit(task.prepare)(rng, images)["views"]
  assert views.shape == (5, 4, 8, 8, 3)
  # Views 0 and 1 are the base task's own pair (same key, same draws).
  k0 = jax.random.split(rng, 3)[0]
  v1, v2 = jax.jit(pretext.two_views, static_argnums=2)(k0, images, 8)
  np.testing.assert_allclose(views[0], v1, atol=1e-6)
  np.testing.assert_allclose(views[1], v2, atol=1e-6)
  assert float(jnp.max(jnp.abs(views[2] - views[0]))) > 1e-3  # fresh draws
  with pytest.raises(ValueError, match="n_tasks\\*classes_per_task"):
    task.prepare(rng, images[:3])


def test_init_head_adds_a_b_way_classifier():
  task, params, _, _ = _setup(classes=3)
  head = params["pretext_head"]["task_classifier"]
  assert head["kernel"].shape == (4, 3) and head["bias"].shape == (3,)
  assert "projector" in params["pretext_head"]
  with pytest.raises(ValueError, match="once"):
    task.init_head(jax.random.PRNGKey(0), params)


def test_bad_config_names_the_field():
  with pytest.raises(ValueError, match="second_level_loss"):
    gessl.GeSSL(base=None, classes_per_task=4, second_level_loss="l2")
  with pytest.raises(ValueError, match="K=0"):
    gessl.GeSSL(base=None, classes_per_task=4, K=0)


# ----------------------------------------------------------------------------- divergences

def _softmax(a):
  e = np.exp(a - a.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


@pytest.mark.parametrize("name", gessl.SECOND_LEVEL_LOSSES)
def test_divergences_match_numpy(name):
  rng = np.random.default_rng(1)
  t, q = rng.standard_normal((2, 2, 6, 5)) * 2
  p, r = _softmax(t), _softmax(q)
  if name == "kl":
    ref = np.sum(p * (np.log(p) - np.log(r)), -1)
  elif name == "cross_entropy":
    ref = -np.sum(p * np.log(r), -1)
  elif name == "mse":
    ref = np.mean((p - r) ** 2, -1)
  else:
    ref = np.sum(np.abs(np.cumsum(p, -1) - np.cumsum(r, -1)), -1)
  got = gessl.second_level_divergence(name, jnp.asarray(t, jnp.float32),
                                      jnp.asarray(q, jnp.float32))
  np.testing.assert_allclose(got, ref.mean(-1), rtol=1e-5, atol=1e-6)
  if name == "kl":
    assert np.allclose(gessl.second_level_divergence(name, t, t), 0.0, atol=1e-6)


# ----------------------------------------------------------------------------- gradients

def test_second_order_gradient_matches_central_differences():
  with jax.enable_x64(True):
    task, params, stats, inputs = _setup(rng=4, dtype=jnp.float64, K=2, lam=3, inner_lr=0.5,
                                         unroll=True)
    grad = jax.jit(jax.grad(lambda p: task.loss(p, stats, inputs)[0]))(params)
    # The target θ̃ is under stop-gradient: the gradient is the derivative of the
    # loss with θ̃ held at its value at θ, which is what the differences below take.
    _, _, targets = task.second_level(params, stats, inputs)
    views = inputs["views"]
    loss = jax.jit(lambda p: (task.base.loss(p, stats, (views[0], views[1]))[0]
                              + task.second_level(p, stats, inputs, targets)[0]))
    np.testing.assert_allclose(loss(params), task.loss(params, stats, inputs)[0], rtol=1e-12)
    keys = iter(jax.random.split(jax.random.PRNGKey(9), 16))
    direction = jax.tree_util.tree_map(
        lambda a: jax.random.normal(next(keys), a.shape, jnp.float64), params)
    eps = 1e-5
    shift = lambda s: jax.tree_util.tree_map(lambda a, d: a + s * eps * d, params, direction)
    fd = (loss(shift(1.0)) - loss(shift(-1.0))) / (2 * eps)
    dot = lambda g: sum(float(jnp.vdot(a, b)) for a, b in zip(
        jax.tree_util.tree_leaves(g), jax.tree_util.tree_leaves(direction)))
    np.testing.assert_allclose(dot(grad), float(fd), rtol=1e-6)
    # The first-order gradient misses the inner Hessian term, so it must differ.
    fo = dataclasses.replace(task, first_order=True)
    fo_grad = jax.jit(jax.grad(lambda p: fo.loss(p, stats, inputs)[0]))(params)
    assert abs(dot(fo_grad) - float(fd)) > 1e-3 * abs(float(fd))


def test_first_order_drops_exactly_the_inner_hessian_on_a_quadratic():
  with jax.enable_x64(True):
    rng = np.random.default_rng(2)
    d, steps, extra, alpha = 4, 3, 4, 0.1
    m = rng.standard_normal((d, d))
    a = m @ m.T + np.eye(d)
    b = rng.standard_normal(d)
    theta = rng.standard_normal(d)
    inner = lambda p: 0.5 * p["x"] @ jnp.asarray(a) @ p["x"] - jnp.asarray(b) @ p["x"]
    outer = lambda t, q: 0.5 * jnp.sum(jnp.square(q["x"] - t["x"]))

    # Closed forms: θ_{k+1} = M θ_k + α b with M = I − αA.
    mat = np.eye(d) - alpha * a
    def run(x, k):
      for _ in range(k):
        x = mat @ x + alpha * b
      return x
    adapted = run(theta, steps)
    residual = adapted - run(adapted, extra)
    second_ref = np.linalg.matrix_power(mat, steps).T @ residual
    first_ref = residual

    for first_order, ref in [(False, second_ref), (True, first_ref)]:
      for unroll in (True, False):
        fn = lambda p: gessl.unrolled_second_level(
            inner, outer, p, steps=steps, extra_steps=extra, inner_lr=alpha,
            first_order=first_order, unroll=unroll)[0]
        got = jax.grad(fn)({"x": jnp.asarray(theta)})["x"]
        np.testing.assert_allclose(got, ref, rtol=1e-10, atol=1e-12)
    assert np.linalg.norm(second_ref - first_ref) > 1e-2 * np.linalg.norm(first_ref)


def test_inner_params_head_only_leaves_backbone_unadapted():
  task, params, stats, inputs = _setup(rng=5, inner_params="task_classifier", inner_lr=0.5)
  x, y = gessl.make_tasks(inputs["views"], task.n_tasks)
  lower = {k: params[k] for k in ("backbone", "pretext_head")}
  inner = lambda p: gessl.cross_entropy(task.task_logits(p, stats, x[0]), y[0])
  _, (adapted, _) = gessl.unrolled_second_level(
      inner, lambda t, q: 0.0, lower, steps=2, extra_steps=0, inner_lr=0.5,
      mask=gessl._inner_mask(lower, "task_classifier"))  # pylint: disable=protected-access
  np.testing.assert_array_equal(adapted["backbone"]["w"], lower["backbone"]["w"])
  np.testing.assert_array_equal(adapted["pretext_head"]["projector"]["w"],
                                lower["pretext_head"]["projector"]["w"])
  assert float(jnp.max(jnp.abs(adapted["pretext_head"]["task_classifier"]["kernel"]
                               - lower["pretext_head"]["task_classifier"]["kernel"]))) > 1e-4
  # And the adaptation lowers the task loss (a sanity check of the step's sign).
  assert float(inner(adapted)) < float(inner(lower))


def test_lam_one_makes_second_level_vanish_and_loss_equals_base():
  task, params, stats, inputs = _setup(rng=6, lam=1)
  loss, aux = task.loss(params, stats, inputs)
  base, _ = task.base.loss(params, stats, (inputs["views"][0], inputs["views"][1]))
  np.testing.assert_allclose(aux["metrics"]["second_level_loss"], 0.0, atol=1e-7)
  np.testing.assert_allclose(loss, base, rtol=1e-6)


def test_lax_and_unrolled_loops_and_task_batchings_agree():
  task, params, stats, inputs = _setup(rng=7, K=2, lam=3)
  variants = [dict(unroll=True), dict(unroll=False), dict(unroll=True, task_batching="loop"),
              dict(unroll=False, task_batching="loop")]
  grads = [jax.jit(jax.grad(
      lambda p, t=dataclasses.replace(task, **v): t.loss(p, stats, inputs)[0]))(params)
           for v in variants]
  for other in grads[1:]:
    for a, b in zip(*map(jax.tree_util.tree_leaves, (grads[0], other))):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_outer_steps_do_not_recompile():
  task, params, stats, inputs = _setup(rng=8, K=1, lam=3, inner_lr=0.5)
  traces = []
  tx = gessl.gessl_optimizer(0.05)

  @jax.jit
  def step(params, opt_state, views):
    traces.append(1)  # runs once per trace
    (loss, aux), grads = jax.value_and_grad(task.loss, has_aux=True)(
        params, stats, {"views": views})
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss, aux["metrics"]

  opt_state = tx.init(params)
  losses = []
  for i in range(4):
    views = inputs["views"] + 0.01 * i  # new data each step, same shapes
    params, opt_state, loss, metrics = step(params, opt_state, views)
    losses.append(float(loss))
  assert len(traces) == 1
  assert all(np.isfinite(losses))
  assert set(metrics) >= {"loss", "ssl_loss", "second_level_loss", "inner_ce_before",
                          "inner_ce_adapted", "inner_ce_target"}


def test_gessl_on_a_real_resnet_with_byol_runs_and_satisfies_the_protocol():
  from bissl_jax.models import resnet  # pylint: disable=import-outside-toplevel
  from bissl_jax.core import protocols  # pylint: disable=import-outside-toplevel
  base_model = resnet.build_model("resnet18", projector="8-8",
                                  predictor="8-8")
  model = dataclasses.replace(base_model, backbone=resnet.ResNet(
      stage_sizes=(1,), block="basic", width=4))
  task = gessl.GeSSL(base=pretext.BYOL(model=model), classes_per_task=2, n_tasks=2, lam=2)
  assert isinstance(task, protocols.PretextTask) and task.has_target
  params, stats = model.init(jax.random.PRNGKey(0), 8)
  params = task.init_head(jax.random.PRNGKey(1), params)
  target = task.init_target(params, stats)
  views = jax.random.normal(jax.random.PRNGKey(2), (2, 4, 8, 8, 3))
  (loss, aux), grads = jax.jit(jax.value_and_grad(task.loss, has_aux=True))(
      params, stats, {"views": views}, target)
  assert np.isfinite(float(loss))
  assert jax.tree_util.tree_structure(aux["batch_stats"]) == jax.tree_util.tree_structure(stats)
  assert float(optax.tree.norm(grads["pretext_head"]["task_classifier"])) > 0
  with pytest.raises(ValueError, match="init_head"):
    fresh, _ = model.init(jax.random.PRNGKey(0), 8)
    task.loss(fresh, stats, {"views": views}, target)


def test_from_config_and_optimizer():
  cfg = gessl.default_config()
  cfg.classes_per_task = 4
  cfg.n_tasks = 2
  task = gessl.from_config(pretext.SimCLR(model=TinyModel(in_dim=12)), cfg)
  assert (task.K, task.lam, task.batch_size, task.second_level_loss) == (1, 10, 8, "kl")
  del cfg.lam
  with pytest.raises(ValueError, match="lam"):
    gessl.from_config(task.base, cfg)
  # Coupled weight decay 1e-4 and momentum 0.9 (PyTorch SGD), checked over two steps.
  tx = gessl.gessl_optimizer(0.1)
  p = {"w": jnp.array([1.0, -2.0])}
  g = {"w": jnp.array([0.5, 0.25])}
  state = tx.init(p)
  u1, state = tx.update(g, state, p)
  buf1 = g["w"] + 1e-4 * p["w"]
  np.testing.assert_allclose(u1["w"], -0.1 * buf1, rtol=1e-6)
  p2 = optax.apply_updates(p, u1)
  u2, _ = tx.update(g, state, p2)
  np.testing.assert_allclose(u2["w"], -0.1 * (0.9 * buf1 + g["w"] + 1e-4 * p2["w"]), rtol=1e-6)


@pytest.mark.slow
def test_cost_benchmark_runs_tiny(tmp_path):
  from bench import gessl_cost  # pylint: disable=import-outside-toplevel
  doc = tmp_path / "gessl.md"
  tables = gessl_cost.main(["--tiny", "--no-record", "--repeats", "1", "--ks", "1", "--lam", "2",
                            "--doc", str(doc)])
  cost, mem = tables
  assert [row[0] for row in cost.rows] == ["plain SimCLR step", "GeSSL K=1, λ=2"]
  assert all(v > 0 and np.isfinite(v) for v in cost.numeric_cells() + mem.numeric_cells())
  assert mem.rows[1][2] > 1.0  # the outer step holds more than a plain step
  assert not doc.exists()


# ----------------------------------------------------------------------------- Model.trainable

@dataclasses.dataclass(frozen=True)
class FrozenBiasModel(TinyModel):
  """TinyModel whose ``trainable`` freezes the backbone bias (as LoRA freezes its base)."""

  def trainable(self, params):
    mask = jax.tree_util.tree_map(lambda _: True, params)
    mask["backbone"]["b"] = False
    return mask


def test_inner_steps_do_not_adapt_frozen_leaves():
  model = FrozenBiasModel(in_dim=12)
  task = gessl.GeSSL(base=pretext.SimCLR(model=model), classes_per_task=3, n_tasks=2,
                     lam=3, inner_lr=0.5)
  k1, k2, k3 = jax.random.split(jax.random.PRNGKey(9), 3)
  params, stats = model.init(k1)
  params = task.init_head(k2, params)
  lower = {"backbone": params["backbone"], "pretext_head": params["pretext_head"]}
  inputs = {"views": jax.random.normal(k3, (2, 6, 2, 2, 3))}
  mask = task.inner_mask(lower)
  assert mask["backbone"] == {"w": True, "b": False}
  assert all(jax.tree_util.tree_leaves(mask["pretext_head"]))
  # The targets θ̃ (K + λ−1 = 3 inner steps from θ) keep the frozen bias exactly and
  # move every trainable leaf.
  _, _, targets = jax.jit(task.second_level)(lower, stats, inputs)
  for l in range(task.n_tasks):
    np.testing.assert_array_equal(targets["backbone"]["b"][l], lower["backbone"]["b"])
    assert float(jnp.max(jnp.abs(targets["backbone"]["w"][l] - lower["backbone"]["w"]))) > 1e-4
    assert float(jnp.max(jnp.abs(targets["pretext_head"]["task_classifier"]["kernel"][l]
                                 - lower["pretext_head"]["task_classifier"]["kernel"]))) > 1e-4
  # inner_params narrows the adapted set further, and the task's trainable mask (the
  # one the pretext stage's optimizer uses) is the model's, with the classifier True.
  narrow = dataclasses.replace(task, inner_params="task_classifier").inner_mask(lower)
  assert not any(jax.tree_util.tree_leaves(narrow["backbone"]))
  assert task.trainable(lower)["backbone"] == {"w": True, "b": False}
  assert all(jax.tree_util.tree_leaves(task.trainable(lower)["pretext_head"]))
  # The unrestricted model adapts the bias: the check above can fail.
  free = dataclasses.replace(task, base=pretext.SimCLR(model=TinyModel(in_dim=12)))
  _, _, free_targets = jax.jit(free.second_level)(lower, stats, inputs)
  assert float(jnp.max(jnp.abs(free_targets["backbone"]["b"][0] - lower["backbone"]["b"]))) > 1e-5


# ----------------------------------------------------------------------------- AID-FD

def test_finite_difference_hvps_match_the_exact_gradient():
  with jax.enable_x64(True):
    # On a quadratic inner loss the central difference of the (linear) gradient is
    # exact, so AID-FD equals the closed-form second-order gradient.
    rng = np.random.default_rng(5)
    d, steps, alpha = 4, 3, 0.1
    m = rng.standard_normal((d, d))
    a = m @ m.T + np.eye(d)
    b = rng.standard_normal(d)
    theta = {"x": jnp.asarray(rng.standard_normal(d))}
    inner = lambda p: 0.5 * p["x"] @ jnp.asarray(a) @ p["x"] - jnp.asarray(b) @ p["x"]
    outer = lambda t, q: 0.5 * jnp.sum(jnp.square(q["x"] - t["x"]))
    fn = lambda p, r, u: gessl.unrolled_second_level(
        inner, outer, p, steps=steps, extra_steps=4, inner_lr=alpha, fd_radius=r, unroll=u)[0]
    exact = jax.grad(lambda p: fn(p, 0.0, True))(theta)["x"]
    for unroll in (True, False):  # Python loop and lax.fori_loop
      fd = jax.jit(jax.grad(lambda p, u=unroll: fn(p, 1e-2, u)))(theta)["x"]
      np.testing.assert_allclose(fd, exact, rtol=1e-9, atol=1e-12)
    # On the tiny network (non-quadratic, vmapped tasks) it is close to the exact
    # gradient, much closer than first order is.
    task, params, stats, inputs = _setup(rng=4, dtype=jnp.float64, K=1, lam=2, inner_lr=0.5)
    grad = lambda t: jax.jit(jax.grad(lambda p: t.second_level(p, stats, inputs)[0]))(params)
    flat = lambda g: np.concatenate([np.ravel(x) for x in jax.tree_util.tree_leaves(g)])
    ref = flat(grad(task))
    approx = flat(grad(dataclasses.replace(task, fd_radius=1e-4)))
    first = flat(grad(dataclasses.replace(task, first_order=True)))
    err = np.linalg.norm(approx - ref) / np.linalg.norm(ref)
    assert err < 1e-6 and np.linalg.norm(first - ref) / np.linalg.norm(ref) > 1e3 * err
  with pytest.raises(ValueError, match="fd_radius"):
    gessl.GeSSL(base=None, classes_per_task=4, fd_radius=-1.0)
