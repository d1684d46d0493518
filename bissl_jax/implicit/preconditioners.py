"""Curvature-model preconditioners by name for the standalone API (``implicit_grad``).

A preconditioner for ``A = I + H/μ`` (``μ = λ + δ``) is the exact inverse of a cheap
curvature model of H, ``M = (I + F/μ)⁻¹``: symmetric positive definite because ``F`` is
positive semi-definite, and ``≈ A⁻¹`` where ``F ≈ H``. A name only says which model; the
model needs its inputs, and a name is accepted only where they are given:

* ``'kfac'``, ``'ekfac'``: K-FAC's (EK-FAC's) model of ``inner_loss`` at ``inner_params``
  (one forward/backward pass, an ``eigh`` per factor; the loss must run Flax
  ``nn.Dense``/``nn.Conv`` layers whose kernels are leaves of ``inner_params``, see
  :mod:`~bissl_jax.implicit.solvers.kfac`). ``implicit_grad`` has both.
* ``'mfac'``: M-FAC's empirical Fisher of m stored gradients of the lower loss
  (``gradients``: shaped like ``inner_params`` with a leading axis m, e.g. the last m
  lower steps' gradients), per leaf, as BiSSLight; nothing in ``implicit_grad``'s other
  arguments holds them, so they must be passed.

:func:`build` makes the callable once (the model is built once, every application of
``M`` reuses it); ``implicit_solve`` and ``solve``, which see no loss, take that callable.
"""
from typing import Callable, Optional

from bissl_jax.implicit.solvers import ekfac
from bissl_jax.implicit.solvers import kfac
from bissl_jax.implicit.solvers import mfac
from bissl_jax.types import PyTree

NAMES = ("mfac", "kfac", "ekfac")
_MODELS = {"kfac": kfac.factorize, "ekfac": ekfac.factorize}


def build(name: str, *, mu, inner_loss: Optional[Callable] = None,
          inner_params: Optional[PyTree] = None, gradients: Optional[PyTree] = None
          ) -> Callable[[PyTree], PyTree]:
  """``r ↦ (I + F/mu)⁻¹ r`` for the curvature model ``name`` (one of :data:`NAMES`).

  Args:
    name: ``'mfac'``, ``'kfac'`` or ``'ekfac'``.
    mu: ``λ + δ`` (may be traced).
    inner_loss, inner_params: the lower loss and the point (``'kfac'``, ``'ekfac'``).
    gradients: m stored gradients of the lower loss, each leaf with a leading axis m
      (``'mfac'``).

  Raises:
    ValueError: an unknown name, a missing input, an input the model does not read, or
      a loss in which K-FAC finds no layer.
  """
  if name not in NAMES:
    raise ValueError(f"Unknown preconditioner {name!r}; choose one of {NAMES} or pass a "
                     "callable r -> M r.")
  if name == "mfac":
    if gradients is None:
      raise ValueError("preconditioner='mfac' needs the stored gradients: pass "
                       "preconditioner_gradients= (the lower loss's last m gradients, "
                       "each leaf with a leading axis m), or a callable preconditioner.")
    return _mfac(gradients, inner_params, mu)
  if gradients is not None:
    raise ValueError(f"preconditioner={name!r} builds its model from inner_loss; "
                     "preconditioner_gradients is only read by 'mfac': drop it.")
  if inner_loss is None or inner_params is None:
    raise ValueError(f"preconditioner={name!r} needs the lower loss and its point: use "
                     "implicit_grad, or build the callable with "
                     "bissl_jax.implicit.preconditioners.build(name, mu=..., "
                     "inner_loss=..., inner_params=...).")
  factor = _MODELS[name](inner_loss, inner_params)
  if not factor.layers:
    raise ValueError(f"preconditioner={name!r} found no Flax nn.Dense/nn.Conv layer whose "
                     "kernel is a leaf of inner_params in inner_loss, so its model would "
                     "be the identity: pass a callable preconditioner instead.")
  return lambda r: kfac.solve(factor, r, mu, diagnostics=False)[0]


def _mfac(gradients: PyTree, like: Optional[PyTree], mu) -> Callable[[PyTree], PyTree]:
  """M-FAC's per-leaf inverse, its Gram matrices factorised once for every application."""
  factor = mfac.factorize_stacked(gradients, mu, like=like)
  return lambda r: mfac.mfac_solve(gradients, r, mu, factor=factor, diagnostics=False)[0]
