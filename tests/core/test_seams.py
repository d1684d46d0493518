"""The library's seams: import layers, solvers declared and registered from outside."""
import ast
import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
import flax.linen as nn
import pytest
from jax.flatten_util import ravel_pytree

from bissl_jax.core import alternation as ts
from bissl_jax.core import state as bilevel
from bissl_jax.core.params import init_params
from bissl_jax.core import upper as upper_level
from bissl_jax.implicit import solvers
from bissl_jax.implicit.solvers.base import finish
from bissl_jax.implicit.solvers.spec import SolverSpec
from bissl_jax.tasks import augment
from config_helpers import REPO_ROOT
import test_train_state as tt

PACKAGE = os.path.join(REPO_ROOT, "bissl_jax")


def _imports(folder):
  """``(file, imported module)`` for every import of bissl_jax in ``folder``, at any depth
  of the file (imports inside functions count)."""
  for root, _, files in os.walk(os.path.join(PACKAGE, folder)):
    for name in files:
      if not name.endswith(".py"):
        continue
      path = os.path.join(root, name)
      for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith(
            "bissl_jax"):
          if node.module == "bissl_jax":
            yield from ((path, f"bissl_jax.{a.name}") for a in node.names)
          else:
            yield path, node.module
        elif isinstance(node, ast.Import):
          yield from ((path, a.name) for a in node.names if a.name.startswith("bissl_jax"))


def test_implicit_imports_nothing_else_of_the_library():
  # The standalone utility: usable without models, tasks or the pipeline.
  bad = [(os.path.relpath(p, REPO_ROOT), m) for p, m in _imports("implicit")
         if not (m == "bissl_jax.types" or m == "bissl_jax.implicit"
                 or m.startswith("bissl_jax.implicit."))]
  assert not bad, f"bissl_jax/implicit imports from above its layer: {bad}"


@pytest.mark.parametrize("folder", ["core", "models", "tasks", "runtime"])
def test_lower_layers_never_import_the_pipeline(folder):
  above = ("bissl_jax.pipeline", "bissl_jax.data", "bissl_jax.convert", "bissl_jax.cli",
           "bissl_jax.study_cli", "bissl_jax.config_validation", "bissl_jax.evaluation")
  bad = [(os.path.relpath(p, REPO_ROOT), m) for p, m in _imports(folder)
         if m.startswith(above)]
  assert not bad, f"bissl_jax/{folder} imports from above its layer: {bad}"


def test_the_layers_cannot_be_fooled_by_the_checker():
  # The walk above must see imports inside functions too (several modules import on use).
  found = {m for _, m in _imports("core")}
  assert "bissl_jax.implicit" in found and "bissl_jax.core.state" in found


# ---------------------------------------------------------------------------
# Solvers from outside the library.

RICHARDSON_STEPS = 4
RICHARDSON_OMEGA = 0.5


def richardson(matvec, b, *, init=None, maxiter=5, tol=0.0, unroll=None):
  """``x ← x + ω(b − A x)`` from ``x = 0``: a solver the library does not ship."""
  del init, tol, unroll
  x = jax.tree_util.tree_map(jnp.zeros_like, b)
  for _ in range(maxiter):
    x = jax.tree_util.tree_map(lambda xi, bi, ai: xi + RICHARDSON_OMEGA * (bi - ai),
                               x, b, matvec(x))
  return x, finish(matvec, b, x, x, maxiter, jnp.inf, curvature_tracked=False)


def _count_init(params_like, settings):
  del settings
  return {"pushes": jnp.zeros((), jnp.int32),
          "sum": jax.tree_util.tree_map(jnp.zeros_like, params_like)}


def _count_push(window, grads):
  return {"pushes": window["pushes"] + 1,
          "sum": jax.tree_util.tree_map(jnp.add, window["sum"], grads)}


def _scaled_solve(window, v, lam, settings):
  """``x = v / (1 + ‖ḡ‖²/λ)`` with ḡ the mean stored gradient (a rank-free toy model)."""
  del settings
  flat_sum, _ = ravel_pytree(window["sum"])
  mean_sq = jnp.sum(jnp.square(flat_sum / jnp.maximum(window["pushes"], 1)))
  x = jax.tree_util.tree_map(lambda u: u / (1.0 + mean_sq / lam), v)
  info = finish(lambda u: u, v, x, x, 0, jnp.inf, curvature_tracked=False)
  return x, info._replace(residual=jnp.zeros((), jnp.float32))


@pytest.fixture
def registered():
  specs = [SolverSpec(name="toy_richardson", solve=richardson, summary="a test solver"),
           SolverSpec(name="toy_window", needs="gradient_window", solves_head=False,
                      residual_is_free=True, window_init=_count_init,
                      window_push=_count_push, window_solve=_scaled_solve,
                      summary="a test gradient-window solver")]
  for spec in specs:
    solvers.register(spec)
  yield specs
  for spec in specs:
    solvers.REGISTRY.pop(spec.name)
    solvers.SOLVERS.pop(spec.name, None)


def _dense_damped(setup, state, operator, lam):
  """``A = I + H/(λ+δ)`` as a dense matrix over θ, from the stage's operator."""
  matvec = upper_level.stage_matvec(setup, state, operator)
  theta = state.lower.params["backbone"]
  flat, unravel = ravel_pytree(theta)
  cols = [ravel_pytree(matvec(unravel(e)))[0] for e in np.eye(flat.size, dtype=np.float32)]
  return np.eye(flat.size) + np.stack(cols, 1) / float(lam + setup.damping), unravel


def test_a_registered_operator_solver_runs_a_bissl_alternation(registered):
  # A large δ keeps Richardson's iteration contractive (A ≈ I), so its residual is finite.
  setup = tt.make_setup(solver="toy_richardson", cg_iters=RICHARDSON_STEPS, residual_every=1,
                        damping=100.0)
  assert "toy_richardson" in solvers.names() and setup.solver_spec.needs_operator
  state = tt.make_state(setup)
  batches = tt.make_batches(setup)
  new_state, metrics = ts.make_alternation_fn(setup)(state, batches, jax.random.PRNGKey(1))
  assert np.all(np.asarray(metrics["cg_iterations"]) == RICHARDSON_STEPS)
  assert np.all(np.isfinite(np.asarray(metrics["cg_residual"])))
  leaves = jax.tree_util.tree_leaves(new_state.upper.params)
  assert all(np.all(np.isfinite(np.asarray(leaf))) for leaf in leaves)


def test_the_registered_solver_is_what_the_upper_step_applies(registered):
  # Independent of the alternation: the upper step's v_IG equals Richardson's
  # iteration run by hand on the dense damped matrix.
  # A large δ keeps ‖I − ωA‖ small, so float32 rounding stays small against the reference.
  setup = tt.make_setup(solver="toy_richardson", cg_iters=RICHARDSON_STEPS, upper_steps=1,
                        damping=100.0)
  state = tt.make_state(setup)
  batches = tt.make_batches(setup)
  operator, lam = upper_level.prepare_stage(setup, state, batches.hvp, jax.random.PRNGKey(5))
  v = jax.tree_util.tree_map(lambda t: jnp.ones_like(t) * 0.1, state.lower.params["backbone"])
  x, info, _ = upper_level.implicit_gradient(setup, state, operator, lam, v)
  dense, _ = _dense_damped(setup, state, operator, lam)
  b = np.asarray(ravel_pytree(v)[0], np.float64)
  ref = np.zeros_like(b)
  for _ in range(RICHARDSON_STEPS):
    ref = ref + RICHARDSON_OMEGA * (b - dense @ ref)
  np.testing.assert_allclose(ravel_pytree(x)[0], ref, rtol=2e-4, atol=1e-6)
  assert int(info.iterations) == RICHARDSON_STEPS


def test_a_registered_gradient_window_solver_is_fed_by_the_lower_steps(registered):
  setup = tt.make_setup(solver="toy_window", residual_every=4)
  state = tt.make_state(setup)
  assert state.solver_state.gradient_window is not None
  new_state, metrics = ts.make_alternation_fn(setup)(state, tt.make_batches(setup),
                                                      jax.random.PRNGKey(2))
  # One gradient per lower step, and a residual every step (declared free).
  assert int(new_state.solver_state.gradient_window["pushes"]) == setup.lower_steps
  assert int(metrics["residual_checks"]) == setup.upper_steps
  assert np.all(np.isfinite(np.asarray(metrics["v_ig_norm"])))


def test_declarations_drive_the_combination_checks(registered):
  with pytest.raises(ValueError, match="head_in_implicit"):
    tt.make_setup(solver="toy_window", head_in_implicit=True)
  with pytest.raises(ValueError, match="warm_start"):
    tt.make_setup(solver="toy_richardson", warm_start=True)
  with pytest.raises(ValueError, match="toy_richardson"):
    tt.make_setup(solver="toy_richardson", cg_tol=1e-3)
  with pytest.raises(ValueError, match="Unknown solver 'nope'"):
    tt.make_setup(solver="nope")


def test_a_spec_missing_what_its_kind_needs_is_refused():
  with pytest.raises(ValueError, match="callable `solve`"):
    SolverSpec(name="broken")
  with pytest.raises(ValueError, match="window_init"):
    SolverSpec(name="broken", needs="gradient_window")
  with pytest.raises(TypeError, match="SolverSpec"):
    solvers.register(richardson)


# ---------------------------------------------------------------------------
# A downstream task with its own head, from outside the library.

class _TwoLayerHead(nn.Module):
  """Not the library's linear head: tanh MLP with a scalar output."""

  @nn.compact
  def __call__(self, h):
    return nn.Dense(1, name="out")(jnp.tanh(nn.Dense(5, name="hidden")(h)))[:, 0]


@dataclasses.dataclass(frozen=True)
class LabelRegression:
  """Regresses the class index from pooled features with a two-layer head it owns."""
  model: object
  image_size: int

  def init_head(self, rng, params, batch_stats):
    x = jnp.zeros((1, self.image_size, self.image_size, 3), jnp.float32)
    feats = jax.eval_shape(lambda p, s: self.model.features(p, s, x, train=False)[0],
                           params["backbone"], batch_stats["backbone"])
    return _TwoLayerHead().init(rng, jnp.zeros((1, feats.shape[-1])))["params"]

  def prepare(self, rng, images, *, train):
    del rng, train  # deterministic, so the test can recompute the loss
    return augment.eval_view(None, images, size=self.image_size)

  def loss(self, backbone_params, head_params, backbone_stats, inputs, labels, *, train=True):
    feats, stats = self.model.features(backbone_params, backbone_stats, inputs, train=train)
    pred = _TwoLayerHead().apply({"params": head_params}, feats)
    return jnp.mean(jnp.square(pred - labels.astype(jnp.float32))), stats

  def logits(self, backbone_params, head_params, backbone_stats, inputs):
    feats, _ = self.model.features(backbone_params, backbone_stats, inputs, train=False)
    return _TwoLayerHead().apply({"params": head_params}, feats)


@pytest.mark.parametrize("solver", ["layerwise_cg", "toy_richardson"])
def test_a_downstream_task_with_its_own_head_runs_a_bissl_alternation(registered, solver):
  model = tt.tiny_model()
  task = LabelRegression(model, tt.IMG)
  setup = tt.make_setup(model=model, solver=solver, upper_steps=1, damping=100.0)
  setup = dataclasses.replace(setup, downstream=task)
  params, stats = init_params(model, task, jax.random.PRNGKey(0), tt.IMG)
  # The head is the task's, from the key the model reserves for it.
  expected = task.init_head(model.head_rng(jax.random.PRNGKey(0)), params, stats)
  jax.tree_util.tree_map(np.testing.assert_array_equal, params["downstream_head"], expected)
  assert set(params["downstream_head"]) == {"hidden", "out"}
  state = bilevel.init_bilevel_state(setup, params, stats)
  batches = tt.make_batches(setup)
  new_state, metrics = ts.make_alternation_fn(setup)(state, batches, jax.random.PRNGKey(1))
  assert np.all(np.isfinite(np.asarray(metrics["v_ig_norm"])))
  # One SGD step from zero momentum moves φ_D along −∇_φ L_D (clipping only rescales).
  head = state.upper.params["downstream_head"]
  grad = jax.grad(lambda h: task.loss(
      state.upper.params["backbone"], h, state.upper.batch_stats["backbone"],
      task.prepare(None, batches.downstream_images[0], train=True),
      jnp.asarray(batches.downstream_labels[0]))[0])(head)
  step = jax.tree_util.tree_map(jnp.subtract, new_state.upper.params["downstream_head"], head)
  g, d = ravel_pytree(grad)[0], ravel_pytree(step)[0]
  cosine = float(jnp.dot(-g, d) / (jnp.linalg.norm(g) * jnp.linalg.norm(d)))
  assert cosine > 0.999
