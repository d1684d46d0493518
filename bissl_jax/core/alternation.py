"""BiSSL training core: Algorithm 1 of the paper composed from pure functions.

One *alternation* runs N_L lower steps (:func:`lower_stage`), then one upper stage
of N_U steps (:func:`upper_stage`):

* lower step (:func:`bissl_jax.core.lower.lower_step`): pretext loss +
  ``lam/2·‖θ_P − sg(θ_D)‖²``, global-norm clip 10, LARS, BYOL EMA;
* upper stage: :func:`bissl_jax.core.upper.prepare_stage` builds the Hessian
  operator of the pretext loss once (θ_P, φ_P and the HVP batch are fixed for the
  stage); every :func:`bissl_jax.core.upper.upper_step` reuses it to solve for the
  implicit gradient and applies SGD.

Both stages loop through :mod:`bissl_jax.implicit.loops` (unrolled on XLA:CPU, ``lax.scan``
elsewhere). :func:`alternation` is the whole of one alternation as one pure
function. :func:`make_alternation_fn` compiles it data-parallel over a device mesh
with one of two *drivers* (``setup.stage_driver``): ``'fused'`` jits the whole
alternation; ``'per_step'`` jits one lower step, the stage preparation and one upper
step, and loops over them from the host (the CPU default: a single jit with N_U
unrolled upper steps compiles super-linearly in N_U). Both run the same functions
with the same random keys and give the same result.
"""
import dataclasses
import functools
from typing import Any, Callable, NamedTuple, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from bissl_jax.implicit import loops
from bissl_jax.runtime import mesh as parallel
from bissl_jax.implicit import tree_math
from bissl_jax.core import penalty
from bissl_jax.core import upper as upper_level
from bissl_jax.core.state import AlternationBatches, BilevelState, BisslSetup
from bissl_jax.runtime.errors import NonFiniteError
from bissl_jax.core.lower import lower_step
from bissl_jax.core.upper import prepare_stage, upper_step
from bissl_jax.types import PyTree


# ---------------------------------------------------------------------------
# The key schedule: one definition, used by both drivers and the benches.

class AlternationKeys(NamedTuple):
  """The random keys of one alternation."""
  lower: jax.Array   # (N_L,) one per lower step (the task's prepare)
  hvp: jax.Array     # the HVP batch's preparation
  upper: jax.Array   # (N_U,) one per upper step (the downstream augmentation)


def lower_keys(lower_rng, steps: int) -> jax.Array:
  """The lower stage's per-step keys from its stage key."""
  return jax.random.split(lower_rng, steps)


def upper_keys(upper_rng, steps: int) -> Tuple[jax.Array, jax.Array]:
  """``(hvp key, per-step keys)`` of the upper stage from its stage key."""
  hvp_rng, step_rng = jax.random.split(upper_rng)
  return hvp_rng, jax.random.split(step_rng, steps)


def stage_keys(rng) -> Tuple[jax.Array, jax.Array]:
  """``(lower stage key, upper stage key)`` of one alternation from its key."""
  lower_rng, upper_rng = jax.random.split(rng)
  return lower_rng, upper_rng


def alternation_keys(rng, lower_steps: int, upper_steps: int) -> AlternationKeys:
  """Every key of one alternation from its key: the lower stage's, then the upper's."""
  lower_rng, upper_rng = stage_keys(rng)
  hvp, upper = upper_keys(upper_rng, upper_steps)
  return AlternationKeys(lower=lower_keys(lower_rng, lower_steps), hvp=hvp, upper=upper)


# ---------------------------------------------------------------------------
# The alternation as one pure function (the fused driver jits it whole).

def lower_stage(setup: BisslSetup, state: BilevelState, pretext_images, rng
                ) -> Tuple[BilevelState, dict]:
  """N_L lower steps; ``pretext_images`` is ``(N_L, B, ...)``; ``rng`` the stage's key.

  Returns:
    ``(state, metrics)`` with per-step metric arrays of length N_L.
  """
  keys = lower_keys(rng, pretext_images.shape[0])
  return loops.scan(lambda s, xs: lower_step(setup, s, *xs), state, (pretext_images, keys),
                    unroll=setup.use_unrolled)


def upper_stage(setup: BisslSetup, state: BilevelState, hvp_images, downstream_images,
                downstream_labels, rng) -> Tuple[BilevelState, dict]:
  """N_U upper steps sharing one Hessian operator, built once here.

  Args:
    setup: the static setup.
    state: the current state.
    hvp_images: one raw pretext batch for the Hessian, prepared (augmented) once.
    downstream_images: ``(N_U, b, ...)``.
    downstream_labels: ``(N_U, b)`` or ``(N_U, b, K)``, or a tree of such arrays.
    rng: PRNG key.

  Returns:
    ``(state, metrics)`` with per-step metric arrays of length N_U.
  """
  hvp_rng, keys = upper_keys(rng, downstream_images.shape[0])
  prepare, step = upper_method_functions(setup)
  operator, lam = prepare(setup, state, hvp_images, hvp_rng)

  def body(s, xs):
    return step(setup, s, operator, lam, *xs)
  return loops.scan(body, state, (downstream_images, downstream_labels, keys),
                    unroll=setup.use_unrolled)


def upper_method_functions(setup: BisslSetup) -> Tuple[Callable, Callable]:
  """``(prepare_stage, upper_step)`` of ``config.bissl.upper_method``: the implicit
  gradient (:mod:`bissl_jax.core.upper`) or the penalty method
  (:mod:`bissl_jax.core.penalty`); both take the same arguments."""
  if setup.upper_method == "penalty":
    return penalty.prepare_stage, penalty.upper_step
  return prepare_stage, upper_step


def summarize_metrics(lower: dict, upper: dict, state: BilevelState) -> dict:
  """Reduces per-step metrics of one alternation to scalars (still on device)."""
  out = {k: jnp.mean(v) for k, v in lower.items() if k != "lower_nonfinite"}
  out.update({k: jnp.mean(v) for k, v in upper.items()
              if k not in ("upper_nonfinite", "cg_min_curvature", "lam", "cg_residual",
                           "residual_checked")})
  # The residual exists on checked steps only (config.bissl.residual_every): its
  # mean and last value over those, NaN when this alternation checked none.
  checked, residual = upper["residual_checked"], upper["cg_residual"]
  count = jnp.sum(checked)
  out["cg_residual"] = jnp.where(count > 0, jnp.sum(jnp.where(checked, residual, 0.0))
                                 / jnp.maximum(count, 1), jnp.nan)
  last = jnp.max(jnp.where(checked, jnp.arange(checked.shape[0]), -1))
  out["cg_residual_last"] = jnp.where(last >= 0, residual[jnp.maximum(last, 0)], jnp.nan)
  out["residual_checks"] = count
  out["cg_min_curvature"] = jnp.min(upper["cg_min_curvature"])
  out["lam"] = upper["lam"][-1]
  out["lower_nonfinite"] = jnp.any(lower["lower_nonfinite"])
  out["upper_nonfinite"] = jnp.any(upper["upper_nonfinite"])
  gap = tree_math.tree_sub(state.lower.params["backbone"], state.upper.params["backbone"])
  out["theta_distance"] = tree_math.tree_norm(gap)
  return out


def alternation(setup: BisslSetup, state: BilevelState, batches: AlternationBatches, rng
                ) -> Tuple[BilevelState, dict]:
  """One whole alternation: N_L lower steps, one upper stage, the counter, the summary."""
  lower_rng, upper_rng = stage_keys(rng)
  state, lower_metrics = lower_stage(setup, state, batches.pretext, lower_rng)
  state, upper_metrics = upper_stage(setup, state, batches.hvp, batches.downstream_images,
                                     batches.downstream_labels, upper_rng)
  state = state.replace(alternation=state.alternation + 1)
  return state, summarize_metrics(lower_metrics, upper_metrics, state)


def _stack(per_step):
  return jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *per_step)


# ---------------------------------------------------------------------------
# The per-step driver: one jit per step, looped from the host.

class StepFunctions(NamedTuple):
  """The per-step driver's compiled pieces (a bench may pass compiled executables).

  ``lower_step`` and ``upper_step`` donate the state they are given: its buffers are
  updated in place (M-FAC's window takes one gradient without being copied) and
  cannot be read afterwards. :func:`run_lower_steps` and :func:`run_upper_steps` copy
  a state they do not own once, with :func:`copy_state`.
  """
  lower_step: Callable      # (state, images, key) -> (state, metrics)
  prepare_stage: Callable   # (state, hvp_images, key) -> (operator, lam)
  upper_step: Callable      # (state, operator, lam, images, labels, key) -> (state, metrics)
  #                           or, when the residual is deferred, -> (state, metrics, system)
  residual: Callable        # (state, operator, lam, system, nonfinite) -> metrics


@jax.jit
def copy_state(state: PyTree) -> PyTree:
  """A copy of ``state`` in buffers of its own (none shared between its leaves), for a
  step that donates its input: the caller's state stays readable."""
  return jax.tree_util.tree_map(jnp.copy, state)


def step_functions(setup: BisslSetup, mesh) -> StepFunctions:
  """Jits :func:`lower_step`, :func:`prepare_stage` and the upper step for ``mesh``;
  the two steps donate their input state."""
  rep = parallel.replicated(mesh)
  batch0 = parallel.batch_sharding(mesh, 0)
  deferred = setup.residual_policy.deferred  # never for the penalty method
  prepare, upper = upper_method_functions(setup)
  upper = upper_level.upper_step_deferred if deferred else upper
  return StepFunctions(
      lower_step=jax.jit(functools.partial(lower_step, setup), in_shardings=(rep, batch0, rep),
                         out_shardings=(rep, rep), donate_argnums=(0,)),
      prepare_stage=jax.jit(functools.partial(prepare, setup),
                            in_shardings=(rep, batch0, rep)),
      upper_step=jax.jit(functools.partial(upper, setup),
                         in_shardings=(rep, None, rep, batch0, batch0, rep),
                         out_shardings=(rep, rep, rep) if deferred else (rep, rep),
                         donate_argnums=(0,)),
      residual=jax.jit(functools.partial(upper_level.deferred_residual, setup),
                       in_shardings=(rep, None, rep, rep, rep), out_shardings=rep))


def run_lower_steps(steps: StepFunctions, state: BilevelState, pretext_images, keys, *,
                    owned: bool = False):
  """N_L calls of the compiled lower step; ``(state, [metrics of each step])``.

  ``owned``: the caller gives ``state`` up (its buffers are donated); otherwise it is
  copied once first and stays readable.
  """
  state = state if owned else copy_state(state)
  metrics = []
  # Indexed, not iterated: iterating a stack spread over several processes' devices
  # is refused by JAX (not every row is addressable here); indexing is a computation.
  for i, key in enumerate(keys):
    state, m = steps.lower_step(state, pretext_images[i], key)
    metrics.append(m)
  return state, metrics


def run_upper_steps(setup: BisslSetup, steps: StepFunctions, state: BilevelState, hvp_images,
                    downstream_images, downstream_labels, hvp_key, keys, *,
                    owned: bool = False):
  """One operator build and N_U compiled upper steps; ``(state, [metrics of each step])``.

  With a deferred residual (``setup.residual_policy.deferred``) which steps check is
  decided here, one host read per stage, so the compiled step holds no ``lax.cond``.
  ``owned`` as in :func:`run_lower_steps`.
  """
  policy = setup.residual_policy
  state = state if owned else copy_state(state)
  operator, lam = steps.prepare_stage(state, hvp_images, hvp_key)
  first = int(jax.device_get(state.upper.step)) if policy.deferred else 0
  metrics = []
  # Labels may be a tree (detection's boxes, classes, masks): step i takes row i of each leaf.
  labels_of = lambda i: jax.tree_util.tree_map(lambda a: a[i], downstream_labels)
  for i, key in enumerate(keys):  # indexed, as in run_lower_steps
    images, labels = downstream_images[i], labels_of(i)
    if policy.deferred:
      state, m, system = steps.upper_step(state, operator, lam, images, labels, key)
      if policy.due(first + i):
        m = {**m, **steps.residual(state, operator, lam, system, m["upper_nonfinite"])}
    else:
      state, m = steps.upper_step(state, operator, lam, images, labels, key)
    metrics.append(m)
  return state, metrics


@dataclasses.dataclass(frozen=True)
class AlternationFn:
  """A compiled alternation: ``fn(state, batches, rng) -> (state, metrics)``.

  Attributes:
    run: the driver.
    mesh: the device mesh it runs on.
    steps: the per-step driver's compiled pieces (None for the fused driver).
    fused: the fused driver's jitted alternation (None for the per-step driver).
  """
  run: Callable
  mesh: Any
  steps: Optional[StepFunctions] = None
  fused: Optional[Callable] = None

  def __call__(self, state: BilevelState, batches: AlternationBatches, rng):
    return self.run(state, batches, rng)


def make_alternation_fn(setup: BisslSetup, mesh=None, *, donate: bool = False
                        ) -> AlternationFn:
  """Returns ``alternation(state, batches, rng) -> (state, metrics)``, data-parallel.

  The returned function compiles on its first call only: later alternations reuse
  the executables (inputs keep their shapes and shardings). The batches are split
  over the ``'data'`` axis of ``mesh`` (default: every device); the state is
  replicated. Both drivers draw their keys from :func:`alternation_keys`.

  Args:
    setup: the static setup; ``setup.per_step`` picks the driver.
    mesh: a 1-D mesh from :func:`bissl_jax.runtime.mesh.make_mesh`.
    donate: donate the input state's buffers (less peak memory on accelerators;
      the caller must then not reuse the state it passed in). Without it the
      per-step driver copies the state once per alternation (:func:`copy_state`) and
      its steps donate that copy, so they still update it in place.
  """
  mesh = parallel.make_mesh() if mesh is None else mesh
  rep = parallel.replicated(mesh)
  batch0, batch1 = parallel.batch_sharding(mesh, 0), parallel.batch_sharding(mesh, 1)
  batch_shardings = AlternationBatches(pretext=batch1, hvp=batch0, downstream_images=batch1,
                                       downstream_labels=batch1)

  def place(state, batches):
    return (jax.device_put(state, rep),
            jax.device_put(AlternationBatches(*batches), batch_shardings))

  if not setup.per_step:
    fused = jax.jit(functools.partial(alternation, setup),
                    in_shardings=(rep, batch_shardings, rep), out_shardings=(rep, rep),
                    donate_argnums=(0,) if donate else ())
    return AlternationFn(run=lambda state, batches, rng: fused(*place(state, batches), rng),
                         mesh=mesh, fused=fused)

  steps = step_functions(setup, mesh)
  summary = jax.jit(summarize_metrics, out_shardings=rep)

  def run_per_step(state: BilevelState, batches: AlternationBatches, rng):
    state, batches = place(state, batches)
    # The steps donate: one copy per alternation keeps the caller's state readable (a
    # stage loop keeps its last good state for a checkpoint or a divergence stop).
    state = state if donate else copy_state(state)
    keys = alternation_keys(rng, batches.pretext.shape[0], batches.downstream_images.shape[0])
    state, lower_metrics = run_lower_steps(steps, state, batches.pretext, keys.lower,
                                           owned=True)
    state, upper_metrics = run_upper_steps(setup, steps, state, batches.hvp,
                                           batches.downstream_images,
                                           batches.downstream_labels, keys.hvp, keys.upper,
                                           owned=True)
    state = state.replace(alternation=state.alternation + 1)
    return state, summary(_stack(lower_metrics), _stack(upper_metrics), state)
  return AlternationFn(run=run_per_step, mesh=mesh, steps=steps)


def raise_if_nonfinite(metrics: dict, alternation_index: int) -> None:
  """Raises :class:`NonFiniteError` naming the alternation and level if a flag is set.

  Call before checkpointing so a corrupted state is never saved.
  """
  for level in ("lower", "upper"):
    if bool(np.asarray(metrics[f"{level}_nonfinite"])):
      raise NonFiniteError(
          f"Non-finite loss, gradient, parameter or implicit-gradient solution in the "
          f"{level} level at BiSSL alternation {alternation_index}. Nothing was "
          f"checkpointed for this alternation. Check the input data for NaN/Inf; "
          f"otherwise lower config.bissl.{'lower_lr' if level == 'lower' else 'upper_lr'} "
          f"or raise config.bissl.damping.",
          field=f"bissl.{'lower_lr' if level == 'lower' else 'upper_lr'}")


def lower_result(state: BilevelState) -> Tuple[PyTree, PyTree]:
  """BiSSL's output θ_P: ``({'backbone', 'pretext_head'}, batch_stats)``."""
  return state.lower.params, state.lower.batch_stats
