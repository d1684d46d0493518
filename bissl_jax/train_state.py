"""BiSSL training core: Algorithm 1 of the paper as pure, jit-compiled functions.

One *alternation* runs N_L lower steps, then one upper stage of N_U steps:

* lower step: pretext loss + ``lam/2·‖θ_P − sg(θ_D)‖²`` over (θ_P, φ_P), global-norm
  clip 10, LARS, BYOL EMA, running statistics of the lower model;
* upper stage: the Hessian operator of the pretext loss at (θ_P, φ_P) on one
  augmented HVP batch is built once with ``jax.linearize`` and reused by every CG
  iteration of every upper step (θ_P, φ_P and that batch are fixed for the stage).
  Each step solves ``v_IG ≈ (I + H/(λ+δ))⁻¹ ∇_θ L_D(θ_P, φ_D)``, forms
  ``g_θD = v_IG + ∇_θ L_D(θ_D, φ_D)`` and ``g_φD = ∇_φ L_D(θ_P, φ_D) + ∇_φ L_D(θ_D, φ_D)``,
  clips to norm 10 and applies SGD with momentum and coupled weight decay.

Every function takes a static :class:`BisslSetup` first; bind it with
``functools.partial`` to get the ``(state, batch, rng)`` signatures. The step
functions are written for the global batch; :func:`make_alternation_fn` places the
batch over a 1-D device mesh so the same code runs data-parallel on every device.

XLA:CPU runs convolution gradients ~40× slower inside loop bodies (SPEC §3), so on
CPU the N_U upper steps and the CG iterations are unrolled Python loops under one
jit, and the N_L lower steps are a Python loop of one jitted step. Elsewhere they
are ``lax.scan`` loops, which compile once regardless of N.
"""
import functools
from typing import Any, Callable, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from bissl_jax import parallel
from bissl_jax.errors import NonFiniteError
from bissl_jax import tree_math
from bissl_jax.bilevel import AlternationBatches, BilevelState, BisslSetup
from bissl_jax.bilevel import current_lam, init_bilevel_state
from bissl_jax.lower_level import lower_objective, lower_stage, lower_step
from bissl_jax.upper_level import build_hessian_operator, downstream_loss
from bissl_jax.upper_level import build_hessian_map, upper_stage, upper_step
from bissl_jax.upper_level import upper_step_with_map

__all__ = [
    "AlternationBatches", "BilevelState", "BisslSetup", "NonFiniteError",
    "build_hessian_operator", "current_lam", "downstream_loss", "init_bilevel_state",
    "lower_objective", "lower_result", "lower_stage", "lower_step", "make_alternation_fn",
    "raise_if_nonfinite", "summarize_metrics", "upper_stage", "upper_step",
]

PyTree = Any




# ----------------------------------------------------------------------------- alternation

def summarize_metrics(lower: dict, upper: dict, state: BilevelState) -> dict:
  """Reduces per-step metrics of one alternation to scalars (still on device)."""
  out = {k: jnp.mean(v) for k, v in lower.items() if k != "lower_nonfinite"}
  out.update({k: jnp.mean(v) for k, v in upper.items()
              if k not in ("upper_nonfinite", "cg_min_curvature", "lam")})
  out["cg_residual_last"] = upper["cg_residual"][-1]
  out["cg_min_curvature"] = jnp.min(upper["cg_min_curvature"])
  out["lam"] = upper["lam"][-1]
  out["lower_nonfinite"] = jnp.any(lower["lower_nonfinite"])
  out["upper_nonfinite"] = jnp.any(upper["upper_nonfinite"])
  gap = tree_math.tree_sub(state.lower_params["backbone"], state.upper_params["backbone"])
  out["theta_distance"] = tree_math.tree_norm(gap)
  return out


def make_alternation_fn(setup: BisslSetup, mesh=None, *, donate: bool = False) -> Callable:
  """Returns ``alternation(state, batches, rng) -> (state, metrics)``, data-parallel.

  The returned function compiles on its first call only: later alternations reuse
  the executables (inputs keep their shapes and shardings). The batch is split
  over the ``'data'`` axis of ``mesh`` (default: every device); the state is
  replicated.

  Args:
    setup: the static setup.
    mesh: a 1-D mesh from :func:`bissl_jax.parallel.make_mesh`.
    donate: donate the input state's buffers (halves peak memory on accelerators;
      the caller must then not reuse the state it passed in).

  Returns:
    The alternation function. It also carries ``.lower_step``, ``.lower_stage``
    and ``.upper_stage``, the jitted pieces, for benchmarks.
  """
  mesh = parallel.make_mesh() if mesh is None else mesh
  rep = parallel.replicated(mesh)
  batch0 = parallel.batch_sharding(mesh, 0)
  batch1 = parallel.batch_sharding(mesh, 1)
  donate_args = (0,) if donate else ()
  jit_lower_step = jax.jit(functools.partial(lower_step, setup),
                           in_shardings=(rep, batch0, rep), out_shardings=(rep, rep),
                           donate_argnums=donate_args)
  jit_lower_stage = jax.jit(functools.partial(lower_stage, setup),
                            in_shardings=(rep, batch1, rep), out_shardings=(rep, rep),
                            donate_argnums=donate_args)
  jit_upper_stage = jax.jit(functools.partial(upper_stage, setup),
                            in_shardings=(rep, batch0, batch1, batch1, rep),
                            out_shardings=(rep, rep), donate_argnums=donate_args)
  jit_summary = jax.jit(summarize_metrics, out_shardings=rep)
  # On CPU the upper stage runs as one jitted operator build plus one jitted step per
  # downstream batch: the compile time of a single jit with N_U unrolled steps grows
  # faster than linearly in N_U (docs/benchmarks.md), while this compiles once for any
  # N_U and runs as fast. It needs the linear map as a value, i.e. 'linearize' mode.
  per_step_upper = setup.use_unrolled and setup.hessian_mode == "linearize"
  jit_build = jax.jit(functools.partial(build_hessian_map, setup), in_shardings=(rep, batch0, rep))
  jit_upper_step = jax.jit(functools.partial(upper_step_with_map, setup),
                           in_shardings=(rep, None, rep, batch0, batch0, rep),
                           out_shardings=(rep, rep))

  def upper(state, hvp, images, labels, rng):
    if not per_step_upper:
      return jit_upper_stage(state, hvp, images, labels, rng)
    hvp_rng, step_rng = jax.random.split(rng)  # the keys of upper_stage
    hessian_matvec, lam = jit_build(state, hvp, hvp_rng)
    per_step = []
    for i, key in enumerate(jax.random.split(step_rng, images.shape[0])):
      state, m = jit_upper_step(state, hessian_matvec, lam, images[i], labels[i], key)
      per_step.append(m)
    return state, jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *per_step)

  def alternation(state: BilevelState, batches: AlternationBatches, rng):
    state = jax.device_put(state, rep)
    pretext = jax.device_put(batches.pretext, batch1)
    lower_rng, upper_rng = jax.random.split(rng)
    if setup.use_unrolled:
      per_step = []
      for i, key in enumerate(jax.random.split(lower_rng, pretext.shape[0])):
        state, m = jit_lower_step(state, pretext[i], key)
        per_step.append(m)
      lower_metrics = jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *per_step)
    else:
      state, lower_metrics = jit_lower_stage(state, pretext, lower_rng)
    state, upper_metrics = upper(
        state, jax.device_put(batches.hvp, batch0),
        jax.device_put(batches.downstream_images, batch1),
        jax.device_put(batches.downstream_labels, batch1), upper_rng)
    state = state.replace(alternation=state.alternation + 1)
    return state, jit_summary(lower_metrics, upper_metrics, state)

  alternation.lower_step = jit_lower_step
  alternation.lower_stage = jit_lower_stage
  alternation.upper_stage = jit_upper_stage
  alternation.mesh = mesh
  return alternation


def raise_if_nonfinite(metrics: dict, alternation: int) -> None:
  """Raises :class:`NonFiniteError` naming the alternation and level if a flag is set.

  Call before checkpointing so a corrupted state is never saved.
  """
  for level in ("lower", "upper"):
    if bool(np.asarray(metrics[f"{level}_nonfinite"])):
      raise NonFiniteError(
          f"Non-finite loss, gradient or CG solution in the {level} level at BiSSL "
          f"alternation {alternation}. Nothing was checkpointed for this alternation. "
          f"Check the input data for NaN/Inf; otherwise lower config.bissl."
          f"{'lower_lr' if level == 'lower' else 'upper_lr'} or raise config.bissl.damping, "
          f"then rerun: training resumes from the last good checkpoint.")


def lower_result(state: BilevelState) -> Tuple[PyTree, PyTree]:
  """BiSSL's output θ_P: ``({'backbone', 'pretext_head'}, batch_stats)``."""
  return state.lower_params, state.lower_stats
