"""Thesis variants: λ schedules, learnable λ, implicit gradient over the pretext head."""
import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from bissl_jax.core.params import init_params
from bissl_jax.core import state as bilevel
from bissl_jax.core import lam_schedules
from bissl_jax.core import alternation as ts
from bissl_jax.core import upper as upper_level

import test_train_state as tt


# ----------------------------------------------------------------------------- schedules

@pytest.mark.parametrize("name", ["cosine_decay", "cosine_increase", "exp_increase"])
def test_schedules_match_closed_form(name):
  lam_max, lam_min, big_t, alpha = 0.01, 1e-8, 101, 10.0
  lam = lambda t: float(lam_schedules.scheduled_lam(name, t, lam_max=lam_max, alternations=big_t,
                                                   lam_min=lam_min, alpha=alpha))
  mid = (big_t - 1) // 2
  span = lam_max - lam_min
  if name == "cosine_decay":
    expected = (lam_max, lam_min + span / 2, lam_min)
  elif name == "cosine_increase":
    expected = (lam_min, lam_min + span / 2, lam_max)
  else:
    expected = (lam_min, lam_min + span * (1 - math.exp(-alpha / 2)) / (1 - math.exp(-alpha)),
                lam_max)
  got = (lam(0), lam(mid), lam(big_t - 1))
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-12)


def test_unknown_schedule_is_rejected():
  with pytest.raises(ValueError, match="lam_schedule"):
    lam_schedules.scheduled_lam("linear", 0, lam_max=1.0, alternations=10)


# ----------------------------------------------------------------------------- learnable λ

def test_rho_gradient_matches_finite_differences_through_exact_lower_solution():
  rng = np.random.default_rng(0)
  n = 6
  m = rng.normal(size=(n, n))
  q = m @ m.T / n + 0.1 * np.eye(n)          # lower Hessian (convex quadratic)
  c = rng.normal(size=n)
  theta_d = rng.normal(size=n)
  target = rng.normal(size=n)
  rho = 0.3

  def theta_star(r):  # argmin ½θᵀQθ + cᵀθ + λ/2‖θ − θ_D‖², λ = softplus(ρ)
    lam = np.log1p(np.exp(r))
    return np.linalg.solve(q + lam * np.eye(n), lam * theta_d - c)

  def upper(r):  # F = L_D(θ*(θ_D, λ(ρ))) with L_D(θ) = ½‖θ − t‖²
    return 0.5 * np.sum((theta_star(r) - target) ** 2)

  eps = 1e-5
  fd = (upper(rho + eps) - upper(rho - eps)) / (2 * eps)
  theta_p = theta_star(rho)
  lam = np.log1p(np.exp(rho))
  v = theta_p - target
  v_ig = np.linalg.solve(np.eye(n) + q / lam, v)   # damping 0: the exact implicit gradient
  closed = lam_schedules.rho_gradient(jnp.float32(rho), jnp.asarray(theta_d, jnp.float32),
                                     jnp.asarray(theta_p, jnp.float32),
                                     jnp.asarray(v_ig, jnp.float32), lam_damping=0.0)
  np.testing.assert_allclose(float(closed), fd, rtol=1e-3)


def test_learnable_lam_is_trained_and_logged():
  setup = tt.make_setup(learnable_lam=True, lam=0.05, upper_lr=0.5, damping=0.0, lam_damping=0.0)
  state = tt.make_state(setup)
  rho0 = float(state.upper.params["lam_rho"])
  np.testing.assert_allclose(float(jax.nn.softplus(rho0)), 0.05, rtol=1e-5)
  alternation = ts.make_alternation_fn(setup)
  logged = []
  for i in range(2):
    state, metrics = alternation(state, tt.make_batches(setup, i), jax.random.PRNGKey(i))
    logged.append(float(metrics["lam"]))
  assert float(state.upper.params["lam_rho"]) != rho0
  # The logged λ is the one used in the last upper step of each alternation.
  assert logged[0] != logged[1]
  assert all(np.isfinite(logged))


# ----------------------------------------------------------------------------- pretext head in the IJ

@dataclasses.dataclass(frozen=True)
class QuadraticTask:
  """L_P = ½ xᵀMx + bᵀx over x = ravel({'backbone', 'pretext_head'}): its Hessian is M."""
  m: tuple
  b: tuple
  has_target = False

  def prepare(self, rng, images):
    return images

  def loss(self, params, batch_stats, views, target=None):
    x, _ = ravel_pytree({"backbone": params["backbone"], "pretext_head": params["pretext_head"]})
    m, b = jnp.asarray(self.m), jnp.asarray(self.b)
    return 0.5 * x @ m @ x + b @ x, {"batch_stats": batch_stats, "metrics": {}}


def quadratic_setup(block_diagonal: bool, solver="cg", **kw):
  setup = tt.make_setup(upper_steps=1, solver=solver, **kw)
  params, _ = init_params(setup.model, setup.downstream, jax.random.PRNGKey(0), tt.IMG)
  n_theta = ravel_pytree(params["backbone"])[0].size
  n = n_theta + ravel_pytree(params["pretext_head"])[0].size
  rng = np.random.default_rng(1)
  a = rng.normal(size=(n, n)) / np.sqrt(n)
  m = a @ a.T + 0.5 * np.eye(n)
  if block_diagonal:
    m[:n_theta, n_theta:] = 0.0
    m[n_theta:, :n_theta] = 0.0
  task = QuadraticTask(m=tuple(map(tuple, m.astype(np.float32))),
                       b=tuple(rng.normal(size=n).astype(np.float32)))
  return dataclasses.replace(setup, task=task), m, n_theta


def run_upper(setup):
  state = tt.make_state(setup)
  batches = tt.make_batches(setup)
  new_state, _ = jax.jit(functools.partial(ts.upper_stage, setup))(
      state, batches.hvp, batches.downstream_images, batches.downstream_labels,
      jax.random.PRNGKey(0))
  x = tt.augment.downstream_train_view(jax.random.split(jax.random.split(jax.random.PRNGKey(0))[1], 1)[0],
                                       batches.downstream_images[0], size=tt.IMG)
  v = jax.grad(lambda th: upper_level.downstream_loss(setup, th, state.upper.params["downstream_head"],
                                             state.lower.batch_stats["backbone"], x,
                                             batches.downstream_labels[0])[0])(
      state.lower.params["backbone"])
  return np.asarray(ravel_pytree(new_state.solver_state.warm_start)[0], np.float64), np.asarray(
      ravel_pytree(v)[0], np.float64)


def test_head_inclusive_ij_matches_dense_block_solve():
  setup, m, n_theta = quadratic_setup(False, solver="cg", head_in_implicit=True, cg_iters=500,
                                      cg_tol=1e-10, unroll=False, lam=0.1, damping=0.4)
  v_ig, v = run_upper(setup)
  n = m.shape[0]
  block = np.zeros((n, n))
  block[:n_theta, :n_theta] = np.eye(n_theta)
  a_mat = block + m / (setup.lam + setup.damping)
  rhs = np.concatenate([v, np.zeros(n - n_theta)])
  expected = np.linalg.solve(a_mat, rhs)[:n_theta]
  np.testing.assert_allclose(v_ig, expected, rtol=1e-3, atol=1e-6)
  # ... and with a coupled Hessian it really differs from the fixed-head solution.
  fixed = np.linalg.solve(np.eye(n_theta) + m[:n_theta, :n_theta] / (setup.lam + setup.damping), v)
  assert np.max(np.abs(expected - fixed)) > 1e-4


def test_head_inclusive_ij_reduces_to_fixed_head_without_cross_hessian():
  kw = dict(cg_iters=500, cg_tol=1e-10, unroll=False, lam=0.1, damping=0.4)
  setup, m, n_theta = quadratic_setup(True, solver="cg", head_in_implicit=True, **kw)
  v_ig_head, v = run_upper(setup)
  fixed = np.linalg.solve(np.eye(n_theta) + m[:n_theta, :n_theta] / (setup.lam + setup.damping), v)
  np.testing.assert_allclose(v_ig_head, fixed, rtol=1e-3, atol=1e-6)
  v_ig_fixed, _ = run_upper(dataclasses.replace(setup, head_in_implicit=False))
  np.testing.assert_allclose(v_ig_head, v_ig_fixed, rtol=1e-3, atol=1e-6)


def test_layerwise_cg_head_inclusive_equals_fixed_head_exactly():
  # Per-leaf α is 0 on the pretext-head leaves (their residual starts at 0), so
  # layer-wise CG never moves them: the head-inclusive IJ is the fixed-head IJ.
  setup, _, _ = quadratic_setup(False, solver="layerwise_cg", head_in_implicit=True, cg_iters=5)
  with_head, _ = run_upper(setup)
  without, _ = run_upper(dataclasses.replace(setup, head_in_implicit=False))
  np.testing.assert_allclose(with_head, without, rtol=1e-5, atol=1e-7)


# ----------------------------------------------------------------------------- default path

def test_switches_off_is_bit_identical_to_default():
  base = tt.make_setup()
  values = {name: getattr(base, name) for name in bilevel.BisslSetup.field_names()}
  values.update(lam_schedule="none", learnable_lam=False, head_in_implicit=False,
                lam_damping=10.0, lam_exp_alpha=100.0)
  configured = bilevel.BisslSetup.from_config(base.model, base.task,
                                              ml_collections.ConfigDict(values),
                                              downstream=base.downstream)
  assert configured == dataclasses.replace(base, lam_damping=10.0, lam_exp_alpha=100.0)
  out = []
  for setup in (base, configured):
    state, _ = ts.make_alternation_fn(setup)(tt.make_state(setup), tt.make_batches(setup),
                                            jax.random.PRNGKey(0))
    out.append(jax.device_get(state))
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_array_equal(a, b), out[0], out[1])
