"""The first-order penalty upper step (F2SA; Kwon et al., ICML 2023): no Hessian at all.

``config.bissl.upper_method='penalty'`` replaces the implicit-gradient solve of
:mod:`bissl_jax.core.upper` by a second lower-level sequence ``z`` (its own
:class:`~bissl_jax.core.state.PenaltyState`), which minimises the penalised lower
objective

    q_σ(z) = σ·L_D(z, φ_D) + L_P(z, φ_P) + λ/2·‖z − θ_D‖² + δ/2·‖z − θ_P‖²,

while θ_P (the lower stage's sequence) minimises ``g(z) = L_P + λ/2·‖z − θ_D‖²``.
The term of the upper gradient that comes from θ_P*(θ_D) is then

    h = (λ + δ)·(θ_P − z)/σ,

the difference of the θ_D-gradients of the coupling term at the two sequences
(∇_θD of λ/2·‖z − θ_D‖² is λ(θ_D − z)), divided by σ, with λ replaced by λ + δ as
in the damped implicit step. Subtracting the two stationarity conditions,
``σ ∇L_D(z) + (H + (λ+δ)I)(z − θ_P) = 0`` to first order, so
``h → (I + H/(λ+δ))⁻¹ ∇_θ L_D(θ_P)``, the damped implicit gradient, with an error
O(σ); δ = 0 is Kwon et al.'s method. An error ``r = ∇g(θ_P)`` of the lower stage
enters ``h`` as ``(λ+δ)(H + (λ+δ)I)⁻¹ r/σ``, so σ trades this against the O(σ) bias
(docs/solvers.md).

Each upper step takes ``config.bissl.penalty_inner_steps`` (K) steps on ``z``, each
one gradient of L_P (the stage's pretext inputs, prepared once like the implicit
step's HVP batch) and one of L_D (the step's downstream batch), then one gradient
of L_D at ``z`` (φ_D's term, ``∇_φ L_D(z, φ_D)``) and one at θ_D: K pretext and
K + 2 downstream gradients per upper step, no Hessian-vector product. ``z`` persists
across steps and alternations (it starts at θ_P). φ_P is held fixed in ``z``'s
problem, as the default implicit step holds it.
"""
from typing import Callable, Tuple

import jax
import jax.numpy as jnp
import optax

from bissl_jax.core import partition
from bissl_jax.core.state import BilevelState, BisslSetup, PenaltyState, current_lam
from bissl_jax.core.upper import apply_hypergradient, downstream_loss
from bissl_jax.implicit import loops
from bissl_jax.implicit import tree_math
from bissl_jax.types import PyTree


def penalised_gradient(sigma, lam, damping, pretext_grad: PyTree, downstream_grad: PyTree,
                       z: PyTree, theta_d: PyTree, theta_p: PyTree) -> PyTree:
  """``∇q_σ(z) = σ ∇L_D(z) + ∇L_P(z) + λ(z − θ_D) + δ(z − θ_P)``, the coupling terms
  in closed form."""
  grad = tree_math.tree_axpy(sigma, downstream_grad, pretext_grad)
  grad = tree_math.tree_axpy(lam, tree_math.tree_sub(z, theta_d), grad)
  return tree_math.tree_axpy(damping, tree_math.tree_sub(z, theta_p), grad)


def hypergradient(sigma, lam, damping, theta_p: PyTree, z: PyTree) -> PyTree:
  """``(λ + δ)(θ_P − z)/σ``: the penalty method's estimate of v_IG."""
  return tree_math.tree_scale(tree_math.tree_sub(theta_p, z), (lam + damping) / sigma)


def run_z_steps(tx: optax.GradientTransformation, penalty: PenaltyState,
                gradient_fn: Callable[[PyTree], PyTree], steps: int, *, unroll=None
                ) -> PenaltyState:
  """``steps`` optimizer steps of ``tx`` on ``z`` along ``gradient_fn(z)``."""
  def body(carry, _):
    updates, opt_state = tx.update(gradient_fn(carry.z), carry.opt_state, carry.z)
    return PenaltyState(optax.apply_updates(carry.z, updates), opt_state), None
  penalty, _ = loops.scan(body, penalty, None, length=steps, unroll=unroll)
  return penalty


def prepare_stage(setup: BisslSetup, state: BilevelState, hvp_images, rng):
  """``(pretext inputs, λ)``: the upper stage's pretext batch, prepared once, is the
  L_P batch of every z step (the implicit step takes its Hessian on the same batch)."""
  return setup.task.prepare(rng, hvp_images), current_lam(setup, state)


def upper_step(setup: BisslSetup, state: BilevelState, pretext_inputs, lam, images, labels,
               rng) -> Tuple[BilevelState, dict]:
  """One penalty upper step; the signature and metrics of :func:`bissl_jax.core.upper.upper_step`.

  ``state`` is a :class:`~bissl_jax.core.state.PenaltyBilevelState`. The metrics
  keep the implicit step's names: ``upper_loss_theta_p`` and ``v_norm`` are taken at
  ``z``, ``v_ig_norm`` is ‖h‖, ``cg_iterations`` the z steps, the residual NaN
  (never checked); ``penalty_gap`` is ‖θ_P − z‖.
  """
  upper, lower = state.upper, state.lower
  x = setup.downstream.prepare(rng, images, train=True)
  mask = setup.upper_trainable(upper.params)["backbone"]
  theta_p, frozen_p = partition.split(lower.params["backbone"], mask)
  theta_d, frozen_d = partition.split(upper.params["backbone"], mask)
  phi_d, lower_stats = upper.params["downstream_head"], lower.batch_stats

  def down_loss(theta_train, phi, frozen, stats):
    return downstream_loss(setup, partition.merge(theta_train, frozen), phi, stats, x, labels)
  loss_and_grad = jax.value_and_grad(down_loss, argnums=(0, 1), has_aux=True)

  def pretext_loss(z):  # φ_P fixed; z's statistics are discarded like θ_P's in upper.py
    params = {**lower.params, "backbone": partition.merge(z, frozen_p)}
    return setup.task.loss(params, lower_stats, pretext_inputs, state.target)[0]

  def gradient_fn(z):
    down_grad = jax.grad(lambda t: down_loss(t, phi_d, frozen_p, lower_stats["backbone"])[0])(z)
    return penalised_gradient(setup.penalty_sigma, lam, setup.damping,
                              jax.grad(pretext_loss)(z), down_grad, z, theta_d, theta_p)
  penalty = run_z_steps(setup.penalty_optimizer(), state.penalty, gradient_fn,
                        setup.penalty_inner_steps, unroll=setup.use_unrolled)
  h = hypergradient(setup.penalty_sigma, lam, setup.damping, theta_p, penalty.z)
  (loss_z, _), (v, gphi_z) = loss_and_grad(penalty.z, phi_d, frozen_p,
                                           lower_stats["backbone"])
  (loss_d, stats_d), (gtheta_d, gphi_d) = loss_and_grad(theta_d, phi_d, frozen_d,
                                                         upper.batch_stats["backbone"])
  params, opt_state, grad_norm = apply_hypergradient(
      setup, upper, h, gtheta_d, tree_math.tree_add(gphi_z, gphi_d), theta_p, frozen_d)
  finite = (jnp.isfinite(loss_z + loss_d) & jnp.isfinite(grad_norm)
            & tree_math.tree_all_finite(params) & tree_math.tree_all_finite(penalty.z))
  metrics = {
      "upper_loss": loss_z + loss_d, "upper_loss_theta_p": loss_z, "upper_loss_theta_d": loss_d,
      "upper_grad_norm": grad_norm, "v_norm": tree_math.tree_norm(v),
      "v_ig_norm": tree_math.tree_norm(h), "lam": lam,
      "cg_residual": jnp.full((), jnp.nan, jnp.float32), "residual_checked": jnp.zeros((), bool),
      "cg_min_curvature": jnp.full((), jnp.inf, jnp.float32),
      "cg_iterations": jnp.asarray(setup.penalty_inner_steps, jnp.int32),
      "residual_fallback": jnp.zeros((), bool), "upper_nonfinite": ~finite,
      "penalty_gap": tree_math.tree_norm(tree_math.tree_sub(theta_p, penalty.z)),
  }
  new_upper = upper.replace(params=params, batch_stats={"backbone": stats_d},
                            opt_state=opt_state, step=upper.step + 1)
  return state.replace(upper=new_upper, penalty=penalty), metrics
