"""The upper level of BiSSL: implicit-gradient steps against one shared Hessian.

The Hessian operator of the pretext loss at (θ_P, φ_P) on one augmented HVP batch is
built once per stage with ``jax.linearize`` and reused by every CG iteration of every
upper step: θ_P, φ_P and that batch do not change during the stage. Each step solves
``v_IG ≈ (I + H/(λ+δ))⁻¹ ∇_θ L_D(θ_P, φ_D)``, forms ``g_θD = v_IG + ∇_θ L_D(θ_D, φ_D)`` and
``g_φD = ∇_φ L_D(θ_P, φ_D) + ∇_φ L_D(θ_D, φ_D)``, clips to norm 10 and applies SGD with
momentum and coupled weight decay.

On CPU the N_U steps (and the CG iterations) are unrolled Python loops under one jit,
because XLA:CPU runs convolution gradients ~40× slower inside loop bodies (SPEC §3);
elsewhere they are a ``lax.scan``.
"""
import functools
from typing import Tuple

import jax
import jax.numpy as jnp
import optax

from bissl_jax import augment
from bissl_jax import implicit
from bissl_jax import lam_variants
from bissl_jax import tree_math
from bissl_jax.bilevel import BilevelState, BisslSetup, current_lam


def downstream_loss(setup: BisslSetup, backbone_params, head_params, backbone_stats,
                    images, labels):
  """Training-mode downstream loss L_D: softmax cross-entropy, or sigmoid BCE for multi-label.

  Returns:
    ``(loss, new_backbone_stats)``.
  """
  feats, new_stats = setup.model.features(backbone_params, backbone_stats, images, train=True)
  logits = setup.model.classify(head_params, feats)
  if setup.multilabel:
    loss = optax.sigmoid_binary_cross_entropy(logits, labels.astype(logits.dtype)).mean()
  else:
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
  return loss, new_stats


def build_hessian_map(setup: BisslSetup, state: BilevelState, hvp_images, rng):
  """The undamped ``v ↦ H v`` of the pretext loss at (θ_P, φ_P) on one augmented batch.

  In 'linearize' mode this is the linear map ``jax.linearize`` returns: a
  ``jax.tree_util.Partial`` whose leaves are the stored residuals, so a jitted
  function can return it and other jitted functions can take it as an argument.
  BatchNorm runs in training mode on batch statistics; running statistics are not
  touched. With ``head_in_implicit`` the map acts on ``{'backbone', 'pretext_head'}``.

  Returns:
    ``(hessian_matvec, lam)``.
  """
  views = augment.pretext_views(rng, hvp_images, size=setup.image_size)
  lam = current_lam(setup, state)
  lp, stats, target = state.lower_params, state.lower_stats, state.target
  if setup.head_in_implicit:
    def loss_fn(theta_phi):
      return setup.task.loss(theta_phi, stats, views, target)[0]
    return implicit.hessian_operator(loss_fn, lp, mode=setup.hessian_mode), lam

  phi_p = lp["pretext_head"]

  def loss_fn(theta):
    return setup.task.loss({"backbone": theta, "pretext_head": phi_p}, stats, views, target)[0]
  return implicit.hessian_operator(loss_fn, lp["backbone"], mode=setup.hessian_mode), lam


def damped_hessian(setup: BisslSetup, hessian_matvec, lam):
  """``v ↦ v + H v/(λ+δ)``, or ``blockdiag(I, 0) + H_[θ;φ_P]/(λ+δ)`` with ``head_in_implicit``."""
  if not setup.head_in_implicit:
    return implicit.damped_operator(hessian_matvec, lam=lam, damping=setup.damping)
  scale = 1.0 / (lam + setup.damping)

  def matvec(v):
    hv = hessian_matvec(v)
    return {"backbone": tree_math.tree_axpy(scale, hv["backbone"], v["backbone"]),
            "pretext_head": tree_math.tree_scale(hv["pretext_head"], scale)}
  return matvec


def build_hessian_operator(setup: BisslSetup, state: BilevelState, hvp_images, rng):
  """The damped operator of one upper stage, built once (see :func:`build_hessian_map`).

  Returns:
    ``(matvec, lam)``.
  """
  hessian_matvec, lam = build_hessian_map(setup, state, hvp_images, rng)
  return damped_hessian(setup, hessian_matvec, lam), lam


def upper_step_with_map(setup: BisslSetup, state: BilevelState, hessian_matvec, lam, images,
                        labels, rng) -> Tuple[BilevelState, dict]:
  """:func:`upper_step` against an undamped map from :func:`build_hessian_map`."""
  return upper_step(setup, state, damped_hessian(setup, hessian_matvec, lam), lam, images,
                    labels, rng)


def upper_step(setup: BisslSetup, state: BilevelState, matvec, lam, images, labels, rng
               ) -> Tuple[BilevelState, dict]:
  """One upper-level step against a prebuilt Hessian operator (Algorithm 1, upper loop body).

  Args:
    setup: the static setup.
    state: the current state.
    matvec: the damped operator from :func:`build_hessian_operator`.
    lam: λ in force for this stage.
    images: ``(b, H, W, C)`` uint8 downstream batch.
    labels: its labels.
    rng: PRNG key for the downstream augmentation.

  Returns:
    ``(new_state, metrics)``.
  """
  x = augment.downstream_train_view(rng, images, size=setup.image_size)
  theta_p, theta_d = state.lower_params["backbone"], state.upper_params["backbone"]
  phi_d = state.upper_params["downstream_head"]
  loss_and_grad = jax.value_and_grad(functools.partial(downstream_loss, setup),
                                     argnums=(0, 1), has_aux=True)
  # Both terms use the same batch. θ_P's running statistics are left alone: only
  # real pretext steps may change them.
  (loss_p, _), (v, gphi_p) = loss_and_grad(theta_p, phi_d, state.lower_stats["backbone"], x, labels)
  (loss_d, stats_d), (gtheta_d, gphi_d) = loss_and_grad(theta_d, phi_d,
                                                         state.upper_stats["backbone"], x, labels)

  if setup.head_in_implicit:
    rhs = {"backbone": v, "pretext_head": jax.tree_util.tree_map(
        jnp.zeros_like, state.lower_params["pretext_head"])}
    init = {"backbone": state.cg_solution, "pretext_head": rhs["pretext_head"]}
    sol, info = implicit.solve(matvec, rhs, **_solver_kwargs(setup, init))
    v_ig = sol["backbone"]
  else:
    v_ig, info = implicit.solve(matvec, v, **_solver_kwargs(setup, state.cg_solution))

  grads = {"backbone": tree_math.tree_add(v_ig, gtheta_d),
           "downstream_head": tree_math.tree_add(gphi_p, gphi_d)}
  if setup.learnable_lam:
    grads["lam_rho"] = lam_variants.rho_gradient(
        state.upper_params["lam_rho"], theta_d, theta_p, v_ig, lam_damping=setup.lam_damping)
  tx = setup.upper_optimizer()
  updates, opt_state = tx.update(grads, state.upper_opt_state, state.upper_params)
  params = optax.apply_updates(state.upper_params, updates)
  grad_norm = optax.tree.norm(grads)
  metrics = {
      "upper_loss": loss_p + loss_d, "upper_loss_theta_p": loss_p, "upper_loss_theta_d": loss_d,
      "upper_grad_norm": grad_norm, "v_norm": tree_math.tree_norm(v),
      "v_ig_norm": tree_math.tree_norm(v_ig), "lam": lam,
      "cg_residual": info.residual, "cg_min_curvature": info.min_curvature,
      "cg_iterations": info.iterations,
      "upper_nonfinite": info.nonfinite | ~(jnp.isfinite(loss_p + loss_d) & jnp.isfinite(grad_norm)),
  }
  new_state = state.replace(upper_params=params, upper_stats={"backbone": stats_d},
                            upper_opt_state=opt_state, upper_step=state.upper_step + 1,
                            cg_solution=v_ig)
  return new_state, metrics


def _solver_kwargs(setup, init):
  kwargs = dict(solver=setup.solver, maxiter=setup.cg_iters, tol=setup.cg_tol,
                unroll=setup.use_unrolled)
  if setup.warm_start and setup.solver == "cg":
    kwargs["init"] = init
  return kwargs


def upper_stage(setup: BisslSetup, state: BilevelState, hvp_images, downstream_images,
                downstream_labels, rng) -> Tuple[BilevelState, dict]:
  """N_U upper steps sharing one Hessian operator (built once here).

  Args:
    setup: the static setup.
    state: the current state.
    hvp_images: ``(B, H, W, C)`` uint8 pretext batch for the Hessian, augmented once.
    downstream_images: ``(N_U, b, H, W, C)`` uint8.
    downstream_labels: ``(N_U, b)`` or ``(N_U, b, K)``.
    rng: PRNG key.

  Returns:
    ``(state, metrics)`` with per-step metric arrays of length N_U.
  """
  hvp_rng, step_rng = jax.random.split(rng)
  matvec, lam = build_hessian_operator(setup, state, hvp_images, hvp_rng)
  n = downstream_images.shape[0]
  rngs = jax.random.split(step_rng, n)
  if setup.use_unrolled:
    per_step = []
    for i in range(n):
      state, m = upper_step(setup, state, matvec, lam, downstream_images[i],
                            downstream_labels[i], rngs[i])
      per_step.append(m)
    metrics = jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *per_step)
  else:
    def body(carry, xs):
      images, labels, key = xs
      return upper_step(setup, carry, matvec, lam, images, labels, key)
    state, metrics = jax.lax.scan(body, state, (downstream_images, downstream_labels, rngs))
  return state, metrics
