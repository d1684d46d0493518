"""implicit_grad(preconditioner='kfac' | 'ekfac' | 'mfac'): the curvature models built by
name, checked against preconditioned CG written in NumPy with the models built by hand."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from bissl_jax import implicit
from bissl_jax.implicit import preconditioners

LAM, DAMPING = 0.3, 0.2
MU = LAM + DAMPING
N, D_IN, D_OUT = 40, 4, 3


def _problem():
  """One Dense layer under a mean squared loss: H = A ⊗ I exactly (row-major vec of
  [kernel; bias]); K-FAC's model A ⊗ G differs from it (G: the residuals' covariance).
  Feature scales from 0.1 to 10 make A = I + H/μ ill-conditioned."""
  rng = np.random.default_rng(0)
  x = rng.normal(size=(N, D_IN)) * np.array([0.1, 1.0, 3.0, 10.0])
  y = rng.normal(size=(N, D_OUT))
  model = nn.Dense(D_OUT)
  params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, D_IN)))
  loss = lambda p: 0.5 * jnp.mean(jnp.sum((model.apply(p, x) - y) ** 2, -1))
  outer = jax.tree_util.tree_map(lambda p: jnp.asarray(rng.normal(size=p.shape), jnp.float32),
                                 params)
  return x, y, params, loss, outer


def _in_ravel_order(matrix):
  """A matrix on row-major vec([kernel; bias]) as one on ravel_pytree's order (the
  bias leaf first, then the kernel)."""
  size = matrix.shape[0]
  order = np.concatenate([np.arange(size - D_OUT, size), np.arange(size - D_OUT)])
  return matrix[np.ix_(order, order)]


def _pcg(a, m, b, steps):
  """Preconditioned CG from 0, NumPy float64."""
  x, r = np.zeros_like(b), b.copy()
  z = m @ r
  p, rz = z.copy(), r @ z
  for _ in range(steps):
    ap = a @ p
    alpha = rz / (p @ ap)
    x, r = x + alpha * p, r - alpha * ap
    z = m @ r
    rz, rz_old = r @ z, rz
    p = z + (rz / rz_old) * p
  return x


def _dense(x, y, params):
  """``(A = I + H/μ, K-FAC's M)`` in ravel_pytree's order, from the data by hand."""
  w = np.asarray(params["params"]["kernel"], np.float64)
  b = np.asarray(params["params"]["bias"], np.float64)
  xt = np.concatenate([x, np.ones((N, 1))], axis=1)
  a_factor = xt.T @ xt / N
  g = (x @ w + b - y) / N                  # ∂(mean loss)/∂ output
  g_factor = N * g.T @ g
  size = (D_IN + 1) * D_OUT
  hessian = np.kron(a_factor, np.eye(D_OUT))
  a = _in_ravel_order(np.eye(size) + hessian / MU)
  m = _in_ravel_order(np.linalg.inv(np.eye(size) + np.kron(a_factor, g_factor) / MU))
  return a, m


def _grad(loss, params, outer, **kwargs):
  return jax.jit(lambda p, v: implicit.implicit_grad(loss, p, v, lam=LAM, damping=DAMPING,
                                                     **kwargs))(params, outer)


def test_kfac_by_name_is_pcg_with_the_kfac_inverse_built_by_hand():
  x, y, params, loss, outer = _problem()
  a, m = _dense(x, y, params)
  v = np.asarray(ravel_pytree(outer)[0], np.float64)
  for steps in (1, 2):
    got, _ = _grad(loss, params, outer, solver="cg", maxiter=steps, preconditioner="kfac")
    want = _pcg(a, m, v, steps)
    np.testing.assert_allclose(np.asarray(ravel_pytree(got)[0]), want, rtol=2e-4,
                               atol=2e-5 * np.abs(want).max())
  # ... and it is not plain CG: the preconditioner changed the iterate.
  plain = _pcg(a, np.eye(len(v)), v, 2)
  assert np.abs(_pcg(a, m, v, 2) - plain).max() > 1e-2 * np.abs(plain).max()


@pytest.mark.parametrize("name", ["kfac", "ekfac"])
def test_curvature_model_preconditioned_minres_converges_to_the_dense_solve(name):
  # The model is not H here (G is the residuals' covariance, H has I there), so this
  # checks that preconditioning changes the path, not the answer.
  x, y, params, loss, outer = _problem()
  a, _ = _dense(x, y, params)
  v = np.asarray(ravel_pytree(outer)[0], np.float64)
  exact = np.linalg.solve(a, v)
  plain, plain_info = _grad(loss, params, outer, solver="minres", maxiter=40, tol=1e-5)
  pre, pre_info = _grad(loss, params, outer, solver="minres", maxiter=40, tol=1e-5,
                        preconditioner=name)
  for got in (plain, pre):
    np.testing.assert_allclose(np.asarray(ravel_pytree(got)[0]), exact, rtol=0,
                               atol=1e-3 * np.abs(exact).max())
  assert int(pre_info.iterations) != int(plain_info.iterations)
  assert float(pre_info.residual) < 1e-3 and float(plain_info.residual) < 1e-3


def test_mfac_by_name_is_pcg_with_the_per_leaf_woodbury_inverse():
  x, y, params, loss, outer = _problem()
  a, _ = _dense(x, y, params)
  rng = np.random.default_rng(3)
  m_rows = 6
  grads = jax.tree_util.tree_map(
      lambda p: jnp.asarray(rng.normal(size=(m_rows,) + p.shape), jnp.float32), params)
  # M per leaf (bias, kernel): (I + G_lᵀG_l/(m μ))⁻¹, G_l the leaf's m stored gradients.
  blocks = [np.asarray(g, np.float64).reshape(m_rows, -1)
            for g in jax.tree_util.tree_leaves(grads)]
  m = np.zeros_like(a)
  start = 0
  for g in blocks:
    k = g.shape[1]
    m[start:start + k, start:start + k] = np.linalg.inv(np.eye(k) + g.T @ g / (m_rows * MU))
    start += k
  v = np.asarray(ravel_pytree(outer)[0], np.float64)
  got, _ = _grad(loss, params, outer, solver="cg", maxiter=2, preconditioner="mfac",
                 preconditioner_gradients=grads)
  want = _pcg(a, m, v, 2)
  np.testing.assert_allclose(np.asarray(ravel_pytree(got)[0]), want, rtol=2e-4,
                             atol=2e-5 * np.abs(want).max())


def test_a_name_without_its_inputs_is_refused_with_the_fix():
  x, y, params, loss, outer = _problem()
  with pytest.raises(ValueError, match="preconditioner_gradients"):
    implicit.implicit_grad(loss, params, outer, lam=LAM, solver="cg", preconditioner="mfac")
  with pytest.raises(ValueError, match="only read by preconditioner='mfac'"):
    implicit.implicit_grad(loss, params, outer, lam=LAM, solver="cg", preconditioner="kfac",
                           preconditioner_gradients=outer)
  with pytest.raises(ValueError, match="found no Flax nn.Dense/nn.Conv layer"):
    implicit.implicit_grad(lambda p: sum(jnp.sum(l ** 2) for l in jax.tree_util.tree_leaves(p)),
                           params, outer, lam=LAM, solver="cg", preconditioner="kfac")
  with pytest.raises(ValueError, match="only implicit_grad has"):
    implicit.implicit_solve(lambda t: t, outer, lam=LAM, solver="cg", preconditioner="kfac")
  with pytest.raises(ValueError, match="cannot take a preconditioner"):
    implicit.implicit_grad(loss, params, outer, lam=LAM, solver="neumann",
                           preconditioner="kfac")
  with pytest.raises(ValueError, match="Unknown preconditioner 'jacobi'"):
    implicit.implicit_grad(loss, params, outer, lam=LAM, solver="cg", preconditioner="jacobi")
  assert preconditioners.NAMES == ("mfac", "kfac", "ekfac")
