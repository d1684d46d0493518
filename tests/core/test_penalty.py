"""The first-order penalty upper step (F2SA) against a closed-form implicit gradient, in
one BiSSL alternation, and the implicit path left as it was."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from bissl_jax.config_validation import ConfigError, validate_config
from bissl_jax.core import alternation as ts
from bissl_jax.core import penalty
from bissl_jax.core import state as bilevel
from bissl_jax.runtime import mesh as parallel
from configs import common
from tests.core import test_train_state as tt


def _quadratic_problem(n=6, m=4, seed=0):
  """L_P(θ) = ½θᵀHθ + bᵀθ (H indefinite), L_D(θ) = ½‖Aθ − c‖², and θ_D."""
  rng = np.random.default_rng(seed)
  q, _ = np.linalg.qr(rng.normal(size=(n, n)))
  hess = q @ np.diag(np.linspace(-0.4, 2.0, n)) @ q.T
  return (hess, rng.normal(size=n), rng.normal(size=(m, n)) / np.sqrt(n),
          rng.normal(size=m), rng.normal(size=n))


def _penalty_error(sigma, lam, damping, steps=400):
  """‖h − v_IG‖/‖v_IG‖ of the penalty method, z run to convergence with its own code."""
  hess, b, a, c, theta_d = _quadratic_problem()
  n = hess.shape[0]
  # Independent reference (float64): the lower solution and the damped implicit gradient.
  theta_p = np.linalg.solve(hess + lam * np.eye(n), lam * theta_d - b)
  v = a.T @ (a @ theta_p - c)
  v_ig = np.linalg.solve(np.eye(n) + hess / (lam + damping), v)

  f32 = lambda x: jnp.asarray(x, jnp.float32)
  hess_j, b_j, a_j, c_j = f32(hess), f32(b), f32(a), f32(c)
  theta_p_j, theta_d_j = f32(theta_p), f32(theta_d)

  def gradient_fn(z):
    return penalty.penalised_gradient(sigma, lam, damping, hess_j @ z + b_j,
                                      a_j.T @ (a_j @ z - c_j), z, theta_d_j, theta_p_j)
  tx = optax.sgd(0.2)
  start = bilevel.PenaltyState(theta_p_j, tx.init(theta_p_j))
  z = jax.jit(lambda s: penalty.run_z_steps(tx, s, gradient_fn, steps, unroll=False))(start).z
  h = np.asarray(penalty.hypergradient(sigma, lam, damping, theta_p_j, z), np.float64)
  return np.linalg.norm(h - v_ig) / np.linalg.norm(v_ig)


@pytest.mark.parametrize("lam,damping", [(1.2, 0.0), (0.7, 0.5)])
def test_penalty_hypergradient_converges_to_the_implicit_gradient(lam, damping):
  # δ = 0 is Kwon et al.'s method; δ > 0 approaches the damped (I + H/(λ+δ))⁻¹ v.
  errors = [_penalty_error(sigma, lam, damping) for sigma in (1.0, 0.1, 0.01)]
  assert errors[0] > 0.05  # a large σ is visibly biased: the test can fail
  assert errors[1] < 0.3 * errors[0] and errors[2] < 0.3 * errors[1], errors  # O(σ)
  assert errors[2] < 0.02, errors


def _penalty_setup(**overrides):
  return tt.make_setup(**{**dict(solver="cg", upper_method="penalty", penalty_sigma=0.1,
                                 penalty_inner_steps=3, penalty_lr=0.01,
                                 stage_driver="fused", unroll=False), **overrides})


@pytest.mark.slow  # compiles both drivers' alternation (over a minute on 2 shared cores)
def test_penalty_alternation_is_finite_moves_theta_d_and_drivers_agree():
  setup = _penalty_setup()
  state = tt.make_state(setup, perturb=False)
  assert isinstance(state, bilevel.PenaltyBilevelState)
  batches, rng = tt.make_batches(setup), jax.random.PRNGKey(1)
  new_state, metrics = ts.make_alternation_fn(setup)(state, batches, rng)
  assert not bool(metrics["upper_nonfinite"]) and not bool(metrics["lower_nonfinite"])
  assert np.isfinite(float(metrics["v_ig_norm"])) and float(metrics["v_ig_norm"]) > 0
  assert float(metrics["penalty_gap"]) > 0  # z left θ_P
  assert jax.tree_util.tree_all(jax.tree_util.tree_map(
      lambda x: bool(np.all(np.isfinite(np.asarray(x)))), new_state))
  moved = jax.tree_util.tree_map(lambda a, b: float(jnp.max(jnp.abs(a - b))),
                                 new_state.upper.params["backbone"],
                                 state.upper.params["backbone"])
  assert max(jax.tree_util.tree_leaves(moved)) > 0
  assert int(new_state.upper.step) == setup.upper_steps
  # The per-step driver runs the same step functions with the same keys.
  per_step = _penalty_setup(stage_driver="per_step")
  other, _ = ts.make_alternation_fn(per_step)(tt.make_state(per_step, perturb=False),
                                              batches, rng)
  tt.assert_trees_close(other.upper.params, new_state.upper.params, rtol=1e-5, atol=1e-6)
  tt.assert_trees_close(other.penalty.z, new_state.penalty.z, rtol=1e-5, atol=1e-6)


@pytest.mark.slow  # two fused alternations (about 50 s on 2 shared cores)
def test_implicit_path_ignores_the_penalty_fields():
  # The default path builds the state it always built (no penalty field, so its
  # checkpoints keep their structure) and the penalty settings change nothing.
  default = tt.make_setup(stage_driver="fused", unroll=False)
  changed = tt.make_setup(stage_driver="fused", unroll=False, penalty_sigma=3.0,
                          penalty_inner_steps=7, penalty_lr=0.5, penalty_momentum=0.0)
  assert default.upper_method == "implicit"
  state = tt.make_state(default)
  assert type(state) is bilevel.BilevelState
  mesh, batches, rng = parallel.make_mesh(), tt.make_batches(default), jax.random.PRNGKey(4)
  a, ma = ts.make_alternation_fn(default, mesh)(state, batches, rng)
  b, mb = ts.make_alternation_fn(changed, mesh)(tt.make_state(changed), batches, rng)
  jax.tree_util.tree_map(lambda x, y: np.testing.assert_array_equal(np.asarray(x),
                                                                    np.asarray(y)), a, b)
  assert "penalty_gap" not in ma and set(ma) == set(mb)


@pytest.mark.parametrize("field,value,needle", [
    ("upper_method", "f2sa", "upper_method"),
    ("penalty_sigma", 0.0, "penalty_sigma"),
    ("penalty_inner_steps", 0, "penalty_inner_steps"),
    ("penalty_lr", -1.0, "penalty_lr"),
    ("penalty_momentum", 1.0, "penalty_momentum"),
])
def test_bad_penalty_values_stop_with_a_message(field, value, needle):
  config = common.base_config()
  config.bissl[field] = value
  with pytest.raises(ConfigError, match=needle):
    validate_config(config)


@pytest.mark.parametrize("overrides,needle", [
    ({"head_in_implicit": True}, "head_in_implicit"),
    ({"solver": "mfac"}, "gradient"),
    ({"solver": "cg", "preconditioner": "mfac"}, "preconditioner"),
    ({"residual_guard": True}, "residual_guard"),
])
def test_penalty_refuses_settings_it_would_ignore(overrides, needle):
  bissl = dict(common.base_config().bissl.to_dict(), upper_method="penalty", **overrides)
  problems = bilevel.combination_problems(bissl)
  assert any(needle in p and "upper_method" in p for p in problems), problems


def test_old_workdirs_stay_reusable():
  # A config at the defaults records none of the new fields (so its provenance equals
  # what older code recorded); choosing the penalty method records it.
  from bissl_jax.pipeline import provenance
  names = ("upper_method", "penalty_sigma", "penalty_inner_steps", "penalty_lr",
           "penalty_momentum")
  config = common.base_config()
  for name in names:
    assert provenance.ADDED_LATER[f"bissl.{name}"] == config.bissl[name]
  assert not set(provenance.config_fields(config, ("bissl",))) & {f"bissl.{n}" for n in names}
  config.bissl.upper_method = "penalty"
  assert provenance.config_fields(config, ("bissl",))["bissl.upper_method"] == "penalty"


@pytest.mark.slow  # three short BiSSL stage runs of the digits runlocal config
def test_penalty_bissl_stage_checkpoints_and_resumes(tmp_path):
  # Through config: the stage builds the penalty state, checkpoints its z and resumes
  # to the state of an uninterrupted run.
  import contextlib
  import io
  from bissl_jax.pipeline import bissl_stage, build_context, load_data
  from configs import digits_simclr
  config = digits_simclr.get_config("runlocal")
  config.bissl.upper_method = "penalty"
  splits, pretext_set = load_data(config, need_pretext=True, need_downstream=True)
  ctx = build_context(config, str(tmp_path / "work"))
  params, stats = ctx.init_variables(jax.random.key(0))
  warm = {"params": params, "batch_stats": stats}

  def run(directory, callback=None):
    with contextlib.redirect_stdout(io.StringIO()):
      return bissl_stage.run_bissl(ctx, warm, pretext_set, splits["train"], seed=0,
                                   directory=str(tmp_path / directory), name="bissl/test",
                                   callback=callback)

  def crash_after_three(done, *_):
    if done == 3:
      raise RuntimeError("boom")
  full = run("full").state
  assert isinstance(full, bilevel.PenaltyBilevelState)
  assert int(full.upper.step) == config.bissl.alternations * config.bissl.upper_steps
  with pytest.raises(RuntimeError, match="boom"):
    run("resumed", crash_after_three)
  resumed = run("resumed").state
  assert jax.tree_util.tree_structure(resumed) == jax.tree_util.tree_structure(full)
  tt.assert_trees_close(resumed, full, rtol=1e-6, atol=1e-7)
