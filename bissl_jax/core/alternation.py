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
import functools
from typing import Callable, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from bissl_jax.implicit import loops
from bissl_jax.runtime import mesh as parallel
from bissl_jax.implicit import tree_math
from bissl_jax.core import upper as upper_level
from bissl_jax.core.state import AlternationBatches, BilevelState, BisslSetup
from bissl_jax.runtime.errors import NonFiniteError
from bissl_jax.core.lower import lower_step
from bissl_jax.core.upper import prepare_stage, upper_step
from bissl_jax.types import PyTree


def lower_stage(setup: BisslSetup, state: BilevelState, pretext_images, rng
                ) -> Tuple[BilevelState, dict]:
  """N_L lower steps; ``pretext_images`` is ``(N_L, B, ...)``.

  Returns:
    ``(state, metrics)`` with per-step metric arrays of length N_L.
  """
  keys = jax.random.split(rng, pretext_images.shape[0])
  return loops.scan(lambda s, xs: lower_step(setup, s, *xs), state, (pretext_images, keys),
                    unroll=setup.use_unrolled)


def _upper_keys(rng, steps: int):
  hvp_rng, step_rng = jax.random.split(rng)
  return hvp_rng, jax.random.split(step_rng, steps)


def upper_stage(setup: BisslSetup, state: BilevelState, hvp_images, downstream_images,
                downstream_labels, rng) -> Tuple[BilevelState, dict]:
  """N_U upper steps sharing one Hessian operator, built once here.

  Args:
    setup: the static setup.
    state: the current state.
    hvp_images: one raw pretext batch for the Hessian, prepared (augmented) once.
    downstream_images: ``(N_U, b, ...)``.
    downstream_labels: ``(N_U, b)`` or ``(N_U, b, K)``.
    rng: PRNG key.

  Returns:
    ``(state, metrics)`` with per-step metric arrays of length N_U.
  """
  hvp_rng, keys = _upper_keys(rng, downstream_images.shape[0])
  operator, lam = prepare_stage(setup, state, hvp_images, hvp_rng)

  def body(s, xs):
    return upper_step(setup, s, operator, lam, *xs)
  return loops.scan(body, state, (downstream_images, downstream_labels, keys),
                    unroll=setup.use_unrolled)


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


def _split_alternation_key(rng):
  lower_rng, upper_rng = jax.random.split(rng)
  return lower_rng, upper_rng


def alternation(setup: BisslSetup, state: BilevelState, batches: AlternationBatches, rng
                ) -> Tuple[BilevelState, dict]:
  """One whole alternation: N_L lower steps, one upper stage, the counter, the summary."""
  lower_rng, upper_rng = _split_alternation_key(rng)
  state, lower_metrics = lower_stage(setup, state, batches.pretext, lower_rng)
  state, upper_metrics = upper_stage(setup, state, batches.hvp, batches.downstream_images,
                                     batches.downstream_labels, upper_rng)
  state = state.replace(alternation=state.alternation + 1)
  return state, summarize_metrics(lower_metrics, upper_metrics, state)


def _stack(per_step):
  return jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *per_step)


def make_alternation_fn(setup: BisslSetup, mesh=None, *, donate: bool = False) -> Callable:
  """Returns ``alternation(state, batches, rng) -> (state, metrics)``, data-parallel.

  The returned function compiles on its first call only: later alternations reuse
  the executables (inputs keep their shapes and shardings). The batches are split
  over the ``'data'`` axis of ``mesh`` (default: every device); the state is
  replicated.

  Args:
    setup: the static setup; ``setup.per_step`` picks the driver.
    mesh: a 1-D mesh from :func:`bissl_jax.runtime.mesh.make_mesh`.
    donate: donate the input state's buffers (less peak memory on accelerators;
      the caller must then not reuse the state it passed in).

  Returns:
    The alternation function, with its jitted pieces as attributes
    (``lower_step``, ``prepare_stage``, ``upper_step`` or ``fused``) for benchmarks.
  """
  mesh = parallel.make_mesh() if mesh is None else mesh
  rep = parallel.replicated(mesh)
  batch0, batch1 = parallel.batch_sharding(mesh, 0), parallel.batch_sharding(mesh, 1)
  donate_args = (0,) if donate else ()
  batch_shardings = AlternationBatches(pretext=batch1, hvp=batch0, downstream_images=batch1,
                                       downstream_labels=batch1)

  if not setup.per_step:
    fused = jax.jit(functools.partial(alternation, setup),
                    in_shardings=(rep, batch_shardings, rep), out_shardings=(rep, rep),
                    donate_argnums=donate_args)

    def run_fused(state: BilevelState, batches: AlternationBatches, rng):
      return fused(jax.device_put(state, rep),
                   jax.device_put(AlternationBatches(*batches), batch_shardings), rng)
    run_fused.fused = fused
    run_fused.mesh = mesh
    return run_fused

  jit_lower = jax.jit(functools.partial(lower_step, setup), in_shardings=(rep, batch0, rep),
                      out_shardings=(rep, rep), donate_argnums=donate_args)
  jit_prepare = jax.jit(functools.partial(prepare_stage, setup),
                        in_shardings=(rep, batch0, rep))
  defer = upper_level.residual_deferred(setup)
  jit_upper = jax.jit(functools.partial(upper_step, setup, defer_residual=defer),
                      in_shardings=(rep, None, rep, batch0, batch0, rep),
                      out_shardings=(rep, rep), donate_argnums=donate_args)
  jit_residual = jax.jit(functools.partial(upper_level.deferred_residual, setup),
                         in_shardings=(rep, None, rep, rep, rep, rep), out_shardings=rep)
  jit_summary = jax.jit(summarize_metrics, out_shardings=rep)

  def run_per_step(state: BilevelState, batches: AlternationBatches, rng):
    state = jax.device_put(state, rep)
    batches = jax.device_put(AlternationBatches(*batches), batch_shardings)
    lower_rng, upper_rng = _split_alternation_key(rng)
    lower_metrics = []
    for images, key in zip(batches.pretext, jax.random.split(lower_rng, batches.pretext.shape[0])):
      state, m = jit_lower(state, images, key)
      lower_metrics.append(m)
    hvp_rng, keys = _upper_keys(upper_rng, batches.downstream_images.shape[0])
    operator, lam = jit_prepare(state, batches.hvp, hvp_rng)
    upper_metrics = []
    # Which steps check their residual is decided here (one host read per stage), so
    # the compiled step holds no lax.cond (upper_level.residual_deferred).
    first = int(jax.device_get(state.upper.step)) if defer else 0
    for i, (images, labels, key) in enumerate(zip(batches.downstream_images,
                                                  batches.downstream_labels, keys)):
      state, m = jit_upper(state, operator, lam, images, labels, key)
      if defer:
        system = (m.pop("deferred_rhs"), m.pop("deferred_solution"))
        if upper_level.residual_due(setup, first + i):
          m.update(jit_residual(state, operator, lam, *system, m["upper_nonfinite"]))
      upper_metrics.append(m)
    state = state.replace(alternation=state.alternation + 1)
    return state, jit_summary(_stack(lower_metrics), _stack(upper_metrics), state)

  run_per_step.lower_step = jit_lower
  run_per_step.prepare_stage = jit_prepare
  run_per_step.upper_step = jit_upper
  run_per_step.mesh = mesh
  return run_per_step


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
