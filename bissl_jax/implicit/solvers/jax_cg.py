"""The stock ``jax.scipy.sparse.linalg.cg`` with the library's diagnostics (``solver='jax_cg'``)."""
from typing import Optional, Tuple

import jax
import jax.numpy as jnp

from bissl_jax.implicit.solvers.base import (MatVec, SolveInfo, _check_like, _check_maxiter,
                                             _check_tol, finish)
from bissl_jax.implicit.solvers.spec import SolverSpec
from bissl_jax.implicit.tree_math import tree_all_finite
from bissl_jax.types import PyTree


def jax_cg(matvec: MatVec, b: PyTree, *, init: Optional[PyTree] = None, maxiter: int = 5,
           tol: float = 0.0, unroll: Optional[bool] = None) -> Tuple[PyTree, SolveInfo]:
  """``jax.scipy.sparse.linalg.cg(matvec, b, x0=init, tol=tol, atol=0, maxiter=maxiter)``.

  For comparing the library's upper step against the stock JAX solver (the call
  the project's design names). Same recurrence and stopping rule as
  ``solvers.cg.cg``; differences: it has only a ``while_loop`` driver (``unroll`` is
  accepted and ignored, so on CPU it meets the XLA:CPU loop cliff, docs/implicit_grad.md) and
  it always spends a product on ``A·x0``, also for ``x0 = 0``.

  ``SolveInfo`` is computed from its result: ``iterations`` is ``maxiter``, an
  upper bound (JAX does not report the count; it stops earlier only on reaching
  ``tol``, or an exactly zero residual); ``residual`` is recomputed with the true
  operator; ``min_curvature`` is NaN (not observed); ``nonfinite`` as usual.

  Args:
    matvec: ``v ↦ A v`` for a symmetric positive definite ``A``.
    b: right-hand side pytree.
    init: optional warm start shaped like ``b`` (``x0``; default zeros).
    maxiter: maximum number of iterations.
    tol: relative tolerance; 0 runs ``maxiter`` iterations.
    unroll: ignored (see above).

  Returns:
    ``(x, SolveInfo)``.
  """
  del unroll
  maxiter, tol = _check_maxiter(maxiter), _check_tol(tol)
  if init is not None:
    init = _check_like("init", init, b)
  x, _ = jax.scipy.sparse.linalg.cg(matvec, b, x0=init, tol=tol, atol=0.0,
                                    maxiter=maxiter)
  # JAX's cg returns its initial guess for a NaN right-hand side; propagate the NaN
  # instead, as every solver of the library does (the non-finite policy of implicit/api.py).
  bad = jnp.logical_not(tree_all_finite(b))
  x = jax.tree_util.tree_map(lambda leaf: jnp.where(bad, jnp.nan, leaf), x)
  return x, finish(matvec, b, x, x, maxiter, jnp.nan, curvature_tracked=False)


SPEC = SolverSpec(
    name="jax_cg", solve=jax_cg, warm_start=True, tolerance=True,
    summary="jax.scipy.sparse.linalg.cg as JAX ships it (while_loop only), for comparison.")
