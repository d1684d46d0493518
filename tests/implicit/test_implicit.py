"""implicit_grad, hvp and the Hessian operators against closed forms and finite differences."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from bissl_jax import implicit
from bissl_jax.implicit.solvers import SOLVERS
from bissl_jax.implicit.solvers.base import UNKNOWN_ITERATIONS

SHAPES = {"bias": (3,), "kernel": (2, 2)}   # 7 entries
ALL_SOLVERS = sorted(SOLVERS)


def make_tree(rng, scale=1.0):
  return {k: jnp.asarray(scale * rng.normal(size=s), jnp.float32) for k, s in SHAPES.items()}


def flat(tree):
  return np.asarray(ravel_pytree(tree)[0], np.float64)


def smooth_loss(theta):
  """A non-quadratic loss coupling both leaves (its Hessian depends on θ)."""
  w, b = theta["kernel"], theta["bias"]
  z = jnp.tanh(w @ b[:2]) * b[2]
  return (jnp.sum(jnp.log(jnp.cosh(w))) + 0.5 * jnp.sum(z ** 2)
          + 0.1 * jnp.sum(b ** 4) + 0.25 * jnp.sum(b ** 2))


def quadratic_problem(rng):
  g = rng.normal(size=(7, 7))
  q = g @ g.T / 7 + 0.5 * np.eye(7)
  c = rng.normal(size=7)
  _, unravel = ravel_pytree(make_tree(rng))
  qj, cj = jnp.asarray(q, jnp.float32), jnp.asarray(c, jnp.float32)

  def loss(theta):
    z = ravel_pytree(theta)[0]
    return 0.5 * z @ qj @ z + cj @ z
  return q, c, unravel, loss


# ---------------------------------------------------------------------------
# Hessian-vector products

def test_hvp_and_operators_match_dense_hessian():
  rng = np.random.default_rng(0)
  theta, tangent = make_tree(rng), make_tree(rng)
  z, unravel = ravel_pytree(theta)
  dense = np.asarray(jax.jit(jax.hessian(lambda flat_z: smooth_loss(unravel(flat_z))))(z))
  expected = dense @ flat(tangent)
  assert np.abs(expected).max() > 0.1
  hvp = jax.jit(implicit.hvp, static_argnums=0)
  np.testing.assert_allclose(flat(hvp(smooth_loss, theta, tangent)), expected,
                             rtol=1e-4, atol=1e-5)
  for mode in ("linearize", "jvp"):
    operator = implicit.hessian_operator(smooth_loss, theta, mode=mode)
    np.testing.assert_allclose(flat(operator(tangent)), expected, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(flat(operator(theta)), dense @ flat(theta), rtol=1e-4, atol=1e-5)
  with pytest.raises(ValueError, match="hessian mode"):
    implicit.hessian_operator(smooth_loss, theta, mode="grad_of_grad")


def test_hvp_of_quadratic_is_q_times_v():
  rng = np.random.default_rng(1)
  q, _, _, loss = quadratic_problem(rng)
  theta, tangent = make_tree(rng), make_tree(rng)
  np.testing.assert_allclose(flat(implicit.hvp(loss, theta, tangent)), q @ flat(tangent),
                             rtol=1e-5, atol=1e-5)


def test_damped_operator_and_validation():
  rng = np.random.default_rng(2)
  q, _, _, loss = quadratic_problem(rng)
  theta, v = make_tree(rng), make_tree(rng)
  hess = implicit.hessian_operator(loss, theta)
  apply = jax.jit(lambda lam, v: implicit.damped_operator(hess, lam=lam, damping=0.5)(v))
  np.testing.assert_allclose(flat(apply(2.0, v)), flat(v) + q @ flat(v) / 2.5, rtol=1e-5)
  with pytest.raises(ValueError, match="lam \\+ damping must be > 0"):
    implicit.damped_operator(hess, lam=0.0)
  with pytest.raises(ValueError, match="lam \\+ damping must be > 0"):
    implicit.implicit_grad(loss, theta, v, lam=1.0, damping=-1.0)


# ---------------------------------------------------------------------------
# The implicit gradient of a proximal lower problem

def test_quadratic_lower_problem_matches_dense_solve_and_finite_differences():
  """L(θ) = ½θᵀQθ + cᵀθ: θ*(ξ) = (Q + λI)⁻¹(λξ − c), so the VJP is (I + Q/λ)⁻¹ v."""
  rng = np.random.default_rng(3)
  q, c, unravel, loss = quadratic_problem(rng)
  lam, n = 0.7, 7
  v = make_tree(rng)
  exact = np.linalg.solve(np.eye(n) + q / lam, flat(v))

  def lower_solution(xi):
    return np.linalg.solve(q + lam * np.eye(n), lam * xi - c)
  xi, eps = rng.normal(size=n), 1e-5
  jacobian = np.stack([(lower_solution(xi + eps * e) - lower_solution(xi - eps * e)) / (2 * eps)
                       for e in np.eye(n)], axis=1)
  vjp = jacobian.T @ flat(v)
  np.testing.assert_allclose(vjp, exact, rtol=1e-6)

  theta_star = unravel(jnp.asarray(lower_solution(xi), jnp.float32))
  for mode in ("linearize", "jvp"):
    solution, info = implicit.implicit_grad(loss, theta_star, v, lam=lam, solver="cg",
                                            maxiter=50, tol=1e-6, hessian_mode=mode)
    np.testing.assert_allclose(flat(solution), vjp, rtol=1e-4, atol=1e-5)
    assert float(info.residual) < 1e-5 and int(info.iterations) <= 10
  # Damping changes the operator to I + Q/(λ + δ).
  damped, _ = implicit.implicit_grad(loss, theta_star, v, lam=lam, damping=2.0, solver="cg",
                                     maxiter=50, tol=1e-6)
  np.testing.assert_allclose(flat(damped), np.linalg.solve(np.eye(n) + q / (lam + 2.0), flat(v)),
                             rtol=1e-4, atol=1e-5)


def test_nonquadratic_lower_problem_vjp_matches_finite_differences():
  """θ*(ξ) solved by Newton's method in float64; implicit_grad at θ* is its VJP."""
  rng = np.random.default_rng(4)
  lam = 0.5
  _, unravel = ravel_pytree(make_tree(rng))
  with jax.enable_x64(True):
    unravel64 = lambda z: unravel(jnp.asarray(z, jnp.float64))
    flat_loss = lambda z: smooth_loss(unravel64(z))
    grad = jax.jit(jax.grad(flat_loss))
    hess = jax.jit(jax.hessian(flat_loss))

    def lower_solution(xi):
      z = np.array(xi)
      for _ in range(50):
        step = np.linalg.solve(np.asarray(hess(z)) + lam * np.eye(7),
                               np.asarray(grad(z)) + lam * (z - xi))
        z = z - step
      assert np.abs(np.asarray(grad(z)) + lam * (z - xi)).max() < 1e-10
      return z
    xi, eps = 0.5 * rng.normal(size=7), 1e-6
    jacobian = np.stack([(lower_solution(xi + eps * e) - lower_solution(xi - eps * e)) / (2 * eps)
                         for e in np.eye(7)], axis=1)
    theta_star = lower_solution(xi)
  v = make_tree(rng)
  theta_star = unravel(jnp.asarray(theta_star, jnp.float32))
  solution, _ = implicit.implicit_grad(smooth_loss, theta_star, v, lam=lam, solver="cg",
                                       maxiter=40, tol=1e-7)
  np.testing.assert_allclose(flat(solution), jacobian.T @ flat(v), rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("solver", ALL_SOLVERS)
def test_large_lam_returns_outer_grad(solver):
  rng = np.random.default_rng(5)
  theta, v = make_tree(rng), make_tree(rng)
  solution, _ = implicit.implicit_grad(smooth_loss, theta, v, lam=1e7, solver=solver, maxiter=3)
  np.testing.assert_allclose(flat(solution), flat(v), rtol=1e-5, atol=1e-6)
  # ...and a moderate λ does not (so the check above can fail).
  moderate, _ = implicit.implicit_grad(smooth_loss, theta, v, lam=0.5, solver="cg", maxiter=3)
  assert np.abs(flat(moderate) - flat(v)).max() > 0.05


@pytest.mark.parametrize("solver", ALL_SOLVERS)
def test_jit_and_vmap_over_outer_grads(solver):
  rng = np.random.default_rng(6)
  theta = make_tree(rng)
  batch = [make_tree(rng) for _ in range(3)]
  stacked = jax.tree_util.tree_map(lambda *leaves: jnp.stack(leaves), *batch)

  def run(v, lam):
    return implicit.implicit_grad(smooth_loss, theta, v, lam=lam, damping=0.5,
                                  solver=solver, maxiter=4)
  eager = [run(v, 0.3) for v in batch]
  batched, infos = jax.jit(jax.vmap(run, in_axes=(0, None)))(stacked, 0.3)
  for i, (solution, info) in enumerate(eager):
    row = jax.tree_util.tree_map(lambda x: x[i], batched)
    np.testing.assert_allclose(flat(row), flat(solution), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(infos.residual[i], info.residual, rtol=1e-3, atol=1e-6)
    assert int(infos.iterations[i]) == int(info.iterations)


def test_linearize_and_jvp_modes_agree():
  rng = np.random.default_rng(7)
  theta, v = make_tree(rng), make_tree(rng)
  for solver in ALL_SOLVERS:
    a, _ = implicit.implicit_grad(smooth_loss, theta, v, lam=0.2, solver=solver, maxiter=4,
                                  hessian_mode="linearize")
    b, _ = implicit.implicit_grad(smooth_loss, theta, v, lam=0.2, solver=solver, maxiter=4,
                                  hessian_mode="jvp")
    np.testing.assert_allclose(flat(a), flat(b), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("solver,kwargs", [
    ("cg", dict(maxiter=40, tol=1e-7)),         # implicit differentiation: needs convergence
    ("layerwise_cg", dict(maxiter=3)),          # differentiated through its iterations
    ("neumann", dict(maxiter=3)),
])
def test_grad_through_implicit_grad_matches_finite_differences(solver, kwargs):
  rng = np.random.default_rng(8)
  theta, v = make_tree(rng, 0.7), make_tree(rng)
  weights = make_tree(rng)

  def outer(theta, v, lam):
    solution, _ = implicit.implicit_grad(smooth_loss, theta, v, lam=lam, damping=1.0,
                                         solver=solver, **kwargs)
    return sum(jnp.sum(jnp.sin(s) * w) for s, w in
               zip(jax.tree_util.tree_leaves(solution), jax.tree_util.tree_leaves(weights)))

  outer_jit = jax.jit(outer)
  grads = jax.jit(jax.grad(outer, argnums=(0, 1, 2)))(theta, v, 0.6)
  d_theta, d_v = make_tree(rng), make_tree(rng)
  eps = 1e-2
  shift = lambda t, d, s: jax.tree_util.tree_map(lambda a, b: a + s * b, t, d)
  fd_theta = (outer_jit(shift(theta, d_theta, eps), v, 0.6)
              - outer_jit(shift(theta, d_theta, -eps), v, 0.6)) / (2 * eps)
  fd_v = (outer_jit(theta, shift(v, d_v, eps), 0.6)
          - outer_jit(theta, shift(v, d_v, -eps), 0.6)) / (2 * eps)
  fd_lam = (outer_jit(theta, v, 0.6 + eps) - outer_jit(theta, v, 0.6 - eps)) / (2 * eps)
  assert abs(float(fd_theta)) > 1e-2   # the Hessian really depends on θ here
  np.testing.assert_allclose(flat(grads[0]) @ flat(d_theta), fd_theta, rtol=5e-3, atol=5e-4)
  np.testing.assert_allclose(flat(grads[1]) @ flat(d_v), fd_v, rtol=5e-3, atol=5e-4)
  np.testing.assert_allclose(grads[2], fd_lam, rtol=5e-3, atol=5e-4)


def conv_loss_and_params(rng):
  """One 3×3 convolution with 4 channels on 8×8 inputs, squared-tanh readout."""
  images = jnp.asarray(rng.normal(size=(2, 8, 8, 1)), jnp.float32)
  params = {"kernel": jnp.asarray(0.5 * rng.normal(size=(3, 3, 1, 4)), jnp.float32),
            "bias": jnp.asarray(0.1 * rng.normal(size=(4,)), jnp.float32)}

  def loss(p):
    out = jax.lax.conv_general_dilated(images, p["kernel"], (1, 1), "SAME",
                                       dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return jnp.mean(jnp.tanh(out + p["bias"]) ** 2)
  return loss, params


@pytest.mark.parametrize("solver,tol", [("cg", 0.0), ("cg", 1e-4), ("layerwise_cg", 0.0)])
def test_unrolled_and_loop_paths_agree_on_conv_net(solver, tol):
  rng = np.random.default_rng(9)
  loss, params = conv_loss_and_params(rng)
  v = jax.tree_util.tree_map(lambda p: jnp.asarray(rng.normal(size=p.shape), jnp.float32), params)
  results = []
  for unroll in (True, False):
    run = jax.jit(lambda v: implicit.implicit_grad(loss, params, v, lam=0.05, damping=0.15,
                                                   solver=solver, maxiter=4, tol=tol,
                                                   unroll=unroll))
    results.append(run(v))
  (x_u, info_u), (x_l, info_l) = results
  # Float32 rounding differs between the two compiled programs; compare on the
  # scale of the solution.
  scale = np.abs(flat(x_l)).max()
  np.testing.assert_allclose(flat(x_u), flat(x_l), rtol=1e-4, atol=2e-5 * scale)
  assert int(info_u.iterations) == int(info_l.iterations)
  assert np.abs(flat(x_u) - flat(v)).max() > 1e-2   # the curvature matters here


def test_input_checks():
  rng = np.random.default_rng(10)
  theta, v = make_tree(rng), make_tree(rng)
  with pytest.raises(ValueError, match="Unknown solver 'lbfgs'.*layerwise_cg"):
    implicit.implicit_grad(smooth_loss, theta, v, lam=1.0, solver="lbfgs")
  with pytest.raises(ValueError, match="Unknown solver"):
    implicit.solve(lambda x: x, v, solver="gmres")
  with pytest.raises(ValueError, match="structure"):
    implicit.implicit_grad(smooth_loss, theta, {"bias": v["bias"]}, lam=1.0)
  with pytest.raises(ValueError, match="hessian mode"):
    implicit.implicit_grad(smooth_loss, theta, v, lam=1.0, hessian_mode="dense")


def test_callable_solver_and_prebuilt_operator():
  rng = np.random.default_rng(7)
  q, _, unravel, loss = quadratic_problem(rng)
  theta = make_tree(rng)
  v = make_tree(rng)
  lam, damping = 0.3, 0.2
  expected = np.linalg.solve(np.eye(7) + q / (lam + damping), flat(v))

  def stock_cg(matvec, b, *, init, maxiter, tol):  # jaxopt's signature; returns a bare x
    return jax.scipy.sparse.linalg.cg(matvec, b, x0=init, maxiter=maxiter, tol=tol)[0]
  x, info = implicit.implicit_grad(loss, theta, v, lam=lam, damping=damping,
                                   solver=stock_cg, maxiter=100, tol=1e-7)
  np.testing.assert_allclose(flat(x), expected, rtol=1e-4, atol=1e-5)
  assert float(info.residual) < 1e-4  # diagnostics computed for a bare-x solver
  assert int(info.iterations) == UNKNOWN_ITERATIONS  # not maxiter: the solver did not say

  # The prebuilt-operator entry point gives the registry solver's answer.
  hessian = implicit.hessian_operator(loss, theta)
  y, _ = jax.jit(lambda b: implicit.implicit_solve(hessian, b, lam=lam, damping=damping,
                                                   solver="cg", maxiter=50, tol=1e-7))(v)
  np.testing.assert_allclose(flat(y), expected, rtol=1e-4, atol=1e-5)
  with pytest.raises(ValueError, match="callable"):
    implicit.resolve_solver("minres_typo")


def test_identity_mask_solves_the_block_operator():
  # A = blockdiag(I, 0) + Q/(λ+δ): only the 'kernel' block carries the identity.
  rng = np.random.default_rng(8)
  q, _, unravel, loss = quadratic_problem(rng)
  theta, v = make_tree(rng), make_tree(rng)
  mask = {"bias": False, "kernel": True}
  lam, damping = 0.5, 0.5
  diag = flat(jax.tree_util.tree_map(lambda x, m: jnp.full(x.shape, float(m)), theta, mask))
  x, _ = implicit.implicit_grad(loss, theta, v, lam=lam, damping=damping, solver="cg",
                                maxiter=200, tol=1e-8, identity_mask=mask)
  expected = np.linalg.solve(np.diag(diag) + q / (lam + damping), flat(v))
  np.testing.assert_allclose(flat(x), expected, rtol=1e-3, atol=1e-5)
  plain, _ = implicit.implicit_grad(loss, theta, v, lam=lam, damping=damping, solver="cg",
                                    maxiter=200, tol=1e-8)
  assert np.max(np.abs(flat(plain) - expected)) > 1e-3  # the mask matters


@pytest.mark.parametrize("solver", ALL_SOLVERS)
def test_nonfinite_rhs_is_rejected_when_concrete_and_flagged_under_jit(solver):
  rng = np.random.default_rng(9)
  _, _, _, loss = quadratic_problem(rng)
  theta, v = make_tree(rng), make_tree(rng)
  v = {**v, "bias": v["bias"].at[1].set(jnp.nan)}
  with pytest.raises(ValueError, match=r"NaN or inf entries in \[\"\['bias'\]\"\]"):
    implicit.implicit_grad(loss, theta, v, lam=0.5, solver=solver, maxiter=3)
  x, info = jax.jit(lambda b: implicit.implicit_grad(loss, theta, b, lam=0.5, solver=solver,
                                                     maxiter=3))(v)
  assert bool(info.nonfinite), solver
  if solver != "layerwise_cg":  # the paper's solver zeroes non-finite entries (but flags them)
    assert not np.all(np.isfinite(flat(x))), f"{solver} hid the NaN"
