"""The EK-FAC solver against dense NumPy solves built by hand from per-example gradients."""
import jax
import jax.numpy as jnp
import numpy as np

from bissl_jax.implicit import solvers
from bissl_jax.implicit.solvers import ekfac
from bissl_jax.implicit.solvers import kfac

from curvature_reference import TwoLayerMLP, conv_problem, random_vector, with_ones

MU = 0.7   # λ + δ


def _ekfac_dense_solve(a_rows, g_rows, per_example, v_mat):
  """EK-FAC by hand, float64: K-FAC's A = mean ããᵀ and G = N Σ ggᵀ, their eigenvectors
  Q = U_A ⊗ U_G, S = diag(Qᵀ F Q) with F the empirical Fisher of the per-example
  gradients (rows: examples, row-major vec of (d_in+1) × d_out), then
  (I + Q diag(S) Qᵀ/μ)⁻¹ vec(V)."""
  n = per_example.shape[0]
  a_factor = a_rows.T @ a_rows / a_rows.shape[0]
  g_factor = n * g_rows.T @ g_rows
  q = np.kron(np.linalg.eigh(a_factor)[1], np.linalg.eigh(g_factor)[1])
  fisher = per_example.T @ per_example / n
  s = np.diag(q.T @ fisher @ q)
  system = np.eye(q.shape[0]) + q @ np.diag(s) @ q.T / MU
  return np.linalg.solve(system, v_mat.ravel()).reshape(v_mat.shape)


def _mlp_problem(n=20):
  rng = np.random.default_rng(0)
  x, y = rng.normal(size=(n, 4)), rng.normal(size=(n, 3))
  model = TwoLayerMLP()
  params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 4)))["params"]
  loss = lambda p: 0.5 * jnp.mean(jnp.sum((model.apply({"params": p}, x) - y) ** 2, -1))
  return x, y, params, loss


def _check_mlp(factor, x, y, params):
  n = x.shape[0]
  # By hand: forward, backprop of the mean loss to the layer outputs; example i's own
  # gradient of its loss is ã_i (N g_i)ᵀ.
  w1, b1 = (np.asarray(params["fc1"][k], np.float64) for k in ("kernel", "bias"))
  w2, b2 = (np.asarray(params["fc2"][k], np.float64) for k in ("kernel", "bias"))
  h = np.tanh(x @ w1 + b1)
  g2 = (h @ w2 + b2 - y) / n
  g1 = (g2 @ w2.T) * (1 - h ** 2)
  v = random_vector(params, 1)
  x_sol, info = kfac.solve(factor, v, MU)   # EK-FAC's factor, K-FAC's exact solve
  for layer, a, g in (("fc1", x, g1), ("fc2", h, g2)):
    a_rows = with_ones(a)
    per_example = np.einsum("ni,nj->nij", a_rows, n * g).reshape(n, -1)
    v_mat = np.concatenate([np.asarray(v[layer]["kernel"]), np.asarray(v[layer]["bias"])[None]])
    want = _ekfac_dense_solve(a_rows, g, per_example, v_mat)
    np.testing.assert_allclose(np.asarray(x_sol[layer]["kernel"]), want[:-1], rtol=2e-4, atol=1e-5)
    np.testing.assert_allclose(np.asarray(x_sol[layer]["bias"]), want[-1], rtol=2e-4, atol=1e-5)
  assert float(info.residual) < 1e-5 and not bool(info.nonfinite)


def test_ekfac_inverse_of_a_two_layer_mlp_matches_a_dense_solve():
  x, y, params, loss = _mlp_problem()
  factor = ekfac.factorize(loss, params)
  assert len(factor.layers) == 2 and factor.scales is not None
  _check_mlp(factor, x, y, params)


def test_ekfac_chunks_of_examples_give_the_same_model(monkeypatch):
  # 20 examples of fc1's 5×5 gradients in chunks of 3 (the last one padded): the same
  # scales as one chunk up to rounding (a miscounted padded example would move them ~5 %).
  x, y, params, loss = _mlp_problem()
  whole = ekfac.factorize(loss, params)  # one chunk
  monkeypatch.setattr(ekfac, "_CHUNK_FLOATS", 3 * 25)
  chunked = jax.jit(ekfac.factorize, static_argnums=0)(loss, params)
  assert chunked.scales is not None and len(chunked.layers) == len(whole.layers) == 2
  for got, want in zip(jax.tree_util.tree_leaves(chunked.scales),
                       jax.tree_util.tree_leaves(whole.scales)):
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-7)
  _check_mlp(chunked, x, y, params)


def test_ekfac_of_a_convolution_sums_each_examples_positions():
  n = 4
  params, loss, a, positions, g = conv_problem(n)
  factor = ekfac.factorize(loss, params)
  a_rows = with_ones(a)
  # Example i's gradient: Σ over its positions of ã (N g)ᵀ.
  per_example = np.einsum("nti,ntj->nij", a_rows.reshape(n, positions, -1),
                          n * g.reshape(n, positions, -1)).reshape(n, -1)
  v = random_vector(params, 2)
  v_mat = np.concatenate([np.asarray(v["conv"]["kernel"]).reshape(-1, 3),
                          np.asarray(v["conv"]["bias"])[None]], 0)
  want = _ekfac_dense_solve(a_rows, g, per_example, v_mat)
  x_sol, _ = solvers.get("ekfac").curvature_solve(factor, v, MU, None)
  np.testing.assert_allclose(np.asarray(x_sol["conv"]["kernel"]).reshape(-1, 3), want[:-1],
                             rtol=2e-4, atol=1e-5)
  np.testing.assert_allclose(np.asarray(x_sol["conv"]["bias"]), want[-1], rtol=2e-4, atol=1e-5)


def test_ekfac_is_registered_as_a_curvature_model_solver():
  spec = solvers.get("ekfac")
  assert spec.is_curvature_model and not spec.needs_operator
  assert "ekfac" not in solvers.SOLVERS
