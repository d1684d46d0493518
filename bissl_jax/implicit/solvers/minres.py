"""MINRES for symmetric indefinite systems (``solver='minres'``).

It follows the registry signature of :mod:`bissl_jax.implicit.solvers`,
``fn(matvec, b, *, init=None, maxiter=5, tol=0.0, unroll=None) -> (x, SolveInfo)``.

**Why MINRES.** BiSSL's damped operator ``A = I + H/(λ+δ)`` is often indefinite
(docs/solvers.md: pretext Hessians have eigenvalues far below −(λ+δ)). CG assumes a
positive-definite ``A``; on an indefinite one its residual can grow without bound.
MINRES (Paige & Saunders, 1975) needs only a symmetric ``A``: iteration ``k``
returns the point of the Krylov space ``K_k(A, r_0)`` with the smallest residual
``‖A x − b‖``, so the residual never grows with ``k``. It costs one product per
iteration, like CG, and a few more vectors of memory.
"""
from typing import NamedTuple, Optional, Tuple

import jax.numpy as jnp
from jax import lax

from bissl_jax.implicit import loops
from bissl_jax.implicit.solvers.base import (MatVec, SolveInfo, _rayleigh, _select,
                                             symmetric_krylov)
from bissl_jax.implicit.tree_math import (tree_axpy, tree_norm, tree_scale, tree_sub, tree_vdot,
                                          tree_zeros_like)
from bissl_jax.implicit.solvers.spec import SolverSpec
from bissl_jax.types import PyTree



# ---------------------------------------------------------------------------
# MINRES.

class _MinresState(NamedTuple):
  x: PyTree
  r1: PyTree                  # the two latest unnormalised Lanczos vectors
  r2: PyTree
  w: PyTree                   # the two latest search directions
  w2: PyTree
  beta: jnp.ndarray           # ‖r2‖
  old_beta: jnp.ndarray
  dbar: jnp.ndarray           # Givens-rotation bookkeeping (Paige–Saunders names)
  epsilon: jnp.ndarray
  phibar: jnp.ndarray         # ‖b − A x‖ (exact in exact arithmetic)
  cs: jnp.ndarray
  sn: jnp.ndarray
  k: jnp.ndarray
  min_curvature: jnp.ndarray


def _minres_iterations(matvec: MatVec, b: PyTree, init: Optional[PyTree], maxiter: int,
                       tol: float, unrolled: bool) -> Tuple[PyTree, Tuple]:
  """Unpreconditioned MINRES; the recurrence of SciPy's ``minres`` (M = I)."""
  if init is None:
    x, r = tree_zeros_like(b), b       # skip the product A·0
  else:
    x, r = init, tree_sub(b, matvec(init))
  beta1 = tree_norm(r)
  threshold = tol * tree_norm(b)
  scalar = lambda value: jnp.asarray(value, beta1.dtype)  # float64 leaves stay float64
  zeros = tree_zeros_like(b)
  state = _MinresState(
      x=x, r1=r, r2=r, w=zeros, w2=zeros, beta=beta1, old_beta=scalar(0.0), dbar=scalar(0.0),
      epsilon=scalar(0.0), phibar=beta1, cs=scalar(-1.0), sn=scalar(0.0),
      k=jnp.zeros((), jnp.int32), min_curvature=jnp.asarray(jnp.inf, jnp.float32))

  def step(s: _MinresState) -> _MinresState:
    # Masked like cg: a converged state (phibar ≤ tol·‖b‖, or an exhausted Krylov
    # space, beta = 0) is left untouched, and no 0/0 is ever formed.
    # Written so that NaN counts as active: a NaN right-hand side propagates into x.
    active = jnp.logical_not(s.phibar <= threshold) & jnp.logical_not(s.beta <= 0)
    beta = jnp.where(active, s.beta, 1.0)
    v = tree_scale(s.r2, 1.0 / beta)               # Lanczos vector, ‖v‖ = 1
    av = matvec(v)
    vav = tree_vdot(v, av)
    curvature = _rayleigh(vav, tree_vdot(v, v))
    old_beta = jnp.where(s.k > 0, s.old_beta, 1.0)
    y = tree_axpy(jnp.where(s.k > 0, -beta / old_beta, 0.0), s.r1, av)
    alpha = tree_vdot(v, y)
    y = tree_axpy(-alpha / beta, s.r2, y)
    new_beta = tree_norm(y)
    # Apply the previous rotation, then form the one that annihilates new_beta.
    delta = s.cs * s.dbar + s.sn * alpha
    gbar = s.sn * s.dbar - s.cs * alpha
    epsilon = s.sn * new_beta
    dbar = -s.cs * new_beta
    gamma = jnp.maximum(jnp.hypot(gbar, new_beta), jnp.finfo(jnp.float32).tiny)
    cs, sn = gbar / gamma, new_beta / gamma
    phi = cs * s.phibar
    # w_k = (v_k − ε_k w_{k−2} − δ_k w_{k−1}) / γ_k
    w = tree_scale(tree_axpy(-delta, s.w, tree_axpy(-s.epsilon, s.w2, v)), 1.0 / gamma)
    new = _MinresState(
        x=tree_axpy(phi, w, s.x), r1=s.r2, r2=y, w=w, w2=s.w, beta=new_beta,
        old_beta=beta, dbar=dbar, epsilon=epsilon, phibar=sn * s.phibar, cs=cs, sn=sn,
        k=s.k + 1, min_curvature=jnp.minimum(s.min_curvature, curvature))
    return _select(active, new, s)

  if unrolled:  # fixed length; converged steps are masked out inside `step`
    state = loops.fori(lambda _, s: step(s), state, maxiter, unroll=True)
  else:
    state = lax.while_loop(
        lambda s: (jnp.logical_not(s.phibar <= threshold) & jnp.logical_not(s.beta <= 0)
                   & (s.k < maxiter)), step, state)
  return state.x, (state.k, state.min_curvature)


def minres(matvec: MatVec, b: PyTree, *, init: Optional[PyTree] = None, maxiter: int = 5,
           tol: float = 0.0, unroll: Optional[bool] = None) -> Tuple[PyTree, SolveInfo]:
  """MINRES on the whole pytree seen as one vector, for symmetric (indefinite) ``A``.

  Iterate ``k`` minimises ``‖A x − b‖`` over ``init + K_k(A, b − A·init)``, so the
  residual is non-increasing in ``k`` for any symmetric ``A`` (in exact arithmetic;
  in floating point up to rounding). Modes as :func:`bissl_jax.implicit.solvers.cg.cg`:
  fixed iterations (``tol=0``: exactly ``maxiter`` steps unless the residual or
  the Lanczos vector becomes exactly 0), tolerance (stop once the recurrence's
  residual estimate is ``≤ tol·‖b‖``) and a warm start from ``init`` (one extra
  product). ``info.min_curvature`` is the smallest ``vᵀA v`` over the (unit)
  Lanczos vectors ``v``; negative proves ``A`` indefinite.

  Differentiation as ``cg``: wrapped in ``lax.custom_linear_solve`` (symmetric),
  so derivatives are another MINRES solve and are accurate when it converges.

  Args:
    matvec: ``v ↦ A v`` for a symmetric ``A``.
    b: right-hand side pytree.
    init: optional warm start shaped like ``b``.
    maxiter: maximum number of iterations (operator products).
    tol: relative tolerance; 0 for fixed-iteration mode.
    unroll: force the unrolled (True) or ``while_loop`` (False) driver; None picks
      unrolled iff the default backend is CPU and ``tol == 0``.

  Returns:
    ``(x, SolveInfo)``.
  """
  return symmetric_krylov(_minres_iterations, matvec, b, init=init, maxiter=maxiter, tol=tol,
                          unroll=unroll)


SPEC = SolverSpec(
    name="minres", solve=minres, warm_start=True, tolerance=True, indefinite_safe=True,
    summary="MINRES: symmetric (possibly indefinite) A; the residual never grows.")
