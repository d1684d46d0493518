"""The per-step driver's donated steps and M-FAC's factorisation built once per stage.

The reference in these tests is the step-by-step path without either: undonated jitted
lower and upper steps, and M-FAC solves that form their Gram matrices and factorise
them inside every upper step (``operator=None``).
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bissl_jax.core import alternation as ts
from bissl_jax.core import lower as lower_level
from bissl_jax.core import upper as upper_level
from bissl_jax.core.state import current_lam
from bissl_jax.implicit.solvers import mfac
import test_train_state as tt

MFAC = dict(solver="mfac", damping=0.1, lam=0.01, mfac_history=3, upper_steps=3)


def _reference_alternation(setup, state, batches, rng):
  """One alternation by hand: no donation, no stage-wide factorisation."""
  keys = ts.alternation_keys(rng, setup.lower_steps, setup.upper_steps)
  lower = jax.jit(functools.partial(lower_level.lower_step, setup))
  upper = jax.jit(functools.partial(upper_level.upper_step, setup))
  lower_metrics, upper_metrics = [], []
  for images, key in zip(batches.pretext, keys.lower):
    state, m = lower(state, images, key)
    lower_metrics.append(m)
  lam = current_lam(setup, state)
  for images, labels, key in zip(batches.downstream_images, batches.downstream_labels,
                                 keys.upper):
    state, m = upper(state, None, lam, images, labels, key)
    upper_metrics.append(m)
  state = state.replace(alternation=state.alternation + 1)
  stack = lambda ms: jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *ms)
  return state, ts.summarize_metrics(stack(lower_metrics), stack(upper_metrics), state)


def _assert_identical(a, b):
  jax.tree_util.tree_map(lambda x, y: np.testing.assert_array_equal(np.asarray(x),
                                                                    np.asarray(y)), a, b)


@pytest.mark.parametrize("every", [1, 2])
def test_mfac_per_step_driver_is_bit_identical_to_the_undonated_unfactored_path(every):
  setup = tt.make_setup(stage_driver="per_step", residual_every=every, **MFAC)
  batches = [tt.make_batches(setup, seed) for seed in (0, 1)]
  ref, got = tt.make_state(setup), tt.make_state(setup)
  alternation = ts.make_alternation_fn(setup)
  for i, b in enumerate(batches):  # two alternations: the window rolls over (m = 3)
    ref, ref_metrics = _reference_alternation(setup, ref, b, jax.random.PRNGKey(i))
    got, metrics = alternation(got, b, jax.random.PRNGKey(i))
  _assert_identical(jax.device_get(got), jax.device_get(ref))
  if every == 1:  # every metric, M-FAC's own residual and curvature included
    _assert_identical(jax.device_get(metrics), jax.device_get(ref_metrics))
  else:  # residuals on the due steps only, measured on the same model
    # Upper steps 3, 4, 5 of the run: 3 and 5 are due (every 2nd, counted from 0).
    assert int(metrics["residual_checks"]) == int(ref_metrics["residual_checks"]) == 2
    for key in ("upper_loss", "v_ig_norm", "upper_grad_norm", "lower_loss", "theta_distance"):
      np.testing.assert_array_equal(metrics[key], ref_metrics[key], err_msg=key)
    np.testing.assert_allclose(metrics["cg_residual_last"], ref_metrics["cg_residual_last"],
                               rtol=1e-3, atol=1e-9)


def test_mfac_fused_driver_matches_the_reference_path():
  setup = tt.make_setup(stage_driver="fused", residual_every=1, **MFAC)
  batches = tt.make_batches(setup)
  ref, ref_metrics = _reference_alternation(setup, tt.make_state(setup), batches,
                                            jax.random.PRNGKey(3))
  got, metrics = ts.make_alternation_fn(setup)(tt.make_state(setup), batches,
                                               jax.random.PRNGKey(3))
  # One jit for the whole alternation fuses differently: float32 rounding only.
  tt.assert_trees_close(jax.device_get(got), jax.device_get(ref), rtol=1e-5, atol=1e-6)
  for key in ref_metrics:
    np.testing.assert_allclose(metrics[key], ref_metrics[key], rtol=1e-4, atol=1e-6,
                               err_msg=key)


def test_the_per_step_driver_donates_its_steps_state_and_keeps_the_callers():
  setup = tt.make_setup(stage_driver="per_step", **MFAC)
  state, batches = tt.make_state(setup), tt.make_batches(setup)
  alternation = ts.make_alternation_fn(setup)
  new_state, _ = alternation(state, batches, jax.random.PRNGKey(0))
  # The caller's state is copied once, never donated: it stays readable.
  assert not any(x.is_deleted() for x in jax.tree_util.tree_leaves(state))
  assert not any(x.is_deleted() for x in jax.tree_util.tree_leaves(new_state))
  owned = ts.copy_state(new_state)
  window = owned.solver_state.gradient_window.grads
  pointers = [x.unsafe_buffer_pointer() for x in jax.tree_util.tree_leaves(window)]
  after, _ = alternation.steps.lower_step(owned, batches.pretext[0], jax.random.PRNGKey(1))
  assert all(x.is_deleted() for x in jax.tree_util.tree_leaves(owned))
  # The gradient goes into the window in place: the same buffers, one more row written.
  new_window = after.solver_state.gradient_window.grads
  assert [x.unsafe_buffer_pointer() for x in jax.tree_util.tree_leaves(new_window)] == pointers
  assert int(after.solver_state.gradient_window.count) == setup.lower_steps + 1
  step_state = ts.copy_state(after)
  operator, lam = alternation.steps.prepare_stage(step_state, batches.hvp, jax.random.PRNGKey(2))
  alternation.steps.upper_step(step_state, operator, lam, batches.downstream_images[0],
                               batches.downstream_labels[0], jax.random.PRNGKey(3))
  # Donated, except what the step never reads (the last v_IG, which it replaces:
  # jit drops an unused argument, and so does not donate it).
  read = (step_state.upper, step_state.lower, step_state.solver_state.gradient_window)
  assert all(x.is_deleted() for x in jax.tree_util.tree_leaves(read))


def _count_primitive(jaxpr, name):
  """Equations named ``name`` in ``jaxpr`` and every jaxpr nested in its parameters."""
  def inner(value):
    if isinstance(value, (tuple, list)):
      return sum(inner(v) for v in value)
    value = getattr(value, "jaxpr", value)
    return _count_primitive(value, name) if hasattr(value, "eqns") else 0
  return sum((eqn.primitive.name == name) + sum(inner(p) for p in eqn.params.values())
             for eqn in jaxpr.eqns)


def test_mfac_factorises_its_window_once_per_upper_stage():
  setup = tt.make_setup(stage_driver="fused", residual_every=1, **MFAC)
  state, batches = tt.make_state(setup), tt.make_batches(setup)
  stage = functools.partial(ts.upper_stage, setup)
  args = (state, batches.hvp, batches.downstream_images, batches.downstream_labels,
          jax.random.PRNGKey(0))
  # N_U = 3 upper steps, one LU factorisation of the per-block Gram systems.
  assert _count_primitive(jax.make_jaxpr(stage)(*args).jaxpr, "lu") == 1
  operator, lam = upper_level.prepare_stage(setup, state, batches.hvp, jax.random.PRNGKey(0))
  assert isinstance(operator, mfac.WindowFactor)
  step = jax.make_jaxpr(functools.partial(upper_level.upper_step, setup))(
      state, operator, lam, batches.downstream_images[0], batches.downstream_labels[0],
      jax.random.PRNGKey(1))
  assert _count_primitive(step.jaxpr, "lu") == 0
  # Without the stage's factorisation (the old path) every step factorises.
  step_alone = jax.make_jaxpr(functools.partial(upper_level.upper_step, setup))(
      state, None, lam, batches.downstream_images[0], batches.downstream_labels[0],
      jax.random.PRNGKey(1))
  assert _count_primitive(step_alone.jaxpr, "lu") == 1


def test_factored_solve_and_its_matvec_match_a_dense_solve():
  rng = np.random.default_rng(0)
  like = {"a": jnp.zeros((4, 3)), "b": jnp.zeros((5,))}
  window = mfac.init(like, 4)
  for _ in range(3):  # 3 of 4 rows valid
    window = mfac.push(window, jax.tree_util.tree_map(
        lambda x: jnp.asarray(rng.normal(size=x.shape), jnp.float32), like))
  v = jax.tree_util.tree_map(lambda x: jnp.asarray(rng.normal(size=x.shape), jnp.float32),
                             like)
  lam = 0.3
  factor = mfac.factorize(window, lam, "global")
  x_plain, info_plain = mfac.solve(window, v, lam, "global")
  x, info = mfac.solve(window, v, lam, "global", factor=factor)
  _assert_identical((x, info), (x_plain, info_plain))
  x_quiet, quiet = mfac.solve(window, v, lam, "global", factor=factor, diagnostics=False)
  _assert_identical(x_quiet, x)
  assert np.isnan(float(quiet.residual)) and np.isinf(float(quiet.min_curvature))
  # Against NumPy: A = I + GᵀG/(nλ) over the 3 valid rows, all leaves one block.
  rows = np.concatenate([np.asarray(g[:3], np.float64).reshape(3, -1)
                         for g in jax.tree_util.tree_leaves(window.grads)], axis=1)
  a = np.eye(rows.shape[1]) + rows.T @ rows / (3 * lam)
  flat = lambda t: np.concatenate([np.asarray(l, np.float64).ravel()
                                   for l in jax.tree_util.tree_leaves(t)])
  np.testing.assert_allclose(flat(x), np.linalg.solve(a, flat(v)), rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(flat(mfac.matvec(window, lam, "global")(x)), a @ flat(x),
                             rtol=1e-4, atol=1e-5)
