"""The lower level of BiSSL: pretext loss plus the proximal term (Algorithm 1, lower loop).

Each step takes the pretext loss plus ``lam/2·‖θ_P − sg(θ_D)‖²`` over the trainable
leaves of (θ_P, φ_P), clips their global norm to 10, applies LARS, updates BYOL's
EMA target and the lower model's running statistics. Frozen leaves (see
:mod:`bissl_jax.core.partition`) are closed over: no gradient is formed for them.
"""
import functools
from typing import Tuple

import jax
import jax.numpy as jnp
import optax

from bissl_jax.core import partition
from bissl_jax.implicit import tree_math
from bissl_jax.core.state import BilevelState, BisslSetup, current_lam


def lower_objective(setup: BisslSetup, train_params, frozen_params, lower_stats, target,
                    theta_d_train, inputs, lam):
  """Pretext loss + ``lam/2·‖θ_P − sg(θ_D)‖²`` over every trainable backbone leaf.

  Args:
    setup: the static setup.
    train_params: trainable part of ``{'backbone', 'pretext_head'}`` (None elsewhere).
    frozen_params: the frozen rest (see :func:`bissl_jax.core.partition.split`).
    lower_stats: the lower model's statistics.
    target: BYOL's target or None.
    theta_d_train: the trainable part of θ_D.
    inputs: the pretext task's prepared inputs.
    lam: λ in force.

  Returns:
    ``(total, (pretext_loss, prox, aux))``.
  """
  params = partition.merge(train_params, frozen_params)
  loss, aux = setup.task.loss(params, lower_stats, inputs, target)
  prox, _ = proximal_term(lam, train_params["backbone"], theta_d_train)
  return loss + prox, (loss, prox, aux)


def proximal_term(lam, theta_p_train, theta_d_train):
  """``(lam/2·‖θ_P − θ_D‖², θ_P − θ_D)`` with θ_D held constant (under stop_gradient)."""
  gap = tree_math.tree_sub(theta_p_train, jax.lax.stop_gradient(theta_d_train))
  return 0.5 * lam * tree_math.tree_vdot(gap, gap), gap


def lower_split(setup: BisslSetup, state: BilevelState):
  """``(train, frozen, theta_d_train)``: the trainable and frozen parts of (θ_P, φ_P), and
  the trainable part of θ_D (see :mod:`bissl_jax.core.partition`)."""
  mask = setup.lower_trainable(state.lower.params)
  train, frozen = partition.split(state.lower.params, mask)
  theta_d_train, _ = partition.split(state.upper.params["backbone"], mask["backbone"])
  return train, frozen, theta_d_train


def lower_gradients(setup: BisslSetup, state: BilevelState, split, inputs, lam):
  """``((loss, prox, aux), grads)``: :func:`lower_objective` at ``lam`` and its gradient
  over the trainable leaves, ``split`` being :func:`lower_split`'s."""
  train, frozen, theta_d_train = split
  grad_fn = jax.value_and_grad(functools.partial(lower_objective, setup), has_aux=True)
  (_, parts), grads = grad_fn(train, frozen, state.lower.batch_stats, state.target,
                              theta_d_train, inputs, lam)
  return parts, grads


def lower_step(setup: BisslSetup, state: BilevelState, pretext_images, rng
               ) -> Tuple[BilevelState, dict]:
  """One lower-level step (Algorithm 1, lower loop body).

  Args:
    setup: the static setup.
    state: the current state.
    pretext_images: one raw pretext batch.
    rng: PRNG key of the task's ``prepare`` (augmentation, masking).

  Returns:
    ``(new_state, metrics)`` with the pretext loss, the proximal term, the gradient
    norm and a non-finite flag.
  """
  level = state.lower
  inputs = setup.task.prepare(rng, pretext_images)
  lam = current_lam(setup, state)
  split = lower_split(setup, state)
  train, frozen, theta_d_train = split
  window_spec = setup.window_spec  # the solver's or the preconditioner's window
  if window_spec is not None:
    # The window stores gradients of L_P alone: take them, then add the proximal
    # gradient λ(θ_P − θ_D) in closed form (no extra backward pass).
    (loss, _, aux), pretext_grads = lower_gradients(setup, state, split, inputs, 0.0)
    prox, gap = proximal_term(lam, train["backbone"], theta_d_train)
    grads = {**pretext_grads,
             "backbone": tree_math.tree_axpy(lam, gap, pretext_grads["backbone"])}
    window = window_spec.window_push(state.solver_state.gradient_window,
                                     pretext_grads["backbone"])
    state = state.replace(solver_state=state.solver_state.replace(gradient_window=window))
  else:
    (loss, prox, aux), grads = lower_gradients(setup, state, split, inputs, lam)
  tx = setup.lower_optimizer(level.params)
  updates, opt_state = tx.update(partition.zeros_for_frozen(grads, frozen), level.opt_state,
                                 level.params)
  params = optax.apply_updates(level.params, updates)
  stats = aux["batch_stats"]
  target = state.target
  if setup.task.has_target:
    target = setup.task.update_target(target, params, stats)
  grad_norm = optax.tree.norm(grads)
  metrics = {"lower_loss": loss, "lower_prox": prox, "lower_grad_norm": grad_norm,
             "lower_nonfinite": ~(jnp.isfinite(loss) & jnp.isfinite(grad_norm)
                                  & tree_math.tree_all_finite(params))}
  new_level = level.replace(params=params, batch_stats=stats, opt_state=opt_state,
                            step=level.step + 1)
  return state.replace(lower=new_level, target=target), metrics
