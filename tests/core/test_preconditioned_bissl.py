"""config.bissl.preconditioner: M-FAC's window preconditions the cg/minres upper solve."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bissl_jax import implicit
from bissl_jax.config_validation import ConfigError, validate_config
from bissl_jax.core import alternation as ts
from bissl_jax.core import upper as upper_level
from config_helpers import override
from configs import digits_simclr
from test_train_state import make_batches, make_setup, make_state


@pytest.mark.slow  # one alternation plus three solves: about a minute on a shared 2-core CPU
def test_one_alternation_runs_with_minres_and_the_mfac_preconditioner():
  setup = make_setup(solver="minres", preconditioner="mfac", cg_iters=3, damping=1.0,
                     lam=0.05, upper_steps=1)
  state = make_state(setup)
  assert int(state.solver_state.gradient_window.count) == 0   # kept for the preconditioner
  state, metrics = ts.make_alternation_fn(setup)(state, make_batches(setup),
                                                 jax.random.PRNGKey(0))
  metrics = jax.device_get(metrics)
  window = state.solver_state.gradient_window
  assert int(window.count) == setup.lower_steps               # the lower steps filled it
  assert np.all(np.isfinite(metrics["cg_residual"][~np.isnan(metrics["cg_residual"])]))
  assert not np.any(metrics["upper_nonfinite"])

  # The preconditioner is (I + F/(λ+δ))⁻¹, F = GᵀG/m of the stored rows, per leaf:
  # checked against a dense NumPy solve.
  lam = jnp.float32(setup.lam)
  precondition = upper_level.window_preconditioner(setup, state, lam)
  v = jax.tree_util.tree_map(lambda x: jnp.linspace(-1.0, 1.0, x.size).reshape(x.shape),
                             state.lower.params["backbone"])
  for g, vv, z in zip(jax.tree_util.tree_leaves(window.grads), jax.tree_util.tree_leaves(v),
                      jax.tree_util.tree_leaves(precondition(v))):
    rows = np.asarray(g[:setup.lower_steps], np.float64).reshape(setup.lower_steps, -1)
    a = np.eye(rows.shape[1]) + rows.T @ rows / (rows.shape[0] * (setup.lam + setup.damping))
    np.testing.assert_allclose(np.asarray(z).ravel(),
                               np.linalg.solve(a, np.asarray(vv, np.float64).ravel()),
                               rtol=2e-3, atol=1e-5)

  # The upper step's solve is preconditioned MINRES on the stage's damped Hessian.
  operator, lam = upper_level.prepare_stage(setup, state, make_batches(setup).hvp,
                                            jax.random.PRNGKey(1))
  v_ig, info, _ = upper_level.implicit_gradient(setup, state, operator, lam, v)
  expected, _ = implicit.implicit_solve(
      upper_level.stage_matvec(setup, state, operator), v, lam=lam, damping=setup.damping,
      solver="minres", maxiter=setup.cg_iters, preconditioner=precondition)
  plain, _ = implicit.implicit_solve(
      upper_level.stage_matvec(setup, state, operator), v, lam=lam, damping=setup.damping,
      solver="minres", maxiter=setup.cg_iters)
  flat = lambda t: np.concatenate([np.ravel(x) for x in jax.tree_util.tree_leaves(t)])
  np.testing.assert_allclose(flat(v_ig), flat(expected), rtol=1e-4, atol=1e-6)
  assert np.abs(flat(v_ig) - flat(plain)).max() > 1e-4          # M is actually applied
  assert not bool(info.nonfinite)


def test_a_solver_that_cannot_take_a_preconditioner_is_refused_naming_the_fields():
  for solver in ("layerwise_cg", "neumann", "mfac"):
    with pytest.raises(ValueError, match=r"config\.bissl\.preconditioner='mfac'.*"
                                         r"config\.bissl\.solver"):
      make_setup(solver=solver, preconditioner="mfac")
  with pytest.raises(ValueError, match="head_in_implicit"):
    make_setup(solver="cg", preconditioner="mfac", head_in_implicit=True)
  setup = make_setup()                                # the default: no preconditioner,
  assert setup.preconditioner == "none" and setup.window_spec is None   # no window kept
  # and before any compute, through config validation (the CLI's exit status 2):
  with pytest.raises(ConfigError, match=r"bissl\.preconditioner.*cg.*minres"):
    validate_config(override(digits_simclr.get_config(),
                             **{"bissl.preconditioner": "mfac",
                                "bissl.solver": "layerwise_cg"}))
  with pytest.raises(ConfigError, match=r"bissl\.preconditioner"):
    validate_config(override(digits_simclr.get_config(), **{"bissl.preconditioner": "kfac"}))
  config = digits_simclr.get_config()
  config.bissl_variants = {}      # its variants change the solver (e.g. to mfac itself)
  validate_config(override(config, **{"bissl.preconditioner": "mfac", "bissl.solver": "minres"}))
