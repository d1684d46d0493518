"""Truncated Neumann series (``solver='neumann'``)."""
from typing import Optional, Tuple

import jax.numpy as jnp

from bissl_jax.implicit import loops
from bissl_jax.implicit.solvers.base import (MatVec, SolveInfo, _check_like, _check_maxiter,
                                             _check_tol, _rayleigh, _require_fixed_iterations,
                                             _use_unrolled, finish)
from bissl_jax.implicit.solvers.spec import SolverSpec
from bissl_jax.implicit.tree_math import tree_add, tree_sub, tree_vdot
from bissl_jax.types import PyTree


def neumann(matvec: MatVec, b: PyTree, *, init: Optional[PyTree] = None,
            maxiter: int = 5, tol: float = 0.0, unroll: Optional[bool] = None
            ) -> Tuple[PyTree, SolveInfo]:
  """Truncated Neumann series ``x = Σ_{k=0}^{K} (I − A)^k b`` with ``K = maxiter``.

  Computed as ``K`` Richardson steps ``x ← x + (b − A x)`` from ``x_0 = b`` (one
  product each). A non-None ``init`` replaces ``x_0`` (warm start); ``init = b``
  is the plain series. The series converges iff the spectral radius of ``I − A``
  is below 1; for ``A = I + H/(λ+δ)`` that is ``‖H‖₂ / (λ+δ) < 1``. With a large
  curvature and a small ``λ + δ`` it diverges: check ``info.residual``.

  Args:
    matvec: ``v ↦ A v``.
    b: right-hand side pytree.
    init: optional first iterate shaped like ``b`` (default ``b``).
    maxiter: K, the number of series terms after the first (= products).
    tol: must be 0 (there is no tolerance mode).
    unroll: force the unrolled (True) or ``fori_loop`` (False) driver; None picks
      unrolled iff the default backend is CPU.

  Returns:
    ``(x, SolveInfo)``.
  """
  maxiter, tol = _check_maxiter(maxiter), _check_tol(tol)
  _require_fixed_iterations("neumann", tol)
  x = b if init is None else _check_like("init", init, b)

  def step(carry):
    x, min_curvature = carry
    ax = matvec(x)
    curvature = _rayleigh(tree_vdot(x, ax), tree_vdot(x, x))
    return tree_add(x, tree_sub(b, ax)), jnp.minimum(min_curvature, curvature)

  carry = (x, jnp.asarray(jnp.inf, jnp.float32))
  carry = loops.fori(lambda _, c: step(c), carry, maxiter, unroll=_use_unrolled(unroll))
  x, min_curvature = carry
  return x, finish(matvec, b, x, x, maxiter, min_curvature)


SPEC = SolverSpec(
    name="neumann", solve=neumann, warm_start=True,
    summary="Truncated Neumann series; converges only when ‖H‖/(λ+δ) < 1.")
