"""Preconditioned CG and MINRES, and MINRES's Ritz-value diagnostic, against NumPy.

The references are written here from their definitions, not from the recurrences
the library runs: iterate ``k`` of PCG minimises the A-norm of the error over the
Krylov space ``K_k(M A, M b)``, iterate ``k`` of preconditioned MINRES minimises
``‖A x − b‖_M`` over the same space, and the Ritz values are the eigenvalues of the
operator projected on an orthonormal Krylov basis (the Lanczos matrix up to an
orthogonal similarity).
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from bissl_jax import implicit
from bissl_jax.implicit import solvers
from bissl_jax.implicit.solvers.cg import cg
from bissl_jax.implicit.solvers.minres import minres, smallest_ritz_value
import test_solvers
from test_solvers import dense_operator, flat

SHAPES = {"w": (3, 4), "b": (6,)}   # 18 entries, 2 leaves
N = 18


def make_tree(rng):
  return test_solvers.make_tree(rng, SHAPES)


def diagonal_preconditioner(diagonal, like):
  _, unravel = ravel_pytree(like)
  d = jnp.asarray(diagonal, jnp.float32)
  return lambda r: unravel(d * ravel_pytree(r)[0])


def scaled_matrix(rng, diagonal, coupling=0.05):
  """``D^{1/2} (I + small symmetric) D^{1/2}``-like: diagonal-dominant, spread spectrum."""
  g = rng.normal(size=(N, N))
  s = np.sqrt(np.abs(diagonal))
  return np.diag(diagonal) + coupling * np.outer(s, s) * (g + g.T) / np.sqrt(N)


def krylov_basis(op, start, k):
  """Orthonormal basis of ``span{start, op start, ..., op^{k-1} start}`` (float64)."""
  vectors = [start / np.linalg.norm(start)]
  for _ in range(k - 1):
    w = op @ vectors[-1]
    for v in vectors:               # full reorthogonalisation, twice
      w = w - (v @ w) * v
    for v in vectors:
      w = w - (v @ w) * v
    vectors.append(w / np.linalg.norm(w))
  return np.stack(vectors, axis=1)


def pcg_reference(a, m, b, k):
  """``argmin_{x ∈ K_k(M A, M b)} (x − x*)ᵀ A (x − x*)``."""
  q = krylov_basis(m @ a, m @ b, k)
  return q @ np.linalg.solve(q.T @ a @ q, q.T @ b)


def pminres_reference(a, m, b, k):
  """``argmin_{x ∈ K_k(M A, M b)} ‖A x − b‖_M`` with ``‖r‖_M² = rᵀ M r``."""
  q = krylov_basis(m @ a, m @ b, k)
  root = np.linalg.cholesky(m)              # M = L Lᵀ, ‖r‖_M = ‖Lᵀ r‖
  y, *_ = np.linalg.lstsq(root.T @ a @ q, root.T @ b, rcond=None)
  return q @ y


def ritz_reference(a, m, b, k):
  """Smallest eigenvalue of ``M^{1/2} A M^{1/2}`` projected on ``K_k(·, M^{1/2} b)``."""
  eig, vec = np.linalg.eigh(m)
  half = (vec * np.sqrt(eig)) @ vec.T
  op = half @ a @ half
  q = krylov_basis(op, half @ b, k)
  return np.linalg.eigvalsh(q.T @ op @ q)[0]


# ---------------------------------------------------------------------------
# The iterates against the NumPy definitions.

@pytest.mark.parametrize("k", [1, 3, 6])
def test_preconditioned_cg_iterates_match_the_krylov_definition(k):
  rng = np.random.default_rng(0)
  b = make_tree(rng)
  diagonal = np.geomspace(1.0, 50.0, N)
  a = scaled_matrix(rng, diagonal)
  m_diag = 1.0 / np.diag(a)
  x, info = cg(dense_operator(a, b), b, maxiter=k,
               preconditioner=diagonal_preconditioner(m_diag, b))
  expected = pcg_reference(a, np.diag(m_diag), flat(b), k)
  np.testing.assert_allclose(flat(x), expected, rtol=0, atol=2e-4 * np.abs(expected).max())
  assert int(info.iterations) == k and not bool(info.nonfinite)


@pytest.mark.parametrize("k", [1, 3, 6])
def test_preconditioned_minres_iterates_match_the_krylov_definition(k):
  rng = np.random.default_rng(1)
  b = make_tree(rng)
  diagonal = np.geomspace(1.0, 50.0, N) * np.where(np.arange(N) % 3 == 0, -1.0, 1.0)
  a = scaled_matrix(rng, diagonal)            # indefinite
  m_diag = 1.0 / np.abs(np.diag(a))           # SPD, although A is not
  x, _ = minres(dense_operator(a, b), b, maxiter=k,
                preconditioner=diagonal_preconditioner(m_diag, b))
  expected = pminres_reference(a, np.diag(m_diag), flat(b), k)
  np.testing.assert_allclose(flat(x), expected, rtol=0, atol=2e-4 * np.abs(expected).max())


@pytest.mark.parametrize("name", ["cg", "minres"])
def test_preconditioned_solves_converge_to_the_dense_solve(name):
  rng = np.random.default_rng(2)
  b = make_tree(rng)
  signs = 1.0 if name == "cg" else np.where(np.arange(N) % 4 == 0, -1.0, 1.0)
  a = scaled_matrix(rng, np.geomspace(1.0, 1e3, N) * signs)
  m_diag = 1.0 / np.abs(np.diag(a))
  x, info = implicit.solve(dense_operator(a, b), b, solver=name, maxiter=N + 10,
                           preconditioner=diagonal_preconditioner(m_diag, b))
  expected = np.linalg.solve(a, flat(b))
  np.testing.assert_allclose(flat(x), expected, rtol=0, atol=1e-3 * np.abs(expected).max())
  assert float(info.residual) < 1e-3 and not bool(info.nonfinite)


# ---------------------------------------------------------------------------
# Fewer iterations at equal tolerance on ill-conditioned systems.

def test_jacobi_preconditioned_cg_needs_fewer_iterations():
  rng = np.random.default_rng(3)
  b = make_tree(rng)
  a = scaled_matrix(rng, np.geomspace(1.0, 1e4, N))     # condition number ~1e4
  matvec, tol = dense_operator(a, b), 1e-4
  m = diagonal_preconditioner(1.0 / np.diag(a), b)
  _, plain = cg(matvec, b, maxiter=200, tol=tol, unroll=False)
  _, pre = cg(matvec, b, maxiter=200, tol=tol, unroll=False, preconditioner=m)
  # Both stop on the same Euclidean rule ‖A x − b‖ ≤ tol·‖b‖.
  assert float(pre.residual) <= 2 * tol
  assert 2 * int(pre.iterations) <= int(plain.iterations), (pre.iterations, plain.iterations)


def test_preconditioned_minres_needs_fewer_iterations_on_an_indefinite_system():
  rng = np.random.default_rng(4)
  b = make_tree(rng)
  signs = np.where(np.arange(N) % 3 == 0, -1.0, 1.0)
  a = scaled_matrix(rng, np.geomspace(1.0, 1e3, N) * signs)
  assert np.linalg.eigvalsh(a)[0] < 0
  matvec, tol = dense_operator(a, b), 1e-4
  m = diagonal_preconditioner(1.0 / np.abs(np.diag(a)), b)
  _, pre = minres(matvec, b, maxiter=200, tol=tol, unroll=False, preconditioner=m)
  k = int(pre.iterations)
  # Equal tolerance in one norm: after the preconditioned solve's k steps, its
  # Euclidean residual is near tol and the unpreconditioned one's is far above.
  _, pre_k = minres(matvec, b, maxiter=k, preconditioner=m)
  _, plain_k = minres(matvec, b, maxiter=k)
  _, plain = minres(matvec, b, maxiter=200, tol=tol, unroll=False)
  assert float(pre_k.residual) <= 10 * tol
  assert float(plain_k.residual) > 100 * float(pre_k.residual)
  assert 2 * k <= int(plain.iterations), (k, plain.iterations)


# ---------------------------------------------------------------------------
# preconditioner=None is the unpreconditioned solver.

@pytest.mark.parametrize("fn", [cg, minres])
@pytest.mark.parametrize("unroll", [True, False])
def test_no_preconditioner_is_bitwise_the_plain_solver(fn, unroll):
  rng = np.random.default_rng(5)
  b = make_tree(rng)
  a = scaled_matrix(rng, np.geomspace(1.0, 10.0, N))
  matvec = dense_operator(a, b)
  x0, i0 = fn(matvec, b, maxiter=6, tol=1e-3, unroll=unroll)
  x1, i1 = fn(matvec, b, maxiter=6, tol=1e-3, unroll=unroll, preconditioner=None)
  for u, v in zip(jax.tree_util.tree_leaves((x0, i0)), jax.tree_util.tree_leaves((x1, i1))):
    np.testing.assert_array_equal(np.asarray(u), np.asarray(v))
  # and the identity preconditioner, applied, gives the same solve up to rounding
  x2, i2 = fn(matvec, b, maxiter=6, tol=1e-3, unroll=unroll, preconditioner=lambda r: r)
  np.testing.assert_allclose(flat(x2), flat(x0), rtol=1e-5, atol=1e-6)
  assert int(i2.iterations) == int(i0.iterations)


# ---------------------------------------------------------------------------
# MINRES's Ritz-value diagnostic.

def test_smallest_ritz_value_is_eigvalsh_of_the_masked_tridiagonal():
  alphas = jnp.asarray([2.0, -1.0, 3.0, 7.0, 9.0])
  betas = jnp.asarray([0.5, 1.5, 0.25, 4.0, 8.0])
  for k in range(6):
    t = np.diag(np.asarray(alphas[:k])) + np.diag(np.asarray(betas[:max(k - 1, 0)]), 1)
    t = t + np.triu(t, 1).T
    expected = np.linalg.eigvalsh(t)[0] if k else np.inf
    np.testing.assert_allclose(float(smallest_ritz_value(alphas, betas, k)), expected,
                               rtol=1e-6)
  assert np.isnan(float(smallest_ritz_value(alphas.at[1].set(jnp.nan), betas, 3)))
  assert float(smallest_ritz_value(alphas.at[4].set(jnp.nan), betas, 3)) < 0  # masked


def indefinite_with_positive_lanczos_diagonal(rng):
  """A has one eigenvalue −0.1 among 1..10: every Lanczos vᵀA v stays positive."""
  q, _ = np.linalg.qr(rng.normal(size=(N, N)))
  eig = np.concatenate([[-0.1], np.linspace(1.0, 10.0, N - 1)])
  return (q * eig) @ q.T


@pytest.mark.parametrize("k", [2, 5, N])
def test_ritz_diagnostic_equals_numpy_and_sees_indefiniteness(k):
  rng = np.random.default_rng(6)
  b = make_tree(rng)
  a = indefinite_with_positive_lanczos_diagonal(rng)
  _, info = minres(dense_operator(a, b), b, maxiter=k)
  expected = ritz_reference(a, np.eye(N), flat(b), k)
  np.testing.assert_allclose(float(info.min_curvature), expected, rtol=0, atol=2e-3)
  if k == N:  # the whole space: the smallest Ritz value is λ_min(A) = −0.1 < 0 ...
    assert float(info.min_curvature) < -0.05
    # ... while the Lanczos vectors' own curvatures (the old diagnostic) are all positive
    q = krylov_basis(a, flat(b), N)
    assert np.min(np.einsum("ij,ik,kj->j", q, a, q)) > 0


def test_ritz_diagnostic_of_the_preconditioned_operator():
  rng = np.random.default_rng(7)
  b = make_tree(rng)
  a = indefinite_with_positive_lanczos_diagonal(rng)
  m_diag = rng.uniform(0.5, 2.0, N)
  for k in (3, N):
    _, info = minres(dense_operator(a, b), b, maxiter=k,
                     preconditioner=diagonal_preconditioner(m_diag, b))
    expected = ritz_reference(a, np.diag(m_diag), flat(b), k)
    np.testing.assert_allclose(float(info.min_curvature), expected, rtol=0, atol=3e-3)
  assert float(info.min_curvature) < 0          # M^{1/2} A M^{1/2} has A's inertia


def test_ritz_diagnostic_is_positive_on_spd():
  rng = np.random.default_rng(8)
  b = make_tree(rng)
  a = scaled_matrix(rng, np.geomspace(1.0, 10.0, N))
  lam_min = np.linalg.eigvalsh(a)[0]
  assert lam_min > 0
  _, info = minres(dense_operator(a, b), b, maxiter=N)
  assert lam_min - 1e-3 <= float(info.min_curvature) <= lam_min + 1e-2


# ---------------------------------------------------------------------------
# The public API.

def test_implicit_grad_with_a_preconditioner_matches_the_dense_solve():
  rng = np.random.default_rng(9)
  params = make_tree(rng)
  outer = make_tree(rng)
  curvature = scaled_matrix(rng, np.geomspace(0.5, 200.0, N))
  _, unravel = ravel_pytree(params)
  c = jnp.asarray(curvature, jnp.float32)

  def inner_loss(p):
    v = ravel_pytree(p)[0]
    return 0.5 * v @ c @ v - 3.0 * jnp.sum(jnp.cos(v))   # Hessian C + 3 diag(cos v)

  lam, damping = 1.0, 0.5
  hessian = curvature + 3.0 * np.diag(np.cos(flat(params)))
  a = np.eye(N) + hessian / (lam + damping)
  m = diagonal_preconditioner(1.0 / np.abs(np.diag(a)), params)
  expected = np.linalg.solve(a, flat(outer))
  for name in ("cg", "minres"):
    if name == "cg" and np.linalg.eigvalsh(a)[0] <= 0:
      continue
    x, info = jax.jit(lambda p, g: implicit.implicit_grad(
        inner_loss, p, g, lam=lam, damping=damping, solver=name, maxiter=N + 10,
        preconditioner=m))(params, outer)
    np.testing.assert_allclose(flat(x), expected, rtol=0, atol=1e-3 * np.abs(expected).max())
  # derivatives go through a second preconditioned solve (custom_linear_solve)
  matvec = dense_operator(a, params)
  probe = flat(make_tree(rng))
  grad = jax.grad(lambda g: ravel_pytree(minres(matvec, g, maxiter=N + 10, preconditioner=m)[0])[0]
                  @ jnp.asarray(probe, jnp.float32))(outer)
  np.testing.assert_allclose(flat(grad), np.linalg.solve(a, probe), rtol=0,
                             atol=2e-3 * np.abs(np.linalg.solve(a, probe)).max())


def test_solvers_that_cannot_take_a_preconditioner_are_refused():
  rng = np.random.default_rng(10)
  b = make_tree(rng)
  matvec = dense_operator(np.eye(N), b)
  identity = lambda r: r
  assert {n for n, s in solvers.REGISTRY.items() if s.preconditionable} >= {"cg", "minres"}
  assert not solvers.get("neumann").preconditionable
  with pytest.raises(ValueError, match=r"'neumann' cannot take a preconditioner.*'cg'.*'minres'"):
    implicit.solve(matvec, b, solver="neumann", preconditioner=identity)
  with pytest.raises(ValueError, match="cannot take a preconditioner"):
    implicit.implicit_grad(lambda p: 0.0, b, b, lam=1.0, solver="layerwise_cg",
                           preconditioner=identity)
  with pytest.raises(ValueError, match="cannot take a preconditioner"):
    implicit.solve(matvec, b, solver=lambda mv, bb, *, init, maxiter, tol: bb,
                   preconditioner=identity)
  with pytest.raises(TypeError, match="preconditioner must be a callable"):
    implicit.solve(matvec, b, solver="cg", preconditioner=np.eye(N))

  def user_solver(mv, bb, *, init, maxiter, tol, preconditioner):
    return preconditioner(bb)
  x, info = implicit.solve(matvec, b, solver=user_solver, preconditioner=identity)
  np.testing.assert_array_equal(flat(x), flat(b))
  assert float(info.residual) == 0.0
