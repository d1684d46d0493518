"""The lower level of BiSSL: pretext loss plus the proximal term (Algorithm 1, lower loop).

Each step takes the pretext loss plus ``lam/2·‖θ_P − sg(θ_D)‖²`` over (θ_P, φ_P),
clips the global norm to 10, applies LARS, updates BYOL's EMA target and the lower
model's running statistics.
"""
import functools
from typing import Tuple

import jax
import jax.numpy as jnp
import optax

from bissl_jax import augment
from bissl_jax import tree_math
from bissl_jax.bilevel import BilevelState, BisslSetup, current_lam


def lower_objective(setup: BisslSetup, lower_params, lower_stats, target, theta_d, views, lam):
  """Pretext loss + ``lam/2·‖θ_P − sg(θ_D)‖²`` over every trainable backbone leaf.

  Returns:
    ``(total, (pretext_loss, prox, aux))``.
  """
  loss, aux = setup.task.loss(lower_params, lower_stats, views, target)
  gap = tree_math.tree_sub(lower_params["backbone"], jax.lax.stop_gradient(theta_d))
  prox = 0.5 * lam * tree_math.tree_vdot(gap, gap)
  return loss + prox, (loss, prox, aux)


def lower_step(setup: BisslSetup, state: BilevelState, pretext_images, rng
               ) -> Tuple[BilevelState, dict]:
  """One lower-level step (Algorithm 1, lower loop body).

  Args:
    setup: the static setup.
    state: the current state.
    pretext_images: ``(B, H, W, C)`` uint8 pretext batch.
    rng: PRNG key for the augmentation.

  Returns:
    ``(new_state, metrics)`` with the pretext loss, the proximal term, the gradient
    norm and a non-finite flag.
  """
  views = augment.pretext_views(rng, pretext_images, size=setup.image_size)
  lam = current_lam(setup, state)
  grad_fn = jax.value_and_grad(functools.partial(lower_objective, setup), has_aux=True)
  (_, (loss, prox, aux)), grads = grad_fn(state.lower_params, state.lower_stats, state.target,
                                          state.upper_params["backbone"], views, lam)
  tx = setup.lower_optimizer()
  updates, opt_state = tx.update(grads, state.lower_opt_state, state.lower_params)
  params = optax.apply_updates(state.lower_params, updates)
  stats = aux["batch_stats"]
  target = state.target
  if setup.task.has_target:
    target = setup.task.update_target(target, params, stats)
  grad_norm = optax.tree.norm(grads)
  metrics = {"lower_loss": loss, "lower_prox": prox, "lower_grad_norm": grad_norm,
             "lower_nonfinite": ~(jnp.isfinite(loss) & jnp.isfinite(grad_norm))}
  new_state = state.replace(lower_params=params, lower_stats=stats, target=target,
                            lower_opt_state=opt_state, lower_step=state.lower_step + 1)
  return new_state, metrics


def lower_stage(setup: BisslSetup, state: BilevelState, pretext_images, rng
                ) -> Tuple[BilevelState, dict]:
  """N_L lower steps as one ``lax.scan`` (the non-CPU path; one compile for any N_L).

  Returns:
    ``(state, metrics)`` with per-step metric arrays of length N_L.
  """
  rngs = jax.random.split(rng, pretext_images.shape[0])

  def body(carry, xs):
    images, key = xs
    return lower_step(setup, carry, images, key)

  return jax.lax.scan(body, state, (pretext_images, rngs))
