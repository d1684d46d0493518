"""The first-order approximation ``v_IG = v`` (``solver='first_order'``)."""
from typing import Optional, Tuple

import jax.numpy as jnp

from bissl_jax.implicit.solvers.base import MatVec, SolveInfo, finish
from bissl_jax.implicit.solvers.spec import SolverSpec
from bissl_jax.types import PyTree


def first_order(matvec: MatVec, b: PyTree, *, init: Optional[PyTree] = None,
                maxiter: int = 5, tol: float = 0.0, unroll: Optional[bool] = None
                ) -> Tuple[PyTree, SolveInfo]:
  """First-order approximation ``x = b`` (``v_IG = v``, i.e. ``A ≈ I``).

  ``init``, ``maxiter``, ``tol`` and ``unroll`` are accepted for a uniform
  signature and ignored. ``info.residual`` still measures how far ``b`` is from
  solving ``A x = b`` (one product, removed by ``jit`` when unused).
  """
  del init, maxiter, tol, unroll
  return b, finish(matvec, b, b, b, 0, jnp.inf, curvature_tracked=False)


SPEC = SolverSpec(
    name="first_order", solve=first_order, operator_products=0,
    summary="A ≈ I: no solve, the outer gradient itself.")
