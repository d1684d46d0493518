"""solver='kfac' in BiSSL: one alternation, and config validation."""
import jax
import numpy as np
import pytest

from bissl_jax.config_validation import ConfigError, validate_config
from bissl_jax.core import alternation as ts
from bissl_jax.core import upper as upper_level
from config_helpers import override
from configs import digits_simclr
from test_train_state import make_batches, make_setup, make_state



@pytest.mark.slow  # one alternation on the tiny setup: about 100 s on a shared 2-core CPU
def test_one_bissl_alternation_with_kfac_is_finite_and_moves_the_head():
  setup = make_setup(solver="kfac", damping=1.0, lam=0.05, upper_steps=1)
  state = make_state(setup)
  # The stage's factor covers the backbone's Dense layer (kernel and bias);
  # BatchNorm's scale and bias have no block and keep x = v.
  factor, _ = upper_level.prepare_stage(setup, state, make_batches(setup).hvp,
                                        jax.random.PRNGKey(1))
  assert len(factor.layers) == 1 and factor.layers[0].bias is not None
  new_state, metrics = ts.make_alternation_fn(setup)(state, make_batches(setup),
                                                     jax.random.PRNGKey(0))
  metrics = jax.device_get(metrics)
  assert not np.any(metrics["upper_nonfinite"]) and not np.any(metrics["lower_nonfinite"])
  checked = metrics["cg_residual"][~np.isnan(metrics["cg_residual"])]
  assert np.all(checked < 1e-4)          # the exact inverse of its own model
  head_moves = jax.tree_util.tree_map(
      lambda a, b: float(np.abs(np.asarray(a) - np.asarray(b)).max()),
      new_state.upper.params["downstream_head"], state.upper.params["downstream_head"])
  assert max(jax.tree_util.tree_leaves(head_moves)) > 0
  assert all(np.all(np.isfinite(np.asarray(l)))
             for l in jax.tree_util.tree_leaves(new_state.upper.params))


def _config(**fields):
  config = digits_simclr.get_config()
  config.bissl_variants = {}      # its variants change the solver
  return override(config, **{f"bissl.{k}": v for k, v in fields.items()})


def test_config_validation_accepts_kfac_and_refuses_it_over_the_head():
  validate_config(_config(solver="kfac"))
  setup = make_setup(solver="kfac")
  assert setup.window_spec is None and setup.solver_spec.is_curvature_model
  with pytest.raises(ValueError, match="head_in_implicit"):
    make_setup(solver="kfac", head_in_implicit=True)
  with pytest.raises(ConfigError, match=r"bissl\.head_in_implicit"):
    validate_config(_config(solver="kfac", head_in_implicit=True))
  # as a preconditioner: of cg/minres only
  validate_config(_config(solver="cg", preconditioner="kfac"))
  with pytest.raises(ConfigError, match=r"bissl\.preconditioner"):
    validate_config(_config(solver="neumann", preconditioner="kfac"))


@pytest.mark.slow  # builds the stage's Hessian and K-FAC model eagerly: about 40 s
def test_kfac_preconditions_the_minres_upper_solve():
  from bissl_jax import implicit
  from bissl_jax.implicit.solvers import kfac
  setup = make_setup(solver="minres", preconditioner="kfac", cg_iters=3, damping=1.0,
                     lam=0.05, upper_steps=1)
  state = make_state(setup)
  assert setup.window_spec is None and state.solver_state.gradient_window is None
  operator, lam = upper_level.prepare_stage(setup, state, make_batches(setup).hvp,
                                            jax.random.PRNGKey(1))
  _, factor = operator
  v = jax.tree_util.tree_map(lambda x: jax.numpy.linspace(-1.0, 1.0, x.size).reshape(x.shape),
                             state.lower.params["backbone"])
  v_ig, info, _ = upper_level.implicit_gradient(setup, state, operator, lam, v)
  hessian = upper_level.stage_matvec(setup, state, operator)
  precondition = lambda r: kfac.solve(factor, r, lam + setup.damping)[0]
  expected, _ = implicit.implicit_solve(hessian, v, lam=lam, damping=setup.damping,
                                        solver="minres", maxiter=setup.cg_iters,
                                        preconditioner=precondition)
  plain, _ = implicit.implicit_solve(hessian, v, lam=lam, damping=setup.damping,
                                     solver="minres", maxiter=setup.cg_iters)
  flat = lambda t: np.concatenate([np.ravel(x) for x in jax.tree_util.tree_leaves(t)])
  np.testing.assert_allclose(flat(v_ig), flat(expected), rtol=1e-4, atol=1e-6)
  assert np.abs(flat(v_ig) - flat(plain)).max() > 1e-4          # M is actually applied
  assert not bool(info.nonfinite)


def test_ekfac_is_a_solver_and_a_preconditioner_of_the_upper_stage():
  validate_config(_config(solver="ekfac"))
  validate_config(_config(solver="minres", preconditioner="ekfac"))
  setup = make_setup(solver="ekfac", damping=1.0, lam=0.05, upper_steps=1)
  state = make_state(setup)
  factor, _ = upper_level.prepare_stage(setup, state, make_batches(setup).hvp,
                                        jax.random.PRNGKey(1))
  # EK-FAC's eigenvalues: one per (A, G) eigenvector pair, not K-FAC's products.
  (scales,) = factor.scales
  assert scales.shape == (factor.a_vals[0].size, factor.g_vals[0].size)
  products = np.outer(factor.a_vals[0], factor.g_vals[0])
  assert np.all(np.asarray(scales) >= 0) and not np.allclose(scales, products, rtol=1e-3)
