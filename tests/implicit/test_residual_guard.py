"""The residual guard: falls back to the right-hand side exactly when a solve failed."""
import jax
import jax.numpy as jnp
import numpy as np

from bissl_jax import implicit
from bissl_jax.implicit import solvers
from bissl_jax.implicit.residual_guard import guard_residual


def test_guard_falls_back_on_a_bad_cg_solve_and_keeps_a_good_one():
  rng = np.random.default_rng(0)
  b = {"w": jnp.asarray(rng.normal(size=(6,)), jnp.float32)}
  indefinite = np.diag([-3.0, -1.0, 0.2, 1.0, 2.0, 5.0])
  matvec = lambda v: {"w": jnp.asarray(indefinite, jnp.float32) @ v["w"]}
  x_bad, info_bad = solvers.cg.cg(matvec, b, maxiter=2)
  assert float(info_bad.residual) > 1.0      # CG on an indefinite system: worse than 0
  out, used = jax.jit(guard_residual)(x_bad, b, info_bad)
  assert bool(used)
  np.testing.assert_array_equal(np.asarray(out["w"]), np.asarray(b["w"]))
  x_good, info_good = implicit.solve(matvec, b, solver="minres", maxiter=6)
  out, used = guard_residual(x_good, b, info_good)
  assert not bool(used) and float(info_good.residual) <= 1.0
  np.testing.assert_array_equal(np.asarray(out["w"]), np.asarray(x_good["w"]))
  # A stricter threshold, NaN residuals and the nonfinite flag all fall back.
  assert bool(guard_residual(x_good, b, info_good, threshold=0.0)[1]) == (
      float(info_good.residual) > 0.0)
  nan_info = info_good._replace(residual=jnp.asarray(jnp.nan, jnp.float32))
  assert bool(guard_residual(x_good, b, nan_info)[1])
  assert bool(guard_residual(x_good, b, info_good._replace(nonfinite=jnp.asarray(True)))[1])


def test_guard_vmaps_per_solve():
  b = {"w": jnp.ones((2, 3))}
  x = {"w": jnp.zeros((2, 3))}
  info = solvers.SolveInfo(iterations=jnp.zeros(2, jnp.int32),
                           residual=jnp.asarray([0.5, 3.0], jnp.float32),
                           min_curvature=jnp.zeros(2), nonfinite=jnp.zeros(2, bool))
  out, used = jax.vmap(guard_residual)(x, b, info)
  np.testing.assert_array_equal(np.asarray(used), [False, True])
  np.testing.assert_array_equal(np.asarray(out["w"]), [[0, 0, 0], [1, 1, 1]])
