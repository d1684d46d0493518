"""Conjugate gradient on the whole pytree (``solver='cg'``).

The same recurrence and stopping rule as ``jax.scipy.sparse.linalg.cg``, tracked
(iterations, curvature), with an unrolled driver for XLA:CPU beside the
``while_loop`` one, and wrapped in ``lax.custom_linear_solve`` as JAX wraps its own.
"""
from typing import NamedTuple, Optional, Tuple

import jax.numpy as jnp
from jax import lax

from bissl_jax.implicit import loops
from bissl_jax.implicit.solvers.base import (MatVec, SolveInfo, _rayleigh, _select,
                                             symmetric_krylov)
from bissl_jax.implicit.solvers.spec import SolverSpec
from bissl_jax.implicit.tree_math import tree_axpy, tree_sub, tree_vdot, tree_zeros_like
from bissl_jax.types import PyTree


class _CGState(NamedTuple):
  x: PyTree
  r: PyTree
  p: PyTree
  rs: jnp.ndarray             # r·r
  k: jnp.ndarray              # iterations done
  min_curvature: jnp.ndarray


def _cg_iterations(matvec: MatVec, b: PyTree, init: Optional[PyTree], maxiter: int,
                   tol: float, unrolled: bool) -> Tuple[PyTree, Tuple]:
  """Tracked CG, same recurrence as ``jax.scipy.sparse.linalg.cg`` (M = I)."""
  # Same stopping rule as jax.scipy.sparse.linalg.cg: ‖r‖² ≤ tol²·‖b‖².
  threshold = jnp.square(tol) * tree_vdot(b, b)
  if init is None:
    x, r = tree_zeros_like(b), b       # skip the product A·0
  else:
    x, r = init, tree_sub(b, matvec(init))
  state = _CGState(x=x, r=r, p=r, rs=tree_vdot(r, r), k=jnp.zeros((), jnp.int32),
                   min_curvature=jnp.asarray(jnp.inf, jnp.float32))

  def step(s: _CGState) -> _CGState:
    # Masked so that the unrolled driver leaves a converged state untouched (and
    # never divides 0 by 0 once r is exactly 0).
    # "Not yet converged", written so that a NaN residual counts as active: a NaN
    # right-hand side then propagates into x (and info.nonfinite) instead of
    # silently returning the zero initial guess.
    active = jnp.logical_not(s.rs <= threshold)
    ap = matvec(s.p)
    pap = tree_vdot(s.p, ap)
    alpha = s.rs / jnp.where(active, pap, 1.0)
    r = tree_axpy(-alpha, ap, s.r)
    rs = tree_vdot(r, r)
    beta = rs / jnp.where(active, s.rs, 1.0)
    curvature = _rayleigh(pap, tree_vdot(s.p, s.p))
    new = _CGState(x=tree_axpy(alpha, s.p, s.x), r=r, p=tree_axpy(beta, s.p, r),
                   rs=rs, k=s.k + 1,
                   min_curvature=jnp.minimum(s.min_curvature, curvature))
    return _select(active, new, s)

  if unrolled:  # fixed length; converged steps are masked out inside `step`
    state = loops.fori(lambda _, s: step(s), state, maxiter, unroll=True)
  else:         # stops early, as jax.scipy.sparse.linalg.cg does
    state = lax.while_loop(lambda s: jnp.logical_not(s.rs <= threshold) & (s.k < maxiter),
                           step, state)
  return state.x, (state.k, state.min_curvature)


def cg(matvec: MatVec, b: PyTree, *, init: Optional[PyTree] = None, maxiter: int = 5,
       tol: float = 0.0, unroll: Optional[bool] = None) -> Tuple[PyTree, SolveInfo]:
  """Conjugate gradient on the whole pytree seen as one vector.

  Modes: fixed iterations (``tol=0``: exactly ``maxiter`` steps unless the residual
  becomes exactly 0), tolerance (stop once ``‖r‖ ≤ tol·‖b‖`` or after ``maxiter``
  steps), and warm start from ``init`` (costs one extra product, ``A·init``).

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

  Returns:
    ``(x, SolveInfo)``.
  """
  return symmetric_krylov(_cg_iterations, matvec, b, init=init, maxiter=maxiter, tol=tol,
                          unroll=unroll)


SPEC = SolverSpec(
    name="cg", solve=cg, warm_start=True, tolerance=True,
    summary="Conjugate gradient on the whole pytree; symmetric positive definite A.")
