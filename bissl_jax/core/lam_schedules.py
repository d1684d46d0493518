"""Thesis variants of the regularisation weight λ (BiSSL thesis §5.2): schedules and learnable λ.

Schedules over alternations t = 0..T−1:
``λ(t) = (λmax − λmin)·f(t) + λmin`` with ``λmin = 1e-8`` and

* ``cosine_decay``:    f(t) = (1 + cos(π·t/(T−1)))/2   (λmax → λmin)
* ``cosine_increase``: f(t) = (1 − cos(π·t/(T−1)))/2   (λmin → λmax)
* ``exp_increase``:    f(t) = (1 − e^{−α·t/(T−1)})/(1 − e^{−α})

Learnable λ = softplus(ρ) with ρ trained by the upper optimizer. For the proximal
lower problem the exact derivative of the upper objective through θ_P*(θ_D, λ) is
``dF/dλ = ⟨θ_D − θ_P, (H + (λ+δ)I)⁻¹ v⟩ = ⟨θ_D − θ_P, v_IG⟩/(λ+δ)``, hence
``dF/dρ = sigmoid(ρ)/(softplus(ρ) + δ_λ)·⟨θ_D − θ_P, v_IG⟩``: one dot product per
upper step, reusing the v_IG the upper step already solved for.
"""
import math

import jax
import jax.numpy as jnp

from bissl_jax.implicit import tree_math

LAM_MIN = 1e-8
SCHEDULES = ("none", "cosine_decay", "cosine_increase", "exp_increase")


def schedule_fraction(name: str, t, alternations: int, alpha: float = 10.0):
  """f(t) ∈ [0, 1] of the named schedule at alternation ``t`` (0-based)."""
  denom = max(alternations - 1, 1)
  u = jnp.clip(jnp.asarray(t, jnp.float32) / denom, 0.0, 1.0)
  if name == "cosine_decay":
    return 0.5 * (1.0 + jnp.cos(jnp.pi * u))
  if name == "cosine_increase":
    return 0.5 * (1.0 - jnp.cos(jnp.pi * u))
  if name == "exp_increase":
    if alpha <= 0:
      raise ValueError(f"config.bissl.lam_exp_alpha must be > 0, got {alpha}.")
    return (1.0 - jnp.exp(-alpha * u)) / (1.0 - math.exp(-alpha))
  raise ValueError(f"Unknown config.bissl.lam_schedule={name!r}; choose one of {SCHEDULES}.")


def scheduled_lam(name: str, t, *, lam_max: float, alternations: int,
                  lam_min: float = LAM_MIN, alpha: float = 10.0):
  """λ(t) = (λmax − λmin)·f(t) + λmin.

  Args:
    name: 'cosine_decay', 'cosine_increase' or 'exp_increase'.
    t: the alternation index (0-based; may be traced).
    lam_max: λmax (``config.bissl.lam``).
    alternations: T.
    lam_min: λmin, 1e-8 by default.
    alpha: α of ``exp_increase``.

  Returns:
    A float32 scalar.
  """
  return (lam_max - lam_min) * schedule_fraction(name, t, alternations, alpha) + lam_min


def inverse_softplus(y: float) -> float:
  """ρ with softplus(ρ) = y, the initial ρ of learnable λ."""
  if y <= 0:
    raise ValueError(f"learnable λ needs config.bissl.lam > 0 to start from, got {y}.")
  return float(y + math.log(-math.expm1(-y)))


def rho_gradient(rho, theta_d, theta_p, v_ig, *, lam_damping: float = 0.0):
  """Closed-form dF/dρ = sigmoid(ρ)/(softplus(ρ)+δ_λ)·⟨θ_D − θ_P, v_IG⟩.

  Args:
    rho: the current ρ.
    theta_d: θ_D.
    theta_p: θ_P.
    v_ig: the implicit-gradient solution of this upper step.
    lam_damping: δ_λ (0 is exact for the undamped operator; the thesis also used 10).

  Returns:
    A scalar with ρ's dtype.
  """
  inner = tree_math.tree_vdot(tree_math.tree_sub(theta_d, theta_p), v_ig)
  return (jax.nn.sigmoid(rho) / (jax.nn.softplus(rho) + lam_damping) * inner).astype(rho.dtype)
