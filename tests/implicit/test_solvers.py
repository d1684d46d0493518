"""Linear solvers and pytree algebra, checked against NumPy and jax.scipy."""
import jax
import jax.numpy as jnp
import jax.scipy.sparse.linalg as jsp_linalg
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from bissl_jax.implicit import solvers
from bissl_jax.implicit import tree_math as tm

SHAPES = {"conv": (2, 2, 2), "bias": (3,), "dense": (2, 4)}   # 19 entries, 3 leaves


def make_tree(rng, shapes=SHAPES):
  return {k: jnp.asarray(rng.normal(size=s), jnp.float32) for k, s in shapes.items()}


def flat(tree):
  return np.asarray(ravel_pytree(tree)[0], np.float64)


def dense_operator(matrix, like):
  """``v ↦ M·ravel(v)``, unravelled back to ``like``'s structure."""
  _, unravel = ravel_pytree(like)
  m = jnp.asarray(matrix, jnp.float32)
  return lambda v: unravel(m @ ravel_pytree(v)[0])


def spd_matrix(rng, n, coupling=0.3):
  g = rng.normal(size=(n, n))
  return np.eye(n) + coupling * g @ g.T / n


# ---------------------------------------------------------------------------
# tree_math

def test_tree_math_matches_numpy():
  rng = np.random.default_rng(0)
  a, b = make_tree(rng), make_tree(rng)
  fa, fb = flat(a), flat(b)
  np.testing.assert_allclose(tm.tree_vdot(a, b), fa @ fb, rtol=1e-5)
  np.testing.assert_allclose(tm.tree_norm(a), np.linalg.norm(fa), rtol=1e-5)
  np.testing.assert_allclose(flat(tm.tree_axpy(0.5, a, b)), 0.5 * fa + fb, rtol=1e-6)
  np.testing.assert_allclose(flat(tm.tree_add(a, b)), fa + fb, rtol=1e-6)
  np.testing.assert_allclose(flat(tm.tree_sub(a, b)), fa - fb, rtol=1e-6)
  np.testing.assert_allclose(flat(tm.tree_scale(a, -2.0)), -2 * fa, rtol=1e-6)
  assert not flat(tm.tree_zeros_like(a)).any()
  per_leaf = tm.tree_leaf_vdots(a, b)
  for key in SHAPES:
    np.testing.assert_allclose(per_leaf[key], np.vdot(a[key], b[key]), rtol=1e-5)
  # bfloat16 leaves accumulate in float32 and keep their own dtype.
  half = {"x": jnp.full((4096,), 1.0 + 2 ** -7, jnp.bfloat16)}
  assert tm.tree_vdot(half, half).dtype == jnp.float32
  np.testing.assert_allclose(tm.tree_vdot(half, half), 4096 * (1 + 2 ** -7) ** 2, rtol=1e-6)
  assert tm.tree_axpy(2.0, half, half)["x"].dtype == jnp.bfloat16


def test_tree_finite_helpers():
  tree = {"a": jnp.array([1.0, jnp.nan, 2.0]), "b": jnp.array([[jnp.inf, -3.0]])}
  assert not bool(tm.tree_all_finite(tree))
  cleaned = tm.tree_where_finite(tree)
  np.testing.assert_array_equal(cleaned["a"], [1.0, 0.0, 2.0])
  np.testing.assert_array_equal(cleaned["b"], [[0.0, -3.0]])
  assert bool(tm.tree_all_finite(cleaned))


# ---------------------------------------------------------------------------
# Global CG

@pytest.mark.parametrize("unroll", [True, False])
def test_cg_matches_jax_scipy_cg_each_iteration(unroll):
  """Same recurrence as jax.scipy.sparse.linalg.cg, cold and warm started."""
  rng = np.random.default_rng(1)
  b, init = make_tree(rng), make_tree(rng)
  matvec = dense_operator(spd_matrix(rng, 19, coupling=2.0), b)
  for maxiter in (1, 3):
    ref_fn = jax.jit(lambda x0: jsp_linalg.cg(matvec, b, x0=x0, maxiter=maxiter, tol=0.0)[0])
    cold = jax.jit(lambda: solvers.cg.cg(matvec, b, maxiter=maxiter, unroll=unroll))
    warm = jax.jit(lambda x0: solvers.cg.cg(matvec, b, init=x0, maxiter=maxiter, unroll=unroll))
    for (ours, info), ref in ((cold(), ref_fn(tm.tree_zeros_like(b))), (warm(init), ref_fn(init))):
      np.testing.assert_allclose(flat(ours), flat(ref), rtol=1e-4, atol=1e-5)
      assert int(info.iterations) == maxiter


@pytest.mark.parametrize("unroll", [True, False])
def test_cg_converges_to_dense_solve_and_reports_exact_residual(unroll):
  rng = np.random.default_rng(2)
  b = make_tree(rng)
  matrix = spd_matrix(rng, 19)
  x, info = solvers.cg.cg(dense_operator(matrix, b), b, maxiter=60, tol=1e-6, unroll=unroll)
  np.testing.assert_allclose(flat(x), np.linalg.solve(matrix, flat(b)), rtol=1e-4, atol=1e-5)
  expected_residual = (np.linalg.norm(matrix @ flat(x) - flat(b)) / np.linalg.norm(flat(b)))
  np.testing.assert_allclose(info.residual, expected_residual, rtol=0.05, atol=1e-7)
  assert float(info.residual) < 1e-5
  assert not bool(info.nonfinite)


@pytest.mark.parametrize("unroll", [True, False])
def test_cg_iteration_count_and_early_stop(unroll):
  """CG finds the solution in as many steps as A has distinct eigenvalues (here 3)."""
  eigenvalues = np.repeat([1.0, 2.0, 5.0], [3, 3, 2])
  like = {"u": jnp.zeros((5,)), "w": jnp.zeros((3,))}
  matvec = dense_operator(np.diag(eigenvalues), like)
  b = {"u": jnp.ones((5,)), "w": jnp.ones((3,))}
  x, info = solvers.cg.cg(matvec, b, maxiter=10, tol=1e-5, unroll=unroll)
  assert int(info.iterations) == 3
  np.testing.assert_allclose(flat(x), 1.0 / eigenvalues, rtol=1e-5)
  # An eigenvector is solved in a single step; b = 0 takes none and stays finite.
  eig_b = {"u": jnp.ones((5,)).at[3:].set(0.0), "w": jnp.zeros((3,))}
  assert int(solvers.cg.cg(matvec, eig_b, maxiter=10, tol=1e-5, unroll=unroll)[1].iterations) == 1
  x0, info0 = solvers.cg.cg(matvec, tm.tree_zeros_like(b), maxiter=4, unroll=unroll)
  assert int(info0.iterations) == 0 and not bool(info0.nonfinite)
  assert not flat(x0).any()
  # Fixed-iteration mode on a generic operator spends exactly maxiter iterations.
  rng = np.random.default_rng(3)
  generic = dense_operator(spd_matrix(rng, 8), like)
  assert int(solvers.cg.cg(generic, b, maxiter=4, unroll=unroll)[1].iterations) == 4


def test_cg_unrolled_and_while_drivers_agree_in_tolerance_mode():
  rng = np.random.default_rng(4)
  b = make_tree(rng)
  matvec = dense_operator(spd_matrix(rng, 19, coupling=3.0), b)
  x_u, info_u = solvers.cg.cg(matvec, b, maxiter=30, tol=1e-3, unroll=True)
  x_w, info_w = solvers.cg.cg(matvec, b, maxiter=30, tol=1e-3, unroll=False)
  np.testing.assert_allclose(flat(x_u), flat(x_w), rtol=1e-5, atol=1e-6)
  assert int(info_u.iterations) == int(info_w.iterations) < 30
  assert float(info_w.residual) <= 1e-3 * 1.01


@pytest.mark.parametrize("unroll", [True, False])
def test_cg_warm_start_from_exact_solution(unroll):
  rng = np.random.default_rng(5)
  b = make_tree(rng)
  matrix = spd_matrix(rng, 19)
  _, unravel = ravel_pytree(b)
  exact = unravel(jnp.asarray(np.linalg.solve(matrix, flat(b)), jnp.float32))
  matvec = dense_operator(matrix, b)
  x, info = solvers.cg.cg(matvec, b, init=exact, maxiter=5, tol=1e-4, unroll=unroll)
  assert int(info.iterations) == 0
  assert float(info.residual) < 1e-5
  np.testing.assert_allclose(flat(x), flat(exact), atol=1e-6)
  # Fixed-iteration mode keeps iterating on rounding noise but stays put.
  x, info = solvers.cg.cg(matvec, b, init=exact, maxiter=3, unroll=unroll)
  assert float(info.residual) < 1e-5
  np.testing.assert_allclose(flat(x), flat(exact), atol=1e-5)


def test_cg_diagnostics_indefinite_and_nan():
  like = {"a": jnp.zeros((2,)), "b": jnp.zeros((2,))}
  indefinite = dense_operator(np.diag([2.0, 1.0, -3.0, 1.5]), like)
  b = {"a": jnp.ones((2,)), "b": jnp.ones((2,))}
  _, info = solvers.cg.cg(indefinite, b, maxiter=2)
  assert float(info.min_curvature) < 0
  # On an SPD operator every Rayleigh quotient lies within the spectrum.
  _, info = solvers.cg.cg(dense_operator(np.diag([2.0, 1.0, 3.0, 1.5]), like), b, maxiter=3)
  assert 1.0 <= float(info.min_curvature) <= 3.0
  nan_operator = lambda v: jax.tree_util.tree_map(lambda x: x * jnp.nan, v)
  _, info = solvers.cg.cg(nan_operator, b, maxiter=2)
  assert bool(info.nonfinite)


def test_cg_vmap_reports_per_example_iterations():
  eigenvalues = np.array([1.0, 1.0, 4.0, 4.0, 9.0])
  like = {"v": jnp.zeros((5,))}
  matvec = dense_operator(np.diag(eigenvalues), like)
  batch = {"v": jnp.array([[1.0, 1.0, 0.0, 0.0, 0.0], [1.0, 0.0, 1.0, 0.0, 1.0]])}
  for unroll in (True, False):
    solve = jax.jit(jax.vmap(lambda b: solvers.cg.cg(matvec, b, maxiter=8, tol=1e-6, unroll=unroll)))
    x, info = solve(batch)
    np.testing.assert_array_equal(info.iterations, [1, 3])
    np.testing.assert_allclose(x["v"], batch["v"] / eigenvalues, rtol=1e-5)


# ---------------------------------------------------------------------------
# Layerwise CG

def layerwise_reference(matrix, b_leaves, iterations):
  """Plain NumPy per-leaf CG: one global product per iteration, per-leaf α and β."""
  sizes = [leaf.size for leaf in b_leaves]
  split = lambda vec: np.split(vec, np.cumsum(sizes)[:-1])
  x = [np.zeros(n) for n in sizes]
  r = [np.asarray(leaf, np.float64).ravel().copy() for leaf in b_leaves]
  p = [leaf.copy() for leaf in r]
  for _ in range(iterations):
    ap = split(matrix @ np.concatenate(p))
    for l in range(len(sizes)):
      rr = r[l] @ r[l]
      alpha = rr / (p[l] @ ap[l] + 1e-12)
      x[l] = x[l] + alpha * p[l]
      r_new = r[l] - alpha * ap[l]
      beta = (r_new @ r_new) / (rr + 1e-12)
      p[l] = r_new + beta * p[l]
      r[l] = r_new
  return np.concatenate(x)


@pytest.mark.parametrize("unroll", [True, False])
def test_layerwise_cg_matches_numpy_reference_each_iteration(unroll):
  rng = np.random.default_rng(6)
  b = make_tree(rng)
  matrix = spd_matrix(rng, 19, coupling=0.5)
  matvec = dense_operator(matrix, b)
  b_leaves = [np.asarray(leaf) for leaf in jax.tree_util.tree_leaves(b)]
  previous = None
  for maxiter in range(1, 6):
    x, info = solvers.layerwise_cg.layerwise_cg(matvec, b, maxiter=maxiter, unroll=unroll)
    expected = layerwise_reference(matrix, b_leaves, maxiter)
    np.testing.assert_allclose(flat(x), expected, rtol=2e-4, atol=2e-5)
    assert int(info.iterations) == maxiter
    if previous is not None:  # every iteration changes the answer
      assert np.abs(flat(x) - previous).max() > 1e-4
    previous = flat(x)
  # Per-leaf step sizes differ from global CG after the first iteration.
  x_global, _ = solvers.cg.cg(matvec, b, maxiter=3, unroll=unroll)
  x_layer, _ = solvers.layerwise_cg.layerwise_cg(matvec, b, maxiter=3, unroll=unroll)
  assert np.abs(flat(x_global) - flat(x_layer)).max() > 1e-3


def test_layerwise_cg_zeroes_nonfinite_output_and_flags_it():
  b = {"a": jnp.ones((3,)), "b": jnp.ones((2, 2))}
  nan_operator = lambda v: jax.tree_util.tree_map(lambda x: x * jnp.nan, v)
  x, info = solvers.layerwise_cg.layerwise_cg(nan_operator, b, maxiter=2)
  assert bool(tm.tree_all_finite(x))
  assert not flat(x).any()
  assert bool(info.nonfinite)


def test_layerwise_cg_rejects_init_and_tol():
  b = {"a": jnp.ones((3,))}
  with pytest.raises(ValueError, match="starts from zero"):
    solvers.layerwise_cg.layerwise_cg(lambda v: v, b, init=b)
  with pytest.raises(ValueError, match="exactly maxiter"):
    solvers.layerwise_cg.layerwise_cg(lambda v: v, b, tol=1e-3)


# ---------------------------------------------------------------------------
# Neumann, first order, argument checks

@pytest.mark.parametrize("unroll", [True, False])
def test_neumann_matches_partial_sums(unroll):
  rng = np.random.default_rng(7)
  b = make_tree(rng)
  g = rng.normal(size=(19, 19))
  matrix = np.eye(19) + 0.4 * (g @ g.T) / np.linalg.norm(g @ g.T, 2)   # ‖I − A‖ = 0.4
  matvec = dense_operator(matrix, b)
  term, total = flat(b), flat(b)
  for k in range(1, 5):
    term = term - matrix @ term
    total = total + term
    x, info = solvers.neumann.neumann(matvec, b, maxiter=k, unroll=unroll)
    np.testing.assert_allclose(flat(x), total, rtol=1e-5, atol=1e-6)
    assert int(info.iterations) == k
  np.testing.assert_allclose(flat(solvers.neumann.neumann(matvec, b, maxiter=4, init=b)[0]), total,
                             rtol=1e-5, atol=1e-6)
  x, info = solvers.neumann.neumann(matvec, b, maxiter=40, unroll=unroll)
  np.testing.assert_allclose(flat(x), np.linalg.solve(matrix, flat(b)), rtol=1e-4, atol=1e-5)
  assert float(info.residual) < 1e-5


def test_first_order_is_identity_with_true_residual():
  rng = np.random.default_rng(8)
  b = make_tree(rng)
  matrix = spd_matrix(rng, 19)
  x, info = solvers.first_order.first_order(dense_operator(matrix, b), b, maxiter=7)
  np.testing.assert_array_equal(flat(x), flat(b))
  assert int(info.iterations) == 0
  expected = np.linalg.norm(matrix @ flat(b) - flat(b)) / np.linalg.norm(flat(b))
  np.testing.assert_allclose(info.residual, expected, rtol=1e-4)


def test_argument_checks():
  b = {"a": jnp.ones((3,))}
  for bad in (-1, 2.5, True):
    with pytest.raises(ValueError, match="maxiter"):
      solvers.cg.cg(lambda v: v, b, maxiter=bad)
  with pytest.raises(ValueError, match="tol"):
    solvers.cg.cg(lambda v: v, b, tol=-1.0)
  with pytest.raises(ValueError, match="structure"):
    solvers.cg.cg(lambda v: v, b, init={"other": jnp.ones((3,))})
  assert set(solvers.SOLVERS) == {"cg", "layerwise_cg", "neumann", "first_order", "minres",
                                  "jax_cg"}
