"""Tests of the BiSSL training core against dense references and closed forms."""
import dataclasses
import functools
import os
import subprocess
import sys
import textwrap

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from bissl_jax.core.params import init_params
from bissl_jax.tasks import augment
from bissl_jax.core import state as bilevel
from bissl_jax.tasks.downstream import classification
from bissl_jax.core import lower as lower_level
from bissl_jax.models import resnet
from bissl_jax.core import partition
from bissl_jax.tasks import pretext
from bissl_jax.core import alternation as ts
from bissl_jax.core import upper as upper_level
from bissl_jax.runtime.errors import NonFiniteError
from configs import common
from config_helpers import REPO_ROOT

IMG = 4        # tiny images keep the dense Hessian small
CLASSES = 3


class MLPBackbone(nn.Module):
  """A tiny non-conv backbone with BatchNorm, small enough for a dense Hessian."""
  width: int = 6

  @nn.compact
  def __call__(self, x, *, train: bool):
    x = x.reshape((x.shape[0], -1))
    x = nn.Dense(self.width)(x)
    x = nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5)(x)
    return nn.relu(x)


def tiny_model(backbone=None):
  return resnet.BisslModel(backbone=backbone or MLPBackbone(),
                           projector=resnet.MLPHead((8, 8, 4)), predictor=None)


def make_setup(model=None, task=None, **overrides):
  """A tiny setup: the configs' defaults (the one source of them) with test overrides."""
  model = model or tiny_model()
  cfg = common.base_config().bissl.to_dict()
  cfg.update(lam=1e-3, damping=10.0, solver="layerwise_cg", cg_iters=3, lower_steps=2,
             upper_steps=2, alternations=4, lower_lr=0.5, upper_lr=0.05,
             upper_weight_decay=0.0)
  cfg.update(overrides)
  downstream = classification.Classification(model, IMG, num_classes=CLASSES)
  return bilevel.BisslSetup.from_config(model, task or pretext.SimCLR(model), cfg,
                                        downstream=downstream)


def make_state(setup, seed=0, perturb=True):
  params, stats = init_params(setup.model, setup.downstream, jax.random.PRNGKey(seed), IMG)
  state = bilevel.init_bilevel_state(setup, params, stats)
  if perturb:  # make θ_P differ from θ_D, as after some lower steps
    leaves, tdef = jax.tree_util.tree_flatten(state.lower.params["backbone"])
    keys = jax.random.split(jax.random.PRNGKey(seed + 100), len(leaves))
    leaves = [l + 0.05 * jax.random.normal(k, l.shape) for l, k in zip(leaves, keys)]
    lower = state.lower.replace(params={**state.lower.params,
                                        "backbone": jax.tree_util.tree_unflatten(tdef, leaves)})
    state = state.replace(lower=lower)
  return state


def make_batches(setup, seed=0, b_pre=8, b_down=6):
  rng = np.random.default_rng(seed)
  img = lambda *s: rng.integers(0, 256, size=s + (IMG, IMG, 3), dtype=np.uint8)
  return bilevel.AlternationBatches(
      pretext=img(setup.lower_steps, b_pre), hvp=img(b_pre),
      downstream_images=img(setup.upper_steps, b_down),
      downstream_labels=rng.integers(0, CLASSES, size=(setup.upper_steps, b_down)).astype(np.int32))


def assert_trees_close(a, b, rtol=1e-5, atol=1e-6):
  jax.tree_util.tree_map(lambda x, y: np.testing.assert_allclose(
      np.asarray(x), np.asarray(y), rtol=rtol, atol=atol), a, b)


def test_upper_step_gradient_matches_dense_solve():
  setup = make_setup(solver="cg", cg_iters=400, cg_tol=1e-10, unroll=False, upper_steps=1,
                     lam=0.1, residual_every=1)
  state = make_state(setup)
  batches = make_batches(setup)
  rng = jax.random.PRNGKey(3)

  # Independent reference: the same random draws, a dense Hessian and numpy.linalg.solve.
  hvp_rng, step_rng = jax.random.split(rng)
  views = augment.pretext_views(hvp_rng, batches.hvp, size=IMG)
  x = augment.downstream_train_view(jax.random.split(step_rng, 1)[0],
                                    batches.downstream_images[0], size=IMG)
  y = batches.downstream_labels[0]
  theta_p, theta_d = state.lower.params["backbone"], state.upper.params["backbone"]
  flat_p, unravel = ravel_pytree(theta_p)
  phi_p, phi_d = state.lower.params["pretext_head"], state.upper.params["downstream_head"]

  def pretext_loss(flat):
    return setup.task.loss({"backbone": unravel(flat), "pretext_head": phi_p},
                           state.lower.batch_stats, views)[0]

  def down_loss(theta, phi, stats):
    return upper_level.downstream_loss(setup, theta, phi, stats, x, y)[0]

  hess = np.asarray(jax.hessian(pretext_loss)(flat_p), np.float64)
  eig_h = np.linalg.eigvalsh(hess)
  # A tiny random-init SimCLR Hessian is strongly indefinite; pick δ so that A is
  # positive definite (CG's requirement) while H still shapes the solution.
  setup = dataclasses.replace(setup, damping=float(2 * max(-eig_h.min(), 1.0)))
  a_mat = np.eye(hess.shape[0]) + hess / (setup.lam + setup.damping)
  eig = np.linalg.eigvalsh(a_mat)
  assert eig.min() > 0.1 and eig.max() - eig.min() > 0.3, eig[[0, -1]]
  gp_theta, gp_phi = jax.grad(down_loss, (0, 1))(theta_p, phi_d, state.lower.batch_stats["backbone"])
  gd_theta, gd_phi = jax.grad(down_loss, (0, 1))(theta_d, phi_d, state.upper.batch_stats["backbone"])
  v_ig = np.linalg.solve(a_mat, np.asarray(ravel_pytree(gp_theta)[0], np.float64))
  expected = v_ig + np.asarray(ravel_pytree(gd_theta)[0], np.float64)
  assert np.max(np.abs(v_ig - ravel_pytree(gp_theta)[0])) > 1e-3  # the solve is not trivial

  new_state, metrics = jax.jit(functools.partial(ts.upper_stage, setup))(
      state, batches.hvp, batches.downstream_images, batches.downstream_labels, rng)
  # SGD step 0, no momentum history, no weight decay: g = (θ_D − θ_D')/lr (clip inactive).
  assert float(metrics["upper_grad_norm"][0]) < setup.grad_clip
  got = (ravel_pytree(theta_d)[0] - ravel_pytree(new_state.upper.params["backbone"])[0]) / setup.upper_lr
  np.testing.assert_allclose(np.asarray(got), expected, rtol=2e-3, atol=5e-5)
  got_phi = jax.tree_util.tree_map(lambda a, b: (a - b) / setup.upper_lr, phi_d,
                                   new_state.upper.params["downstream_head"])
  assert_trees_close(got_phi, jax.tree_util.tree_map(jnp.add, gp_phi, gd_phi), rtol=2e-3, atol=5e-5)
  assert float(metrics["cg_residual"][0]) < 1e-4


def test_linearize_and_jvp_modes_give_the_same_upper_stage():
  batches = make_batches(make_setup())
  out = []
  for mode in ("linearize", "jvp"):
    setup = make_setup(hessian_mode=mode)
    state = make_state(setup)
    out.append(jax.jit(functools.partial(ts.upper_stage, setup))(
        state, batches.hvp, batches.downstream_images, batches.downstream_labels,
        jax.random.PRNGKey(1))[0])
  assert_trees_close(out[0].upper.params, out[1].upper.params)
  assert_trees_close(out[0].solver_state.warm_start, out[1].solver_state.warm_start)


def test_huge_lambda_reduces_to_plain_finetuning_gradient():
  batches = make_batches(make_setup())
  out = {}
  for solver, lam in (("layerwise_cg", 1e9), ("first_order", 1e9)):
    setup = make_setup(solver=solver, lam=lam)
    out[solver] = jax.jit(functools.partial(ts.upper_stage, setup))(
        make_state(setup), batches.hvp, batches.downstream_images, batches.downstream_labels,
        jax.random.PRNGKey(2))
  assert_trees_close(out["layerwise_cg"][0].upper.params, out["first_order"][0].upper.params,
                     rtol=1e-4, atol=1e-6)
  # ... and with a small λ the implicit gradient really differs from v.
  setup = make_setup(solver="layerwise_cg", lam=1e-3, damping=0.0)
  small = jax.jit(functools.partial(ts.upper_stage, setup))(
      make_state(setup), batches.hvp, batches.downstream_images, batches.downstream_labels,
      jax.random.PRNGKey(2))
  diff = ravel_pytree(small[0].upper.params["backbone"])[0] - ravel_pytree(
      out["first_order"][0].upper.params["backbone"])[0]
  assert float(jnp.max(jnp.abs(diff))) > 1e-5


@dataclasses.dataclass(frozen=True)
class ConstantTask:
  """A pretext task whose loss does not depend on the parameters."""
  has_target = False

  def prepare(self, rng, images):
    return images

  def loss(self, params, batch_stats, views, target=None):
    return jnp.asarray(1.5), {"batch_stats": batch_stats, "metrics": {}}


def test_lower_proximal_gradient_is_lam_times_gap():
  setup = make_setup(lam=0.37)
  state = make_state(setup)
  setup = dataclasses.replace(setup, task=ConstantTask())
  views = (jnp.zeros((2, IMG, IMG, 3)),) * 2
  frozen = jax.tree_util.tree_map(lambda _: None, state.lower.params)
  grads = jax.grad(lambda p: lower_level.lower_objective(
      setup, p, frozen, state.lower.batch_stats, None, state.upper.params["backbone"], views,
      jnp.float32(setup.lam))[0])(state.lower.params)
  expected = jax.tree_util.tree_map(lambda a, b: setup.lam * (a - b),
                                    state.lower.params["backbone"], state.upper.params["backbone"])
  assert_trees_close(grads["backbone"], expected)
  assert all(float(jnp.max(jnp.abs(g))) == 0.0
             for g in jax.tree_util.tree_leaves(grads["pretext_head"]))


def test_running_stats_only_change_in_real_training_steps():
  setup = make_setup()
  state = make_state(setup, perturb=False)
  batches = make_batches(setup)
  after, _ = jax.jit(functools.partial(ts.upper_stage, setup))(
      state, batches.hvp, batches.downstream_images, batches.downstream_labels, jax.random.PRNGKey(0))
  # The upper stage's pretext HVPs and θ_P downstream forwards leave θ_P's stats alone...
  assert_trees_close(after.lower.batch_stats, state.lower.batch_stats, rtol=0, atol=0)
  # ... while θ_D's downstream steps do update θ_D's statistics.
  before = ravel_pytree(state.upper.batch_stats)[0]
  assert float(jnp.max(jnp.abs(ravel_pytree(after.upper.batch_stats)[0] - before))) > 0


def test_second_alternation_compiles_nothing():
  setup = make_setup(model=resnet.BisslModel(
      backbone=resnet.resnet18(width_multiplier=1 / 16, cifar_stem=True),
      projector=resnet.MLPHead((8, 8, 4)), predictor=None))
  params, stats = init_params(setup.model, setup.downstream, jax.random.PRNGKey(0), IMG)
  state = bilevel.init_bilevel_state(setup, params, stats)
  alternation = ts.make_alternation_fn(setup)
  compiles = []
  # A program is compiled, or loaded from the persistent cache the test run shares.
  jax.monitoring.register_event_duration_secs_listener(
      lambda name, *a, **k: compiles.append(name) if name.endswith("backend_compile_duration") else None)
  jax.monitoring.register_event_listener(
      lambda name, *a, **k: compiles.append(name) if name.endswith("cache_hits") else None)
  # The defaults check the residual on every 4th upper step: with N_U = 2 the second
  # alternation's last step is the first checked one, and compiles the check (one
  # product) once; nothing compiles after that.
  assert setup.residual_every == 4 and setup.upper_steps == 2
  state, m = alternation(state, make_batches(setup, 0), jax.random.PRNGKey(0))
  assert compiles and int(m["residual_checks"]) == 0
  state, m = alternation(state, make_batches(setup, 1), jax.random.PRNGKey(1))
  assert int(m["residual_checks"]) == 1
  first = len(compiles)
  for i in (2, 3):  # one alternation without a check, one with
    state, m = alternation(state, make_batches(setup, i), jax.random.PRNGKey(i))
    assert int(m["residual_checks"]) == i - 2
  assert len(compiles) == first, "a later alternation recompiled"
  assert int(state.alternation) == 4
  assert int(state.lower.step) == 4 * setup.lower_steps
  assert int(state.upper.step) == 4 * setup.upper_steps
  for key in ("lower_loss", "upper_loss", "theta_distance", "cg_residual", "upper_grad_norm"):
    assert np.isfinite(float(m[key])), key
  assert float(m["theta_distance"]) > 0


def test_nan_in_batch_raises_naming_the_level():
  setup = make_setup()
  state = make_state(setup)
  batches = make_batches(setup)
  bad = batches.pretext.astype(np.float32)
  bad[0, 0, 0, 0, 0] = np.nan
  alternation = ts.make_alternation_fn(setup)
  _, metrics = alternation(state, batches._replace(pretext=bad), jax.random.PRNGKey(0))
  with pytest.raises(NonFiniteError, match="lower level at BiSSL alternation 7"):
    ts.raise_if_nonfinite(metrics, 7)


MULTI_DEVICE_SCRIPT = textwrap.dedent("""
    import os, sys
    sys.path.insert(0, os.getcwd()); sys.path.insert(0, os.path.join(os.getcwd(), 'tests')); sys.path.insert(0, os.path.join(os.getcwd(), 'tests', 'core'))
    import jax, numpy as np
    assert jax.device_count() == 8, jax.devices()
    from bissl_jax.runtime import mesh as parallel
    from bissl_jax.core import alternation as ts
    import test_train_state as t
    setup = t.make_setup(solver='cg', cg_iters=3)
    batches = t.make_batches(setup, b_pre=16, b_down=8)
    out = []
    for devices in (jax.devices()[:1], jax.devices()):
      alternation = ts.make_alternation_fn(setup, parallel.make_mesh(devices))
      state, metrics = alternation(t.make_state(setup), batches, jax.random.PRNGKey(0))
      out.append(jax.device_get((state, metrics)))
    (s1, m1), (s8, m8) = out
    t.assert_trees_close(s1, s8, rtol=2e-4, atol=2e-6)
    np.testing.assert_allclose(m1['upper_loss'], m8['upper_loss'], rtol=1e-5)
    print('MULTI_DEVICE_OK')
""")


def test_one_alternation_on_8_devices_matches_1_device():
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
             JAX_PLATFORMS="cpu")
  root = REPO_ROOT
  proc = subprocess.run([sys.executable, "-c", MULTI_DEVICE_SCRIPT], cwd=root, env=env,
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0 and "MULTI_DEVICE_OK" in proc.stdout, proc.stderr[-4000:]


@pytest.mark.parametrize("unroll", [True, False])
def test_fused_and_per_step_drivers_give_the_same_alternation(unroll):
  # The two ways of running one alternation (one jit for all of it, or one jit per
  # step driven from the host) share every function and every random key.
  batches = make_batches(make_setup())
  out = {}
  for driver in ("fused", "per_step"):
    setup = make_setup(stage_driver=driver, unroll=unroll, solver="cg")
    alternation = ts.make_alternation_fn(setup)
    assert (alternation.fused is not None) == (driver == "fused")
    state, metrics = alternation(make_state(setup), batches, jax.random.PRNGKey(5))
    state, metrics = alternation(state, make_batches(setup, 1), jax.random.PRNGKey(6))
    out[driver] = jax.device_get((state, metrics))
  (s_f, m_f), (s_p, m_p) = out["fused"], out["per_step"]
  assert int(s_f.alternation) == int(s_p.alternation) == 2
  assert_trees_close(s_f, s_p, rtol=1e-5, atol=1e-6)
  for key in m_f:
    np.testing.assert_allclose(m_f[key], m_p[key], rtol=1e-4, atol=1e-6, err_msg=key)
  # The alternation really moved both levels.
  fresh = make_state(make_setup())
  assert float(np.max(np.abs(ravel_pytree(s_f.upper.params)[0]
                              - ravel_pytree(fresh.upper.params)[0]))) > 1e-4


@dataclasses.dataclass(frozen=True)
class FrozenKernelModel(resnet.BisslModel):
  """The tiny model with its first Dense kernel frozen, as LoRA freezes base weights."""

  def trainable(self, params):
    mask = jax.tree_util.tree_map(lambda _: True, params)
    if "backbone" in params:
      mask["backbone"]["Dense_0"]["kernel"] = False
    return mask


def test_frozen_leaves_never_move_and_get_no_state_or_implicit_gradient():
  base = tiny_model()
  model = FrozenKernelModel(backbone=base.backbone, projector=base.projector,
                            predictor=None)
  setup = make_setup(model=model, solver="cg", cg_iters=400, cg_tol=1e-10, unroll=False,
                     lam=0.1, damping=2000.0, upper_steps=1)
  state = make_state(setup)
  kernel = lambda tree: np.asarray(tree["backbone"]["Dense_0"]["kernel"])
  frozen_shape = kernel(state.lower.params).shape
  for level in (state.lower, state.upper):
    shapes = [np.shape(x) for x in jax.tree_util.tree_leaves(level.opt_state)]
    assert frozen_shape not in shapes, "a frozen leaf has optimizer state"
  assert state.solver_state.warm_start["Dense_0"]["kernel"] is None

  # The implicit gradient solves over the trainable leaves only: compare with a dense
  # solve of the Hessian restricted to them.
  batches = make_batches(setup)
  hvp_rng, keys = jax.random.split(jax.random.PRNGKey(4))
  operator, lam = upper_level.prepare_stage(setup, state, batches.hvp, hvp_rng)
  inputs = setup.task.prepare(hvp_rng, batches.hvp)
  train, frozen = partition.split(
      state.lower.params, setup.lower_trainable(state.lower.params))
  flat, unravel = ravel_pytree(train["backbone"])

  def pretext_loss(vec):
    params = partition.merge(
        {**train, "backbone": unravel(vec)}, frozen)
    return setup.task.loss(params, state.lower.batch_stats, inputs)[0]
  hess = np.asarray(jax.hessian(pretext_loss)(flat), np.float64)
  a_mat = np.eye(flat.size) + hess / (setup.lam + setup.damping)
  assert np.linalg.eigvalsh(a_mat).min() > 0.1
  v = jax.tree_util.tree_map(lambda x: jnp.ones_like(x) * 0.01, train["backbone"])
  v_ig, info, _ = upper_level.implicit_gradient(setup, state, operator, lam, v)
  expected = np.linalg.solve(a_mat, np.asarray(ravel_pytree(v)[0], np.float64))
  np.testing.assert_allclose(np.asarray(ravel_pytree(v_ig)[0]), expected, rtol=1e-3, atol=1e-6)
  assert v_ig["Dense_0"]["kernel"] is None

  # A whole alternation moves every trainable leaf and leaves the frozen one bit-identical.
  after, _ = ts.make_alternation_fn(setup)(state, batches, jax.random.PRNGKey(0))
  for before_level, after_level in ((state.lower, after.lower), (state.upper, after.upper)):
    np.testing.assert_array_equal(kernel(after_level.params), kernel(before_level.params))
    assert not np.array_equal(np.asarray(after_level.params["backbone"]["Dense_0"]["bias"]),
                              np.asarray(before_level.params["backbone"]["Dense_0"]["bias"]))


def test_mfac_window_holds_pretext_gradients_and_solves_woodbury():
  setup = make_setup(solver="mfac", damping=0.0, lam=0.01, mfac_history=3, upper_steps=1)
  state = make_state(setup)
  batches = make_batches(setup)
  window = state.solver_state.gradient_window
  assert int(window.count) == 0
  # One lower step stores ∇L_P alone (no proximal term) at the pre-step parameters.
  rng = jax.random.PRNGKey(11)
  after, _ = jax.jit(functools.partial(lower_level.lower_step, setup))(
      state, batches.pretext[0], rng)
  inputs = setup.task.prepare(rng, batches.pretext[0])
  expected = jax.grad(lambda th: setup.task.loss(
      {**state.lower.params, "backbone": th}, state.lower.batch_stats, inputs)[0])(
          state.lower.params["backbone"])
  stored = jax.tree_util.tree_map(lambda w: w[0], after.solver_state.gradient_window.grads)
  assert_trees_close(stored, expected, rtol=1e-3, atol=1e-5)
  # A whole alternation (2 lower steps): v_IG = (I + GᵀG/(mλ))⁻¹ v, G the valid rows,
  # checked against a dense NumPy solve per leaf (the default per-leaf blocks).
  state, _ = ts.make_alternation_fn(setup)(state, batches, jax.random.PRNGKey(0))
  window = state.solver_state.gradient_window
  assert int(window.count) == setup.lower_steps
  v = jax.tree_util.tree_map(lambda x: jnp.linspace(-1.0, 1.0, x.size).reshape(x.shape),
                             state.lower.params["backbone"])
  v_ig, _, _ = upper_level.implicit_gradient(setup, state, None, jnp.float32(setup.lam), v)
  for g, vv, x in zip(jax.tree_util.tree_leaves(window.grads), jax.tree_util.tree_leaves(v),
                      jax.tree_util.tree_leaves(v_ig)):
    rows = np.asarray(g[:setup.lower_steps], np.float64).reshape(setup.lower_steps, -1)
    m = rows.shape[0]
    a = np.eye(rows.shape[1]) + rows.T @ rows / (m * setup.lam)
    np.testing.assert_allclose(np.asarray(x).ravel(),
                               np.linalg.solve(a, np.asarray(vv, np.float64).ravel()),
                               rtol=2e-3, atol=1e-5)


def test_gauss_newton_mode_is_positive_definite_and_driver_independent():
  batches = make_batches(make_setup())
  out = {}
  for driver in ("fused", "per_step"):
    setup = make_setup(hessian_mode="gauss_newton", solver="cg", stage_driver=driver,
                       damping=0.0, lam=0.05)
    out[driver] = jax.device_get(ts.make_alternation_fn(setup)(
        make_state(setup), batches, jax.random.PRNGKey(3)))
  assert_trees_close(out["fused"][0], out["per_step"][0], rtol=1e-5, atol=1e-6)
  # G is PSD, so every direction CG tried has dᵀAd/dᵀd ≥ 1 for A = I + G/λ.
  assert float(out["fused"][1]["cg_min_curvature"]) >= 1.0 - 1e-4


def test_residual_guard_falls_back_to_first_order():
  setup = make_setup(solver="neumann", cg_iters=3, damping=0.0, lam=1e-3, upper_steps=1,
                     residual_guard=True)
  state, batches = make_state(setup), make_batches(setup)
  _, metrics = jax.jit(functools.partial(ts.upper_stage, setup))(
      state, batches.hvp, batches.downstream_images, batches.downstream_labels,
      jax.random.PRNGKey(0))
  # The Neumann series diverges at this tiny λ: the guard replaces v_IG by v.
  assert float(metrics["cg_residual"][0]) > 1.0
  assert bool(metrics["residual_fallback"][0])
  np.testing.assert_allclose(metrics["v_ig_norm"][0], metrics["v_norm"][0], rtol=1e-6)


def test_invalid_solver_combinations_are_rejected_with_the_field():
  with pytest.raises(ValueError, match="head_in_implicit"):
    make_setup(solver="mfac", head_in_implicit=True)
  with pytest.raises(ValueError, match="warm_start=True has no effect"):
    make_setup(solver="layerwise_cg", warm_start=True)
  with pytest.raises(ValueError, match="cg_tol"):
    make_setup(solver="layerwise_cg", cg_tol=1e-3)


def test_adamw_lower_optimizer_moves_a_zero_initialised_leaf():
  # BiSSLight's lower level: AdamW moves a zero leaf (like a LoRA B) at once, where
  # LARS's step is scaled by the leaf's own (zero) norm.
  import optax
  moved = {}
  for name in ("adamw", "lars"):
    setup = make_setup(lower_optimizer_name=name, lower_lr=0.01)
    state = make_state(setup, perturb=False)
    bb = dict(state.lower.params["backbone"])
    bb["Dense_0"] = {**bb["Dense_0"], "kernel": jnp.zeros_like(bb["Dense_0"]["kernel"])}
    params = {**state.lower.params, "backbone": bb}
    state = state.replace(lower=bilevel.init_level(params, state.lower.batch_stats,
                                                   setup.lower_optimizer(params)))
    has_adam = any(isinstance(s, optax.ScaleByAdamState)
                   for s in jax.tree_util.tree_leaves(
                       state.lower.opt_state, is_leaf=lambda x: isinstance(x, optax.ScaleByAdamState)))
    assert has_adam == (name == "adamw")
    batches = make_batches(setup)
    step = jax.jit(functools.partial(lower_level.lower_step, setup))
    for i in range(3):  # step 0 runs at the warm-up's LR 0
      state, _ = step(state, batches.pretext[i % setup.lower_steps], jax.random.PRNGKey(i))
    moved[name] = float(jnp.max(jnp.abs(state.lower.params["backbone"]["Dense_0"]["kernel"])))
  assert moved["adamw"] > 1e-4 and moved["adamw"] > 10 * moved["lars"], moved


def test_residual_every_changes_only_the_residual_metrics():
  # The residual is a diagnostic: skipping it on some steps must leave the
  # trajectory bit-identical, and a checked step must report what k = 1 reports.
  batches = make_batches(make_setup(upper_steps=3))
  out = {}
  for every in (1, 3, 0):
    setup = make_setup(upper_steps=3, residual_every=every, stage_driver="per_step")
    out[every] = jax.device_get(ts.make_alternation_fn(setup)(
        make_state(setup), batches, jax.random.PRNGKey(3)))
  for every in (3, 0):
    for a, b in zip(jax.tree_util.tree_leaves(out[1][0]), jax.tree_util.tree_leaves(out[every][0])):
      np.testing.assert_array_equal(a, b)
  assert int(out[1][1]["residual_checks"]) == 3
  assert int(out[3][1]["residual_checks"]) == 1      # step 2, the stage's last
  assert int(out[0][1]["residual_checks"]) == 0
  assert np.isnan(out[0][1]["cg_residual"]) and np.isnan(out[0][1]["cg_residual_last"])
  np.testing.assert_allclose(out[3][1]["cg_residual"], out[1][1]["cg_residual_last"], rtol=1e-6)


def _compiled_upper_step(every, defer=False):
  setup = make_setup(upper_steps=1, residual_every=every,
                     model=tiny_model(resnet.ResNet(stage_sizes=(1,), block="basic", width=4,
                                                    cifar_stem=True)))
  state, batches = make_state(setup), make_batches(setup)
  operator, lam = upper_level.prepare_stage(setup, state, batches.hvp, jax.random.PRNGKey(0))
  step = jax.jit(functools.partial(
      upper_level.upper_step_deferred if defer else upper_level.upper_step, setup))
  return step.lower(state, operator, lam, batches.downstream_images[0],
                    batches.downstream_labels[0], jax.random.PRNGKey(1)).compile().as_text()


def _convolutions_in_compiled_upper_step(every, defer=False):
  return _compiled_upper_step(every, defer).count(" convolution(")


def test_a_deferred_residual_leaves_no_branch_and_no_product_in_the_step():
  # XLA:CPU runs a lax.cond branch's product several times slower than the same
  # product outside one, so with 1 < k the per-step driver compiles the step without
  # the residual (no conditional, as few convolutions as k = 0) and checks due steps
  # in a call of its own; k = 1, the guard and M-FAC keep the residual in the step.
  assert make_setup(residual_every=4).residual_policy.deferred
  assert not make_setup(residual_every=1).residual_policy.deferred
  assert not make_setup(residual_every=4, residual_guard=True).residual_policy.deferred
  assert not make_setup(residual_every=0).residual_policy.deferred
  with_cond = _compiled_upper_step(4)
  deferred = _compiled_upper_step(4, defer=True)
  assert "conditional(" in with_cond and "conditional(" not in deferred
  assert deferred.count(" convolution(") == _convolutions_in_compiled_upper_step(0)


def test_an_unchecked_residual_costs_no_operator_product():
  # With residual_every=0 the solver's own residual product must be dead code
  # (nothing reads it), so the compiled step has fewer convolutions than with 1.
  assert _convolutions_in_compiled_upper_step(0) < _convolutions_in_compiled_upper_step(1)
