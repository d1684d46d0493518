"""Conjugate gradient on the whole pytree (``solver='cg'``).

The same recurrence and stopping rule as ``jax.scipy.sparse.linalg.cg``, tracked
(iterations, curvature), optionally preconditioned, with an unrolled driver for
XLA:CPU beside the ``while_loop`` one, and wrapped in ``lax.custom_linear_solve`` as
JAX wraps its own.
"""
from typing import NamedTuple, Optional, Tuple

import jax.numpy as jnp
from jax import lax

from bissl_jax.implicit import loops
from bissl_jax.implicit.solvers.base import (MatVec, Preconditioner, SolveInfo, _rayleigh,
                                             _select, symmetric_krylov, with_preconditioner)
from bissl_jax.implicit.solvers.spec import SolverSpec
from bissl_jax.implicit.tree_math import tree_axpy, tree_sub, tree_vdot, tree_zeros_like
from bissl_jax.types import PyTree


class _CGState(NamedTuple):
  x: PyTree
  r: PyTree
  p: PyTree
  rs: jnp.ndarray             # r·r (the stopping rule reads the Euclidean residual)
  rz: Optional[jnp.ndarray]   # r·M r; None without a preconditioner (then it is rs)
  k: jnp.ndarray              # iterations done
  min_curvature: jnp.ndarray


def _cg_iterations(matvec: MatVec, b: PyTree, init: Optional[PyTree], maxiter: int,
                   tol: float, unrolled: bool, preconditioner: Optional[Preconditioner] = None
                   ) -> Tuple[PyTree, Tuple]:
  """Tracked (preconditioned) CG, the recurrence of ``jax.scipy.sparse.linalg.cg``.

  With ``preconditioner=None`` every operation is the unpreconditioned one (``z = r``,
  ``r·z = r·r``), so the result is bit for bit what it was before preconditioning
  existed; with ``M`` it is the textbook PCG (``z = M r``, step sizes from ``r·z``).
  """
  # Same stopping rule as jax.scipy.sparse.linalg.cg: ‖r‖² ≤ tol²·‖b‖² (Euclidean,
  # also when preconditioned, so tolerances compare across preconditioners).
  threshold = jnp.square(tol) * tree_vdot(b, b)
  if init is None:
    x, r = tree_zeros_like(b), b       # skip the product A·0
  else:
    x, r = init, tree_sub(b, matvec(init))
  rs = tree_vdot(r, r)
  if preconditioner is None:
    p, rz = r, None
  else:
    p = preconditioner(r)
    rz = tree_vdot(r, p)
  state = _CGState(x=x, r=r, p=p, rs=rs, rz=rz, k=jnp.zeros((), jnp.int32),
                   min_curvature=jnp.asarray(jnp.inf, jnp.float32))

  def running(s: _CGState) -> jnp.ndarray:
    # "Not yet converged", written so that a NaN residual counts as active: a NaN
    # right-hand side then propagates into x (and info.nonfinite) instead of
    # silently returning the zero initial guess. Preconditioned, r·M r can reach 0
    # (underflow) before r·r does; that is convergence too, never a 0/0.
    going = jnp.logical_not(s.rs <= threshold)
    return going if preconditioner is None else going & jnp.logical_not(s.rz <= 0)

  def step(s: _CGState) -> _CGState:
    # Masked so that the unrolled driver leaves a converged state untouched (and
    # never divides 0 by 0 once r is exactly 0).
    active = running(s)
    rho = s.rs if preconditioner is None else s.rz
    ap = matvec(s.p)
    pap = tree_vdot(s.p, ap)
    alpha = rho / jnp.where(active, pap, 1.0)
    r = tree_axpy(-alpha, ap, s.r)
    rs = tree_vdot(r, r)
    if preconditioner is None:
      z, rz, new_rho = r, None, rs
    else:
      z = preconditioner(r)
      rz = tree_vdot(r, z)
      new_rho = rz
    beta = new_rho / jnp.where(active, rho, 1.0)
    curvature = _rayleigh(pap, tree_vdot(s.p, s.p))
    new = _CGState(x=tree_axpy(alpha, s.p, s.x), r=r, p=tree_axpy(beta, s.p, z),
                   rs=rs, rz=rz, k=s.k + 1,
                   min_curvature=jnp.minimum(s.min_curvature, curvature))
    return _select(active, new, s)

  if unrolled:  # fixed length; converged steps are masked out inside `step`
    state = loops.fori(lambda _, s: step(s), state, maxiter, unroll=True)
  else:         # stops early, as jax.scipy.sparse.linalg.cg does
    state = lax.while_loop(lambda s: running(s) & (s.k < maxiter), step, state)
  return state.x, (state.k, state.min_curvature)


def cg(matvec: MatVec, b: PyTree, *, init: Optional[PyTree] = None, maxiter: int = 5,
       tol: float = 0.0, unroll: Optional[bool] = None,
       preconditioner: Optional[Preconditioner] = None) -> Tuple[PyTree, SolveInfo]:
  """Conjugate gradient on the whole pytree seen as one vector.

  Modes: fixed iterations (``tol=0``: exactly ``maxiter`` steps unless the residual
  becomes exactly 0), tolerance (stop once ``‖r‖ ≤ tol·‖b‖`` or after ``maxiter``
  steps), and warm start from ``init`` (costs one extra product, ``A·init``).

  With ``preconditioner=M`` (``r ↦ M r`` on pytrees, ``M`` symmetric positive definite
  and ≈ ``A⁻¹``) it is preconditioned CG: it minimises the ``A``-norm of the error
  over ``init + K_k(M A, M r_0)``, in as few iterations as ``M A`` is well conditioned,
  for one application of ``M`` per iteration (plus one for the start). The stopping
  rule and ``info.residual`` stay Euclidean (``‖A x − b‖ ≤ tol·‖b‖``), so a tolerance
  means the same with and without ``M``; ``info.min_curvature`` is still the smallest
  ``pᵀA p / pᵀp`` over the search directions. ``None`` is the identity, computed
  without applying it: bit for bit the unpreconditioned solver.

  Why not call ``jax.scipy.sparse.linalg.cg`` directly: it reports neither the
  iterations used nor the curvature seen, always spends a product on ``A·x0`` even
  for ``x0 = 0``, and only has a ``while_loop`` driver, which hits the XLA:CPU loop
  cliff. This is the same recurrence and stopping rule, tracked, with an unrolled
  driver besides the ``while_loop`` one, wrapped in ``lax.custom_linear_solve``
  (symmetric) exactly as JAX wraps its own CG, so jit/vmap/grad behave the same.
  The tests check it against ``jax.scipy.sparse.linalg.cg``.

  Args:
    matvec: ``v ↦ A v`` for a symmetric positive definite ``A``.
    b: right-hand side pytree.
    init: optional warm start shaped like ``b``.
    maxiter: maximum number of iterations (operator products).
    tol: relative tolerance; 0 for fixed-iteration mode.
    unroll: force the unrolled (True) or ``while_loop`` (False) driver; None picks
      unrolled iff the default backend is CPU and ``tol == 0``.
    preconditioner: optional SPD ``r ↦ M r`` with ``M ≈ A⁻¹``; None = no preconditioning.

  Returns:
    ``(x, SolveInfo)``.
  """
  iterate = with_preconditioner(_cg_iterations, preconditioner)
  return symmetric_krylov(iterate, matvec, b, init=init, maxiter=maxiter, tol=tol,
                          unroll=unroll)


SPEC = SolverSpec(
    name="cg", solve=cg, warm_start=True, tolerance=True, preconditionable=True,
    summary="Conjugate gradient on the whole pytree; symmetric positive definite A.")
