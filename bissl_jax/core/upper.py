"""The upper level of BiSSL: implicit-gradient steps against one shared Hessian.

θ_P, φ_P and the HVP batch do not change during an upper stage, so the stage first
calls :func:`prepare_stage` once: it augments the HVP batch and, in ``'linearize'``
mode, builds the Hessian of the pretext loss with ``jax.linearize``. Every CG
iteration of every :func:`upper_step` then reuses that operator. Each step solves

    v_IG ≈ (I + H/(λ+δ))⁻¹ ∇_θ L_D(θ_P, φ_D)

with :func:`bissl_jax.implicit.implicit_solve` (the public API; any registered
solver or a callable), forms ``g_θD = v_IG + ∇_θ L_D(θ_D, φ_D)`` and
``g_φD = ∇_φ L_D(θ_P, φ_D) + ∇_φ L_D(θ_D, φ_D)``, clips to norm 10 and applies SGD
with momentum and coupled weight decay. With ``head_in_implicit`` the solve runs
over ``[θ; φ_P]`` and only θ's block carries the identity (an identity mask, not a
separate code path). Only trainable leaves enter the solve. ``solver='mfac'``
(BiSSLight) needs no operator at all: it solves against the empirical Fisher of the
pretext gradients the lower steps stored (:mod:`bissl_jax.implicit.solvers.mfac`).
"""
from typing import NamedTuple, Tuple

import jax
import jax.numpy as jnp
import optax

from bissl_jax import implicit
from bissl_jax.core import hessian
from bissl_jax.core import lam_schedules
from bissl_jax.core import partition
from bissl_jax.implicit import residual_guard
from bissl_jax.implicit import tree_math
from bissl_jax.core.state import NO_PRECONDITIONER, BilevelState, BisslSetup, current_lam
from bissl_jax.implicit.solvers.base import SolveInfo, relative_residual
from bissl_jax.types import PyTree


def downstream_loss(setup: BisslSetup, backbone_params, head_params, backbone_stats,
                    inputs, labels):
  """Training-mode downstream loss L_D; returns ``(loss, new_backbone_stats)``."""
  return setup.downstream.loss(backbone_params, head_params, backbone_stats, inputs, labels,
                               train=True)


def _solve_space(setup: BisslSetup, lower_params: PyTree):
  """The trainable part of what the implicit solve runs over, and the frozen rest.

  θ alone, or ``{'backbone': θ, 'pretext_head': φ_P}`` with ``head_in_implicit``.
  """
  mask = setup.lower_trainable(lower_params)
  train, frozen = partition.split(lower_params, mask)
  if setup.head_in_implicit:
    return train, frozen
  return train["backbone"], frozen


def _of_solve_space(setup: BisslSetup, state: BilevelState, fn):
  """``x ↦ fn(lower params with x in the solve space)`` at (θ_P, φ_P)."""
  lower = state.lower
  train, frozen = partition.split(lower.params, setup.lower_trainable(lower.params))

  def at(x):
    full = x if setup.head_in_implicit else {**train, "backbone": x}
    return fn(partition.merge(full, frozen))
  return at


def _hessian(setup: BisslSetup, state: BilevelState, inputs):
  """The undamped ``v ↦ H v`` of L_P over the solve space, on fixed inputs."""
  lower = state.lower
  theta, _ = _solve_space(setup, lower.params)
  return hessian.pretext_hessian(setup.task, setup.hessian_mode,
                                 _of_solve_space(setup, state, lambda p: p), theta,
                                 lower.batch_stats, inputs, state.target)


# Modes whose operator is a pytree (a jax.tree_util.Partial of stored residuals): built
# once per stage, and passed between jitted functions by the per-step driver.
_PREBUILT_MODES = ("linearize", "gauss_newton")


def prepare_stage(setup: BisslSetup, state: BilevelState, hvp_images, rng):
  """What every upper step of one stage shares: ``(operator, lam)``.

  In ``'linearize'`` (and ``'gauss_newton'``) mode ``operator`` is the linear map
  ``v ↦ H v`` itself, as returned by ``jax.linearize``: a ``jax.tree_util.Partial``
  whose leaves are the stored residuals, so one jitted function can build it and
  another take it as an argument (the per-step driver). In ``'jvp'`` mode it is the
  prepared HVP inputs, from which :func:`stage_matvec` recomputes every product. With
  ``solver='mfac'`` there is no Hessian: the stored pretext gradients stand in for H,
  the HVP batch is not used, and ``operator`` is the solver's ``window_factor`` (M-FAC's
  per-block factorisation, which depends on the window and λ only, both fixed for the
  stage), or None. With ``solver='kfac'`` (a curvature-model solver) ``operator`` is
  its ``curvature_factor`` of L_P on the HVP batch (K-FAC's eigendecomposed factors);
  with ``preconditioner='kfac'`` the pair ``(Hessian operator, that factor)``. BatchNorm
  runs in training mode on batch statistics; running statistics are not touched.
  """
  lam = current_lam(setup, state)
  spec = setup.solver_spec
  if spec.is_curvature_model:   # K-FAC: its model of L_P on the HVP batch, no Hessian
    return _curvature_model(setup, spec, state, setup.task.prepare(rng, hvp_images)), lam
  if not spec.needs_operator:
    if spec.window_factor is None:
      return None, lam
    return spec.window_factor(state.solver_state.gradient_window, lam + setup.damping,
                              setup), lam
  inputs = setup.task.prepare(rng, hvp_images)
  operator = _hessian(setup, state, inputs) if setup.hessian_mode in _PREBUILT_MODES else inputs
  if _model_preconditioned(setup):   # preconditioner='kfac': its model rides along
    return (operator, _curvature_model(setup, setup.preconditioner_spec, state, inputs)), lam
  return operator, lam


def _model_preconditioned(setup: BisslSetup) -> bool:
  spec = setup.preconditioner_spec
  return spec is not None and spec.is_curvature_model


def _curvature_model(setup: BisslSetup, spec, state: BilevelState, inputs):
  """A curvature-model solver's (or preconditioner's) ``curvature_factor`` of L_P over the
  trainable θ at (θ_P, φ_P) on the prepared HVP inputs (K-FAC: its eigendecomposed
  Kronecker factors). BatchNorm in training mode, as for the Hessian."""
  lower = state.lower
  theta, _ = _solve_space(setup, lower.params)
  at = _of_solve_space(setup, state, lambda p: p)
  loss = lambda t: setup.task.loss(at(t), lower.batch_stats, inputs, state.target)[0]
  return spec.curvature_factor(loss, theta, setup)


def stage_matvec(setup: BisslSetup, state: BilevelState, operator):
  """The undamped ``v ↦ H v`` of the stage from :func:`prepare_stage`'s ``operator``."""
  if _model_preconditioned(setup):
    operator = operator[0]
  if setup.hessian_mode in _PREBUILT_MODES:
    return operator
  return _hessian(setup, state, operator)


def _identity_mask(setup: BisslSetup, rhs: PyTree):
  if not setup.head_in_implicit:
    return None
  return {"backbone": jax.tree_util.tree_map(lambda _: True, rhs["backbone"]),
          "pretext_head": jax.tree_util.tree_map(lambda _: False, rhs["pretext_head"])}


def window_preconditioner(setup: BisslSetup, state: BilevelState, lam, operator=None):
  """``config.bissl.preconditioner``'s ``r ↦ M r``, or None for ``'none'``.

  ``M`` is the preconditioner's curvature-model inverse ``(I + F/(λ+δ))⁻¹``: for
  ``'mfac'`` on the gradient window the lower steps filled (``F`` the empirical Fisher
  of the stored pretext gradients); for ``'kfac'`` on the K-FAC factors that
  :func:`prepare_stage` built into ``operator``. Symmetric positive definite and
  ≈ ``A⁻¹`` where ``F ≈ H``. Costs no operator product.
  """
  if setup.preconditioner == NO_PRECONDITIONER:
    return None
  if _model_preconditioned(setup):
    spec, factor = setup.preconditioner_spec, operator[1]
    return lambda r: spec.curvature_solve(factor, r, lam + setup.damping, setup,
                                          diagnostics=False)[0]
  window, spec = state.solver_state.gradient_window, setup.window_spec
  return lambda r: spec.window_solve(window, r, lam + setup.damping, setup)[0]


class UpperSystem(NamedTuple):
  """The system an upper step solved, ``A x = b``: kept for a residual check later."""
  rhs: PyTree        # b: v, or [v; 0] with head_in_implicit
  solution: PyTree   # x over the whole solve space


class ImplicitGradient(NamedTuple):
  """What :func:`implicit_gradient` returns."""
  v_ig: PyTree           # the θ block of the solution, shaped like the trainable θ
  info: SolveInfo        # the solver's diagnostics (residual NaN where not checked)
  system: UpperSystem


def implicit_gradient(setup: BisslSetup, state: BilevelState, operator, lam, v,
                      check_residual=True) -> ImplicitGradient:
  """``v_IG ≈ (I + H/(λ+δ))⁻¹ v`` for the trainable θ-gradient ``v``: the upper step's solve.

  Operator solvers go through the public :func:`bissl_jax.implicit.implicit_solve`;
  a gradient-window solver (M-FAC) through its declared ``window_solve``. Only the
  trainable leaves enter; with ``head_in_implicit`` the solve runs over ``[θ; φ_P]``
  with an identity mask and the θ block is returned.

  ``info.residual`` costs one more operator product. ``check_residual`` may be a
  Python bool (decided when tracing: the product is there or not) or a traced one
  (``lax.cond``); where it is False the residual is NaN. ``setup.residual_policy``
  decides which steps check. With ``residual_guard``, the caller replaces a solution
  whose relative residual exceeds 1 by ``v`` (first order).
  """
  spec = setup.solver_spec
  if spec.is_curvature_model:
    solution, info = spec.curvature_solve(operator, v, lam + setup.damping, setup,
                                          diagnostics=False)
    return _with_residual(setup, state, operator, lam, UpperSystem(v, solution), info,
                          check_residual, solution)
  if spec.keeps_gradient_window:
    window = state.solver_state.gradient_window
    every_step = check_residual is True or (check_residual is not False
                                             and setup.residual_policy.every_step)
    if spec.window_factor is None or every_step:  # the solver's own diagnostics
      kwargs = {} if spec.window_factor is None else {"factor": operator}
      solution, info = spec.window_solve(window, v, lam + setup.damping, setup, **kwargs)
      return ImplicitGradient(solution, info, UpperSystem(v, solution))
    solution, info = spec.window_solve(window, v, lam + setup.damping, setup,
                                       factor=operator, diagnostics=False)
    return _with_residual(setup, state, operator, lam, UpperSystem(v, solution), info,
                          check_residual, solution)
  if setup.head_in_implicit:
    train_head, _ = partition.split(state.lower.params["pretext_head"],
                                    setup.lower_trainable(state.lower.params)["pretext_head"])
    zeros = jax.tree_util.tree_map(jnp.zeros_like, train_head)
    rhs = {"backbone": v, "pretext_head": zeros}
    init = {"backbone": state.solver_state.warm_start, "pretext_head": zeros}
  else:
    rhs, init = v, state.solver_state.warm_start
  hessian, identity_mask = stage_matvec(setup, state, operator), _identity_mask(setup, rhs)
  solution, info = implicit.implicit_solve(
      hessian, rhs, lam=lam, damping=setup.damping,
      solver=setup.solver, maxiter=setup.cg_iters, tol=setup.cg_tol,
      init=init if setup.warm_start else None, identity_mask=identity_mask,
      unroll=setup.use_unrolled, preconditioner=window_preconditioner(setup, state, lam, operator))
  # The solver's own residual goes unused, so jit drops its product; it is
  # recomputed here only on the steps that check it.
  backbone = solution["backbone"] if setup.head_in_implicit else solution
  return _with_residual(setup, state, operator, lam, UpperSystem(rhs, solution), info,
                        check_residual, backbone)


def _with_residual(setup: BisslSetup, state: BilevelState, operator, lam,
                   system: UpperSystem, info: SolveInfo, check_residual, v_ig
                   ) -> ImplicitGradient:
  """The step's result with ``info.residual`` measured where ``check_residual`` says
  (a Python bool: decided when tracing; a traced one: ``lax.cond``), else NaN."""
  matvec = _system_matvec(setup, state, operator, lam, system.rhs)
  if isinstance(check_residual, bool):
    residual = (relative_residual(matvec, system.rhs, system.solution) if check_residual
                else jnp.full((), jnp.nan, jnp.float32))
  else:
    residual = jax.lax.cond(check_residual,
                            lambda x: relative_residual(matvec, system.rhs, x),
                            lambda x: jnp.full((), jnp.nan, jnp.float32), system.solution)
  info = info._replace(residual=residual,
                       nonfinite=info.nonfinite | (check_residual & ~jnp.isfinite(residual)))
  return ImplicitGradient(v_ig, info, system)


def _system_matvec(setup: BisslSetup, state: BilevelState, operator, lam, rhs):
  """``x ↦ A x`` of the upper step's system: ``I + H/(λ+δ)``, or a gradient-window
  solver's own model (M-FAC: ``I + F/(λ+δ)``, two passes over the window)."""
  spec = setup.solver_spec
  if spec.is_curvature_model:
    return spec.curvature_matvec(operator, lam + setup.damping, setup)
  if spec.keeps_gradient_window:
    return spec.window_matvec(state.solver_state.gradient_window, lam + setup.damping, setup)
  return implicit.damped_operator(stage_matvec(setup, state, operator), lam=lam,
                                  damping=setup.damping,
                                  identity_mask=_identity_mask(setup, rhs))


def solve_residual(setup: BisslSetup, state: BilevelState, operator, lam,
                   system: UpperSystem):
  """``‖A x − b‖/‖b‖`` of an upper step's system ``A = I + H/(λ+δ)`` (one product)."""
  matvec = _system_matvec(setup, state, operator, lam, system.rhs)
  return relative_residual(matvec, system.rhs, system.solution)


def deferred_residual(setup: BisslSetup, state: BilevelState, operator, lam,
                      system: UpperSystem, nonfinite):
  """The metrics ``cg_residual``, ``upper_nonfinite`` and ``residual_checked`` of a step
  run by :func:`upper_step_deferred` (given its system, and ``state`` after it: its
  lower level, which the product reads, is the step's)."""
  residual = solve_residual(setup, state, operator, lam, system)
  return {"cg_residual": residual, "upper_nonfinite": nonfinite | ~jnp.isfinite(residual),
          "residual_checked": jnp.ones((), bool)}


def upper_step(setup: BisslSetup, state: BilevelState, operator, lam, images, labels, rng
               ) -> Tuple[BilevelState, dict]:
  """One upper-level step against the stage's operator (Algorithm 1, upper loop body).

  Args:
    setup: the static setup.
    state: the current state.
    operator: from :func:`prepare_stage`.
    lam: λ in force for this stage.
    images: one raw downstream batch.
    labels: its labels.
    rng: PRNG key for the downstream augmentation.

  Returns:
    ``(new_state, metrics)``; the residual is checked on the steps
    ``setup.residual_policy`` names (a ``lax.cond`` inside the step).
  """
  new_state, metrics, _ = _upper_step(
      setup, state, operator, lam, images, labels, rng,
      setup.residual_policy.due(state.upper.step))
  return new_state, metrics


def upper_step_deferred(setup: BisslSetup, state: BilevelState, operator, lam, images, labels,
                        rng) -> Tuple[BilevelState, dict, UpperSystem]:
  """:func:`upper_step` with no residual product in it: also returns the solved system,
  which :func:`deferred_residual` checks in a call of its own on due steps (the
  per-step driver's path when ``setup.residual_policy.deferred``)."""
  return _upper_step(setup, state, operator, lam, images, labels, rng, False)


def apply_hypergradient(setup: BisslSetup, upper, theta_term: PyTree, gtheta_d: PyTree,
                        head_grad: PyTree, theta_p: PyTree, frozen_d: PyTree):
  """The upper optimizer's step on ``θ_term + ∇_θ L_D(θ_D)`` and ``head_grad``.

  ``theta_term`` is the hypergradient's term from θ_P*(θ_D) (v_IG, or the penalty
  method's estimate of it), shaped like θ's trainable part; with a learnable λ it also
  forms ρ's gradient from it. Returns ``(params, opt_state, grad_norm)``.
  """
  theta_d, _ = partition.split(upper.params["backbone"],
                               setup.upper_trainable(upper.params)["backbone"])
  grads = {"backbone": partition.zeros_for_frozen(tree_math.tree_add(theta_term, gtheta_d),
                                                  frozen_d),
           "downstream_head": head_grad}
  if setup.learnable_lam:
    grads["lam_rho"] = lam_schedules.rho_gradient(
        upper.params["lam_rho"], theta_d, theta_p, theta_term, lam_damping=setup.lam_damping)
  tx = setup.upper_optimizer(upper.params)
  updates, opt_state = tx.update(grads, upper.opt_state, upper.params)
  return optax.apply_updates(upper.params, updates), opt_state, optax.tree.norm(grads)


def _upper_step(setup: BisslSetup, state: BilevelState, operator, lam, images, labels, rng,
                check_residual):
  """The upper step; ``check_residual``: a Python False (no product) or a traced bool."""
  upper = state.upper
  x = setup.downstream.prepare(rng, images, train=True)
  mask = setup.upper_trainable(upper.params)["backbone"]
  theta_p, frozen_p = partition.split(state.lower.params["backbone"], mask)
  theta_d, frozen_d = partition.split(upper.params["backbone"], mask)
  phi_d = upper.params["downstream_head"]

  def loss_fn(theta_train, phi, frozen, stats):
    return downstream_loss(setup, partition.merge(theta_train, frozen), phi, stats, x, labels)
  loss_and_grad = jax.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True)
  # Both terms use the same batch. θ_P's running statistics are left alone: only
  # real pretext steps may change them.
  (loss_p, _), (v, gphi_p) = loss_and_grad(theta_p, phi_d, frozen_p,
                                           state.lower.batch_stats["backbone"])
  (loss_d, stats_d), (gtheta_d, gphi_d) = loss_and_grad(theta_d, phi_d, frozen_d,
                                                         upper.batch_stats["backbone"])
  checked = jnp.zeros((), bool) if check_residual is False else check_residual
  v_ig, info, system = implicit_gradient(setup, state, operator, lam, v, check_residual)
  fallback = jnp.zeros((), bool)
  if setup.residual_guard:
    v_ig, fallback = residual_guard.guard_residual(v_ig, v, info)

  params, opt_state, grad_norm = apply_hypergradient(
      setup, upper, v_ig, gtheta_d, tree_math.tree_add(gphi_p, gphi_d), theta_p, frozen_d)
  metrics = {
      "upper_loss": loss_p + loss_d, "upper_loss_theta_p": loss_p, "upper_loss_theta_d": loss_d,
      "upper_grad_norm": grad_norm, "v_norm": tree_math.tree_norm(v),
      "v_ig_norm": tree_math.tree_norm(v_ig), "lam": lam,
      "cg_residual": info.residual, "residual_checked": checked,
      "cg_min_curvature": info.min_curvature,
      "cg_iterations": info.iterations, "residual_fallback": fallback,
      "upper_nonfinite": info.nonfinite | ~(jnp.isfinite(loss_p + loss_d)
                                            & jnp.isfinite(grad_norm)
                                            & tree_math.tree_all_finite(params)),
  }
  new_upper = upper.replace(params=params, batch_stats={"backbone": stats_d},
                            opt_state=opt_state, step=upper.step + 1)
  new_state = state.replace(upper=new_upper,
                            solver_state=state.solver_state.replace(warm_start=v_ig))
  return new_state, metrics, system
