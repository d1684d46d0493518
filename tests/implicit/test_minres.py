"""MINRES and the stock-JAX CG wrapper, checked against NumPy and jax.scipy."""
import subprocess
import sys

import jax
import jax.numpy as jnp
import jax.scipy.sparse.linalg as jsp_linalg
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from bissl_jax import implicit
from bissl_jax.implicit.solvers import minres
from bissl_jax.implicit import solvers
from config_helpers import REPO_ROOT

REPO = REPO_ROOT
SHAPES = {"conv": (2, 2, 3), "bias": (4,), "dense": (3, 4)}   # 28 entries, 3 leaves
N = 28


def make_tree(rng):
  return {k: jnp.asarray(rng.normal(size=s), jnp.float32) for k, s in SHAPES.items()}


def flat(tree):
  return np.asarray(ravel_pytree(tree)[0], np.float64)


def dense_operator(matrix, like):
  _, unravel = ravel_pytree(like)
  m = jnp.asarray(matrix, jnp.float32)
  return lambda v: unravel(m @ ravel_pytree(v)[0])


def indefinite_matrix(rng, n=N, n_negative=6):
  """A well-conditioned symmetric matrix with ``n_negative`` negative eigenvalues."""
  q, _ = np.linalg.qr(rng.normal(size=(n, n)))
  eig = np.concatenate([-rng.uniform(0.5, 2.0, n_negative),
                        rng.uniform(0.5, 3.0, n - n_negative)])
  return (q * eig) @ q.T


def relative_residual(matrix, x, b):
  return np.linalg.norm(matrix @ x - b) / np.linalg.norm(b)


def test_minres_solves_an_indefinite_system_like_a_dense_solve():
  rng = np.random.default_rng(0)
  b = make_tree(rng)
  a = indefinite_matrix(rng)
  x, info = minres.minres(dense_operator(a, b), b, maxiter=N + 10)
  expected = np.linalg.solve(a, flat(b))
  np.testing.assert_allclose(flat(x), expected, rtol=0, atol=2e-4 * np.abs(expected).max())
  assert float(info.residual) < 1e-4
  assert float(info.min_curvature) < 0          # it saw a negative direction
  assert not bool(info.nonfinite)


def test_minres_beats_cg_on_an_indefinite_system():
  rng = np.random.default_rng(1)
  b = make_tree(rng)
  a = indefinite_matrix(rng, n_negative=10)
  matvec = dense_operator(a, b)
  _, info_minres = minres.minres(matvec, b, maxiter=8)
  _, info_cg = solvers.cg.cg(matvec, b, maxiter=8)
  assert float(info_minres.residual) <= 1.0     # never worse than x = 0
  assert float(info_minres.residual) < float(info_cg.residual)


def test_minres_residual_is_monotone_in_the_iteration_count():
  rng = np.random.default_rng(2)
  b = make_tree(rng)
  a = indefinite_matrix(rng)
  matvec = dense_operator(a, b)
  residuals = [1.0]
  for k in range(1, 21):
    x, info = minres.minres(matvec, b, maxiter=k)
    # Independent check: recompute the residual from the dense matrix.
    residuals.append(relative_residual(a, flat(x), flat(b)))
    np.testing.assert_allclose(float(info.residual), residuals[-1], rtol=1e-3, atol=1e-6)
    assert int(info.iterations) == k
  assert all(later <= earlier + 1e-6 for earlier, later in zip(residuals, residuals[1:]))
  assert residuals[-1] < 0.5 * residuals[1]


def test_minres_unrolled_equals_while_loop_driver_and_tolerance_mode():
  rng = np.random.default_rng(3)
  b = make_tree(rng)
  a = indefinite_matrix(rng)
  matvec = dense_operator(a, b)
  x_unrolled, info_u = minres.minres(matvec, b, maxiter=7, unroll=True)
  x_loop, info_l = jax.jit(lambda bb: minres.minres(matvec, bb, maxiter=7, unroll=False))(b)
  np.testing.assert_allclose(flat(x_unrolled), flat(x_loop), rtol=1e-5, atol=1e-6)
  assert int(info_u.iterations) == int(info_l.iterations) == 7
  # Tolerance mode stops early, once ‖r‖ ≤ tol·‖b‖ (checked on the true residual).
  _, info_tol = minres.minres(matvec, b, maxiter=100, tol=1e-3)
  assert 1 <= int(info_tol.iterations) < 100
  assert float(info_tol.residual) < 2e-3


def test_minres_warm_start_and_exact_convergence_mask():
  rng = np.random.default_rng(4)
  b = make_tree(rng)
  a = indefinite_matrix(rng)
  matvec = dense_operator(a, b)
  x_star = np.linalg.solve(a, flat(b))
  _, unravel = ravel_pytree(b)
  init = unravel(jnp.asarray(x_star + 1e-2 * rng.normal(size=N), jnp.float32))
  _, cold = minres.minres(matvec, b, maxiter=3)
  _, warm = minres.minres(matvec, b, maxiter=3, init=init)
  assert float(warm.residual) < float(cold.residual)
  # b = 0: nothing to do, and no 0/0.
  zero = jax.tree_util.tree_map(jnp.zeros_like, b)
  x0, info0 = minres.minres(matvec, zero, maxiter=4, unroll=True)
  assert not bool(info0.nonfinite) and int(info0.iterations) == 0
  assert not flat(x0).any()


def test_minres_through_the_library_entry_points():
  rng = np.random.default_rng(5)
  h = indefinite_matrix(rng) * 20.0       # H with eigenvalues below −(λ+δ)
  b = make_tree(rng)
  lam, damping = 1e-3, 10.0
  x, info = implicit.implicit_solve(dense_operator(h, b), b, lam=lam, damping=damping,
                                    solver="minres", maxiter=N + 10)
  a = np.eye(N) + h / (lam + damping)
  np.testing.assert_allclose(flat(x), np.linalg.solve(a, flat(b)), rtol=2e-3, atol=2e-3)
  assert float(info.min_curvature) < 0


def test_minres_is_differentiable_and_vmappable():
  rng = np.random.default_rng(6)
  a = indefinite_matrix(rng)
  b = make_tree(rng)
  matvec = dense_operator(a, b)
  # d/db of cᵀA⁻¹b is A⁻¹c (A symmetric).
  c = make_tree(rng)
  grad = jax.grad(lambda bb: jnp.vdot(ravel_pytree(minres.minres(matvec, bb,
                                                                 maxiter=N + 10)[0])[0],
                                      ravel_pytree(c)[0]))(b)
  np.testing.assert_allclose(flat(grad), np.linalg.solve(a, flat(c)), rtol=1e-2, atol=1e-3)
  batch = jax.tree_util.tree_map(lambda x: jnp.stack([x, 2 * x]), b)
  xs, infos = jax.vmap(lambda bb: minres.minres(matvec, bb, maxiter=5))(batch)
  np.testing.assert_allclose(flat(jax.tree_util.tree_map(lambda x: x[1], xs)),
                             2 * flat(jax.tree_util.tree_map(lambda x: x[0], xs)),
                             rtol=1e-4, atol=1e-5)
  assert infos.residual.shape == (2,)


def spd_matrix(rng, n=N):
  g = rng.normal(size=(n, n))
  return np.eye(n) + 0.5 * g @ g.T / n


@pytest.mark.parametrize("tol", [0.0, 1e-4])
def test_jax_cg_equals_the_library_cg_on_spd(tol):
  rng = np.random.default_rng(7)
  b = make_tree(rng)
  a = spd_matrix(rng)
  matvec = dense_operator(a, b)
  x, info = solvers.jax_cg.jax_cg(matvec, b, maxiter=6, tol=tol)
  x_lib, info_lib = solvers.cg.cg(matvec, b, maxiter=6, tol=tol, unroll=False)
  x_ref, _ = jsp_linalg.cg(matvec, b, tol=tol, atol=0.0, maxiter=6)
  np.testing.assert_allclose(flat(x), flat(x_lib), rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(flat(x), flat(x_ref), rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(float(info.residual), relative_residual(a, flat(x), flat(b)),
                             rtol=1e-3)
  np.testing.assert_allclose(float(info.residual), float(info_lib.residual), rtol=1e-2)
  assert int(info.iterations) == 6                # the documented upper bound
  assert np.isnan(float(info.min_curvature))      # not observed
  assert not bool(info.nonfinite)


def test_jax_cg_warm_start_and_nonfinite_flag():
  rng = np.random.default_rng(8)
  b = make_tree(rng)
  a = spd_matrix(rng)
  matvec = dense_operator(a, b)
  x_star = np.linalg.solve(a, flat(b))
  _, unravel = ravel_pytree(b)
  x, _ = solvers.jax_cg.jax_cg(matvec, b, maxiter=2, init=unravel(jnp.asarray(x_star, jnp.float32)))
  np.testing.assert_allclose(flat(x), x_star, rtol=1e-3, atol=1e-4)
  nan_matvec = lambda v: jax.tree_util.tree_map(lambda t: t * jnp.nan, v)
  _, info = solvers.jax_cg.jax_cg(nan_matvec, b, maxiter=2)
  assert bool(info.nonfinite)


def test_registry_names_and_no_import_cycle():
  for name in ("cg", "layerwise_cg", "neumann", "first_order", "minres", "jax_cg"):
    assert name in solvers.SOLVERS
    assert implicit.resolve_solver(name) is solvers.SOLVERS[name]
  # A fresh interpreter importing the solver modules first, in either order.
  for first in ("bissl_jax.implicit.solvers.minres", "bissl_jax.implicit.solvers.base"):
    code = (f"import importlib; importlib.import_module('{first}'); "
            "from bissl_jax.implicit.solvers import SOLVERS; "
            "assert {'minres', 'jax_cg'} <= set(SOLVERS)")
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                   env={"JAX_PLATFORMS": "cpu", "PYTHONPATH": REPO})
