"""Gauss–Newton operators against dense Hessians and Jacobians, and on SimCLR/BYOL."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from bissl_jax.core import hessian
from bissl_jax.implicit import gauss_newton as gn
from bissl_jax import implicit
from bissl_jax.models import resnet
from bissl_jax.tasks import pretext


def dense(matvec, like, chunk=64):
  """The matrix of a linear map on pytrees shaped like ``like`` (column j = map(e_j)).

  Vmapped over at most ``chunk`` columns at a time: on XLA:CPU (jax 0.10.2) vmapping
  conv-net products over 256 columns at once returned wrong columns.
  """
  flat, unravel = ravel_pytree(like)
  columns = jax.jit(jax.vmap(lambda e: ravel_pytree(matvec(unravel(e)))[0]))
  basis = np.eye(flat.size, dtype=np.float32)
  rows = [np.asarray(columns(jnp.asarray(basis[i:i + chunk])), np.float64)
          for i in range(0, flat.size, chunk)]
  return np.concatenate(rows, axis=0).T


def flat(tree):
  return np.asarray(ravel_pytree(tree)[0], np.float64)


# ---------------------------------------------------------------------------
# Generic operators.

def least_squares(rng):
  """A linear model f(p) = X_a vec(a) + X_b b with a weighted squared error ℓ."""
  params = {"a": jnp.asarray(rng.normal(size=(3, 2)), jnp.float32),
            "b": jnp.asarray(rng.normal(size=(4,)), jnp.float32)}
  xa = jnp.asarray(rng.normal(size=(9, 6)), jnp.float32)
  xb = jnp.asarray(rng.normal(size=(9, 4)), jnp.float32)
  y = jnp.asarray(rng.normal(size=(9,)), jnp.float32)
  w = jnp.asarray(rng.uniform(0.5, 2.0, size=(9,)), jnp.float32)
  output_fn = lambda p: {"z": xa @ p["a"].reshape(-1) + xb @ p["b"]}
  output_loss = lambda out: 0.5 * jnp.sum(w * jnp.square(out["z"] - y))
  return params, output_fn, output_loss


def test_gauss_newton_equals_the_hessian_on_least_squares():
  params, output_fn, output_loss = least_squares(np.random.default_rng(0))
  operator = gn.gauss_newton_operator(output_fn, output_loss, params)
  loss = lambda p: output_loss(output_fn(p))
  flat_params, unravel = ravel_pytree(params)
  hessian = jax.hessian(lambda x: loss(unravel(x)))(flat_params)
  np.testing.assert_allclose(dense(operator, params), np.asarray(hessian), rtol=1e-5,
                             atol=1e-4)


def test_gauss_newton_equals_explicit_jacobians_on_a_nonlinear_model():
  rng = np.random.default_rng(1)
  params = {"w": jnp.asarray(rng.normal(size=(5, 4)), jnp.float32),
            "u": jnp.asarray(rng.normal(size=(4,)), jnp.float32)}
  x = jnp.asarray(rng.normal(size=(4,)), jnp.float32)
  output_fn = lambda p: jnp.tanh(p["w"] @ (x * p["u"]))
  output_loss = lambda z: jax.nn.logsumexp(z) - z[0]           # convex (cross-entropy)
  operator = gn.gauss_newton_operator(output_fn, output_loss, params)
  flat_params, unravel = ravel_pytree(params)
  jac = np.asarray(jax.jacobian(lambda q: output_fn(unravel(q)))(flat_params), np.float64)
  z = output_fn(params)
  loss_hessian = np.asarray(jax.hessian(output_loss)(z), np.float64)
  g = dense(operator, params)
  np.testing.assert_allclose(g, jac.T @ loss_hessian @ jac, rtol=1e-4, atol=1e-5)
  assert np.linalg.eigvalsh(0.5 * (g + g.T)).min() > -1e-5
  # The full Hessian differs here (the curvature of tanh), so the check can fail.
  full = np.asarray(jax.hessian(lambda q: output_loss(output_fn(unravel(q))))(flat_params))
  assert np.abs(full - g).max() > 1e-2


def test_gauss_newton_cg_equals_linearize_cg_on_least_squares():
  params, output_fn, output_loss = least_squares(np.random.default_rng(2))
  rng = np.random.default_rng(3)
  v = jax.tree_util.tree_map(lambda p: jnp.asarray(rng.normal(size=p.shape), jnp.float32),
                             params)
  lam, damping = 0.01, 2.0
  operator = gn.gauss_newton_operator(output_fn, output_loss, params)
  loss = lambda p: output_loss(output_fn(p))
  for iters in (2, 4, 10):
    x_gn, info_gn = implicit.implicit_solve(operator, v, lam=lam, damping=damping,
                                            solver="cg", maxiter=iters)
    x_lin, info_lin = implicit.implicit_grad(loss, params, v, lam=lam, damping=damping,
                                             solver="cg", maxiter=iters,
                                             hessian_mode="linearize")
    np.testing.assert_allclose(flat(x_gn), flat(x_lin), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(float(info_gn.residual), float(info_lin.residual),
                               rtol=1e-2, atol=1e-6)
  a = np.eye(10) + dense(operator, params) / (lam + damping)
  np.testing.assert_allclose(flat(x_gn), np.linalg.solve(a, flat(v)), rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------
# Pretext tasks.

@functools.lru_cache(maxsize=1)
def tiny_problem():
  """A one-block ResNet of width 4 (≈ 900 backbone parameters) on 8-px images."""
  model = resnet.BisslModel(
      backbone=resnet.ResNet(stage_sizes=(1,), block="basic", width=4),
      projector=resnet.MLPHead(features=(8, 5)), predictor=resnet.MLPHead(features=(8, 5)))
  params, stats = model.init(jax.random.PRNGKey(0), 8)
  rng = np.random.default_rng(4)
  views = tuple(jnp.asarray(rng.normal(size=(3, 8, 8, 3)), jnp.float32) for _ in range(2))
  lower = {"backbone": params["backbone"], "pretext_head": params["pretext_head"]}
  return model, lower, stats, views


def tasks():
  model, lower, stats, views = tiny_problem()
  simclr = pretext.SimCLR(model=model)
  byol = pretext.BYOL(model=model)
  return {"simclr": (simclr, None), "byol": (byol, byol.init_target(lower, stats))}


@pytest.mark.parametrize("name", ["simclr", "byol"])
def test_output_loss_of_outputs_is_the_pretext_loss(name):
  _, lower, stats, views = tiny_problem()
  task, target = tasks()[name]
  loss = task.loss(lower, stats, views, target)[0]
  outputs = task.outputs(lower, stats, views, target)
  value = task.output_loss(outputs, views, target)
  if name == "simclr":   # the same operations: bit for bit
    assert float(value) == float(loss)
  else:                  # ‖p̂ − ẑ‖² vs 2 − 2·cos: equal up to rounding
    np.testing.assert_allclose(float(value), float(loss), rtol=1e-6, atol=1e-6)
  assert outputs.shape == ((6, 6) if name == "simclr" else (6, 5))   # logits / p̂


@pytest.mark.parametrize("name", ["simclr", "byol"])
def test_gauss_newton_is_psd_on_pretext_tasks(name):
  _, lower, stats, views = tiny_problem()
  task, target = tasks()[name]
  operator = hessian.gauss_newton_hessian(task, lower, stats, views, target)
  g = dense(operator, lower["backbone"])
  eig = np.linalg.eigvalsh(0.5 * (g + g.T))
  assert np.abs(g - g.T).max() <= 1e-4 * np.abs(g).max()
  assert eig.max() > 0
  assert eig.min() >= -1e-5 * eig.max()


def test_gauss_newton_hessian_crosses_jit_boundaries_and_covers_the_head():
  _, lower, stats, views = tiny_problem()
  task, _ = tasks()["simclr"]
  rng = np.random.default_rng(5)
  v = jax.tree_util.tree_map(lambda p: jnp.asarray(rng.normal(size=p.shape), jnp.float32),
                             lower["backbone"])
  build = jax.jit(lambda lp, st, vw: hessian.gauss_newton_hessian(task, lp, st, vw))
  operator = build(lower, stats, views)              # a Partial, returned from jit
  applied = jax.jit(lambda op, x: op(x))(operator, v)
  eager = hessian.gauss_newton_hessian(task, lower, stats, views)(v)
  scale = np.abs(flat(eager)).max()
  np.testing.assert_allclose(flat(applied), flat(eager), rtol=1e-4, atol=1e-5 * scale)
  # wrt=None: over backbone and pretext head; its backbone block is the same operator.
  both = hessian.gauss_newton_hessian(task, lower, stats, views, wrt=None)
  zeros_head = jax.tree_util.tree_map(jnp.zeros_like, lower["pretext_head"])
  out = both({"backbone": v, "pretext_head": zeros_head})
  np.testing.assert_allclose(flat(out["backbone"]), flat(eager), rtol=1e-4, atol=1e-5 * scale)
  with pytest.raises(ValueError, match="output_loss"):
    hessian.gauss_newton_hessian(object(), lower, stats, views)
