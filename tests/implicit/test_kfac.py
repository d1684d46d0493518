"""The K-FAC solver against dense NumPy solves with Kronecker blocks built by hand."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bissl_jax.implicit import solvers
from bissl_jax.implicit.solvers import kfac

from curvature_reference import SmallConv, TwoLayerMLP, conv_problem, random_vector, with_ones

MU = 0.7   # λ + δ


def _dense_solve(blocks, v_mats):
  """``(I + blockdiag(A ⊗ G)/μ)⁻¹ vec(V)`` per block, row-major vec(V) (NumPy, float64)."""
  out = []
  for (a, g), v in zip(blocks, v_mats):
    system = np.eye(a.shape[0] * g.shape[0]) + np.kron(a, g) / MU
    out.append(np.linalg.solve(system, v.ravel()).reshape(v.shape))
  return out


def test_kfac_inverse_of_a_two_layer_mlp_matches_a_dense_solve():
  rng = np.random.default_rng(0)
  n = 7
  x, y = rng.normal(size=(n, 4)), rng.normal(size=(n, 3))
  model = TwoLayerMLP()
  params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 4)))["params"]
  loss = lambda p: 0.5 * jnp.mean(jnp.sum((model.apply({"params": p}, x) - y) ** 2, -1))
  factor = kfac.factorize(loss, params)
  assert len(factor.layers) == 2

  # By hand: forward, backprop of the mean loss to the layer outputs, then
  # A = mean ãᵀã (ã = [a, 1]) and G = N Σ gᵀg.
  w1, b1 = (np.asarray(params["fc1"][k], np.float64) for k in ("kernel", "bias"))
  w2, b2 = (np.asarray(params["fc2"][k], np.float64) for k in ("kernel", "bias"))
  h = np.tanh(x @ w1 + b1)
  g2 = (h @ w2 + b2 - y) / n
  g1 = (g2 @ w2.T) * (1 - h ** 2)
  blocks = [(with_ones(a).T @ with_ones(a) / n, n * g.T @ g) for a, g in ((x, g1), (h, g2))]

  v = random_vector(params, 1)
  v_mats = [np.concatenate([np.asarray(v[l]["kernel"]), np.asarray(v[l]["bias"])[None]], 0)
            for l in ("fc1", "fc2")]
  expected = _dense_solve(blocks, v_mats)
  x_sol, info = kfac.solve(factor, v, MU)
  for layer, want in zip(("fc1", "fc2"), expected):
    np.testing.assert_allclose(np.asarray(x_sol[layer]["kernel"]), want[:-1],
                               rtol=2e-4, atol=1e-5)
    np.testing.assert_allclose(np.asarray(x_sol[layer]["bias"]), want[-1], rtol=2e-4, atol=1e-5)
  assert float(info.residual) < 1e-5 and not bool(info.nonfinite)
  assert np.abs(np.asarray(x_sol["fc1"]["kernel"]) - np.asarray(v["fc1"]["kernel"])).max() > 1e-3


def test_kfac_inverse_of_a_convolution_matches_a_dense_solve():
  n = 3
  params, loss, a, positions, g = conv_problem(n)
  factor = kfac.factorize(loss, params)
  blocks = [(with_ones(a).T @ with_ones(a) / a.shape[0], n * g.T @ g)]

  v = random_vector(params, 2)
  v_mat = np.concatenate([np.asarray(v["conv"]["kernel"]).reshape(-1, 3),
                          np.asarray(v["conv"]["bias"])[None]], 0)
  (want,) = _dense_solve(blocks, [v_mat])
  x_sol, _ = kfac.solve(factor, v, MU)
  np.testing.assert_allclose(np.asarray(x_sol["conv"]["kernel"]).reshape(-1, 3), want[:-1],
                             rtol=2e-4, atol=1e-5)
  np.testing.assert_allclose(np.asarray(x_sol["conv"]["bias"]), want[-1], rtol=2e-4, atol=1e-5)


def test_leaves_without_a_block_are_left_as_v_and_frozen_kernels_are_skipped():
  class WithNorm(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.Dense(2, name="out")(nn.LayerNorm(name="norm")(nn.Dense(4, name="fc")(x)))

  model = WithNorm()
  params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 3)))["params"]
  x = jax.random.normal(jax.random.PRNGKey(1), (6, 3))
  # Only "fc" and "norm" are in the solve space: "out" is frozen (closed over).
  loss = lambda p: jnp.mean(model.apply({"params": {**p, "out": params["out"]}}, x) ** 2)
  space = {"fc": params["fc"], "norm": params["norm"]}
  factor = kfac.factorize(loss, space)
  assert len(factor.layers) == 1                     # fc only
  v = random_vector(space, 3)
  x_sol, _ = kfac.solve(factor, v, MU)
  np.testing.assert_array_equal(np.asarray(x_sol["norm"]["scale"]), np.asarray(v["norm"]["scale"]))
  assert np.abs(np.asarray(x_sol["fc"]["kernel"]) - np.asarray(v["fc"]["kernel"])).max() > 1e-4


def test_kfac_is_registered_as_a_curvature_model_solver():
  spec = solvers.get("kfac")
  assert spec.is_curvature_model and not spec.needs_operator
  assert "kfac" not in solvers.SOLVERS
  with pytest.raises(ValueError, match="curvature_factor"):
    solvers.SolverSpec(name="broken", needs="curvature_model")



def test_a_convolution_factor_passes_between_jitted_functions():
  """The per-step driver builds the factor in one jitted call and solves in another:
  its static layout (the convolution geometry included) must be hashable."""
  model = SmallConv()
  params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 5, 5, 2)))["params"]
  x = jax.random.normal(jax.random.PRNGKey(1), (2, 5, 5, 2))
  loss = lambda p: jnp.mean(model.apply({"params": p}, x) ** 2)
  factor = jax.jit(lambda p: kfac.factorize(loss, p))(params)
  hash(jax.tree_util.tree_structure(factor))
  v = random_vector(params, 4)
  x_jit, _ = jax.jit(lambda f, v: kfac.solve(f, v, MU))(factor, v)
  x_eager, _ = kfac.solve(factor, v, MU)
  np.testing.assert_allclose(np.asarray(x_jit["conv"]["kernel"]),
                             np.asarray(x_eager["conv"]["kernel"]), rtol=1e-5, atol=1e-6)
