"""The residual guard: fall back to first order when a solve made things worse.

BiSSL's damped operator is often indefinite, and 5 iterations of (layer-wise) CG
then regularly return an ``x`` with ``‖A x − v‖/‖v‖ > 1``: further from solving
``A x = v`` than ``x = 0`` is, and than the first-order answer ``x = v`` often is
too (docs/solvers.md). The guard (``config.bissl.residual_guard``, off by default to stay
faithful to the paper) replaces such a solution with the right-hand side ``v``.
"""
from typing import Tuple

import jax
import jax.numpy as jnp

from bissl_jax.implicit.solvers.base import SolveInfo
from bissl_jax.types import PyTree


def guard_residual(x: PyTree, b: PyTree, info: SolveInfo, threshold: float = 1.0
                   ) -> Tuple[PyTree, jnp.ndarray]:
  """``(b, True)`` if the solve failed, else ``(x, False)``; jit- and vmap-safe.

  A solve fails when ``info.residual > threshold`` (relative residual, recomputed
  on the true operator), when the residual is NaN, or when ``info.nonfinite`` is
  set. ``info`` itself is left alone, so the metrics still show the failed solve;
  count the returned flag (e.g. ``metrics['residual_fallback']``).

  Args:
    x: the solver's solution.
    b: the right-hand side (the first-order answer ``v_IG = v``).
    info: the solve's diagnostics.
    threshold: the largest acceptable relative residual (1.0: no worse than 0).

  Returns:
    ``(x or b, used_fallback)`` with ``used_fallback`` a bool scalar array.
  """
  ok = (info.residual <= threshold) & jnp.logical_not(info.nonfinite)
  fallback = jnp.logical_not(ok)
  out = jax.tree_util.tree_map(lambda xi, bi: jnp.where(fallback, bi.astype(xi.dtype), xi),
                               x, b)
  return out, fallback
