"""What every linear solver shares: ``SolveInfo``, argument checks, ``finish``.

Kept apart from :mod:`bissl_jax.implicit.solvers` (the registry) so that solver modules
such as :mod:`bissl_jax.implicit.solvers.minres` can use them without importing the registry,
which imports them: no import cycle.
"""
import functools
import math
import operator
from typing import Callable, NamedTuple, Optional, Tuple

import jax
import jax.numpy as jnp
from jax import lax

from bissl_jax.implicit import loops
from bissl_jax.implicit.tree_math import tree_all_finite, tree_norm, tree_sub
from bissl_jax.types import PyTree

MatVec = Callable[[PyTree], PyTree]
Preconditioner = Callable[[PyTree], PyTree]
"""``r ↦ M r`` with ``M`` symmetric positive definite and ≈ ``A⁻¹`` (solvers that
declare ``SolverSpec.preconditionable``)."""


UNKNOWN_ITERATIONS = -1  # a callable solver that returned a bare x did not report them


class SolveInfo(NamedTuple):
  """Diagnostics of one solve, all arrays (usable inside ``jit``/``vmap``).

  Attributes:
    iterations: int32, operator products spent on iterations (the extra product
      for ``init`` and the one for ``residual`` are not counted). ``cg`` stops
      early once ``‖r‖ ≤ tol·‖b‖`` (with ``tol = 0``: once ``r`` is exactly 0).
      ``-1`` (:data:`UNKNOWN_ITERATIONS`): a user's solver returned a bare ``x``
      and did not say.
    residual: float32, ``‖A x − b‖ / ‖b‖`` recomputed with the true operator on the
      returned ``x`` (one extra product; ``jit`` removes it when unused, which is
      why ``nonfinite`` does not read it). Plain ``‖A x − b‖`` when ``b = 0``.
    min_curvature: float32, the smallest Rayleigh quotient ``dᵀA d / dᵀd`` over the
      directions ``d`` the operator was applied to (CG search directions, Neumann
      iterates). It is scale-free and an upper bound on A's smallest eigenvalue, so
      a negative value proves ``A`` indefinite. ``+inf`` when no product was taken.
      ``minres`` reports the smallest Ritz value of its Lanczos tridiagonal instead
      (the minimum of the Rayleigh quotient over the whole Krylov space, so never
      above its Lanczos vectors' ``vᵀA v``; for a preconditioned solve, of ``M A``,
      same sign as ``A``'s), see :func:`bissl_jax.implicit.solvers.minres.minres`.
    nonfinite: bool, True if the solver's raw solution (before ``layerwise_cg``
      zeroes non-finite entries) or an operator product the solver took contains
      NaN/inf (seen through ``min_curvature``; for solvers that do not track it,
      through ``residual``).
  """
  iterations: jnp.ndarray
  residual: jnp.ndarray
  min_curvature: jnp.ndarray
  nonfinite: jnp.ndarray


def _check_maxiter(maxiter) -> int:
  try:
    value = operator.index(maxiter)   # ints and NumPy ints; not floats or tracers
  except Exception:
    value = None
  if value is None or value < 0 or isinstance(maxiter, bool):
    raise ValueError(f"maxiter must be a non-negative Python int (it fixes the "
                     f"loop length at trace time); got {maxiter!r}.")
  return value


def _check_tol(tol) -> float:
  try:
    tol = float(tol)
  except Exception as e:
    raise ValueError(f"tol must be a concrete Python number (it decides the loop "
                     f"structure at trace time); got {tol!r}.") from e
  if not (tol >= 0.0 and math.isfinite(tol)):
    raise ValueError(f"tol must be finite and >= 0; got {tol}.")
  return tol


def _require_fixed_iterations(name: str, tol: float) -> None:
  if tol != 0.0:
    raise ValueError(f"{name} runs exactly maxiter iterations and has no tolerance "
                     f"mode; got tol={tol}. Pass tol=0.0, or use solver='cg' for a "
                     f"tolerance-based solve.")


def _use_unrolled(unroll: Optional[bool], tol: float = 0.0) -> bool:
  if unroll is None:  # a tolerance needs the early-stopping while_loop
    return loops.default_unroll() and tol == 0.0
  return bool(unroll)


def _check_like(name: str, tree: PyTree, b: PyTree) -> PyTree:
  """Checks ``tree`` has ``b``'s structure and shapes; casts to b's dtypes."""
  tree_struct, b_struct = (jax.tree_util.tree_structure(tree),
                           jax.tree_util.tree_structure(b))
  if tree_struct != b_struct:
    raise ValueError(f"{name} must have the same pytree structure as b; got "
                     f"{tree_struct} vs {b_struct}.")
  for leaf, ref in zip(jax.tree_util.tree_leaves(tree), jax.tree_util.tree_leaves(b)):
    if jnp.shape(leaf) != jnp.shape(ref):
      raise ValueError(f"{name} leaf shapes must match b's; got {jnp.shape(leaf)} "
                       f"vs {jnp.shape(ref)}.")
  return jax.tree_util.tree_map(lambda t, r: jnp.asarray(t, r.dtype), tree, b)


def _rayleigh(dAd: jnp.ndarray, dd: jnp.ndarray) -> jnp.ndarray:
  safe_dd = jnp.where(dd > 0, dd, 1.0)
  return jnp.where(dd > 0, dAd / safe_dd, jnp.inf).astype(jnp.float32)


def relative_residual(matvec: MatVec, b: PyTree, x: PyTree) -> jnp.ndarray:
  """``‖A x − b‖ / ‖b‖`` (``‖A x − b‖`` when ``b = 0``) as float32: one product."""
  residual_norm = tree_norm(tree_sub(matvec(x), b))
  b_norm = tree_norm(b)
  return (residual_norm / jnp.where(b_norm > 0, b_norm, 1.0)).astype(jnp.float32)


def finish(matvec: MatVec, b: PyTree, x: PyTree, raw_x: PyTree,
            iterations, min_curvature, *, curvature_tracked: bool = True) -> SolveInfo:
  """Builds SolveInfo, recomputing the residual with the true operator.

  With ``curvature_tracked`` (the solver folded every product into
  ``min_curvature``, where a NaN propagates), ``nonfinite`` does not read the
  residual, so a caller that ignores ``residual`` (BiSSL's upper step between
  checks) pays no product for it under jit. Otherwise the residual decides.
  """
  residual = relative_residual(matvec, b, x)
  min_curvature = jnp.asarray(min_curvature, jnp.float32)
  products_ok = (~jnp.isnan(min_curvature)) if curvature_tracked else jnp.isfinite(residual)
  nonfinite = jnp.logical_not(tree_all_finite(raw_x) & products_ok)
  return SolveInfo(iterations=jnp.asarray(iterations, jnp.int32), residual=residual,
                   min_curvature=min_curvature, nonfinite=nonfinite)


def _select(pred, new: PyTree, old: PyTree) -> PyTree:
  return jax.tree_util.tree_map(lambda n, o: jnp.where(pred, n, o), new, old)


def with_preconditioner(iterate, preconditioner: Optional[Preconditioner]):
  """``iterate`` with its ``preconditioner`` bound (itself when None), after a check."""
  if preconditioner is None:
    return iterate
  if not callable(preconditioner):
    raise TypeError(f"preconditioner must be a callable r -> M r on pytrees shaped like b "
                    f"(or None); got {type(preconditioner).__name__}.")
  return functools.partial(iterate, preconditioner=preconditioner)


def symmetric_krylov(iterate, matvec, b: PyTree, *, init, maxiter, tol, unroll
                     ) -> Tuple[PyTree, SolveInfo]:
  """Runs a Krylov method for a symmetric operator the way ``jax.scipy`` wraps its CG.

  ``iterate(operator, rhs, init, maxiter, tol, unrolled) -> (x, (iterations,
  min_curvature))`` is the method itself (``cg``, ``minres``). It is wrapped in
  ``lax.custom_linear_solve(symmetric=True)``, so derivatives are implicit (another
  solve of the transposed system) and jit/vmap/grad behave as for JAX's own CG. A
  symmetric positive definite preconditioner bound into ``iterate`` serves the
  transposed solve as well (``A`` is symmetric).
  """
  maxiter, tol = _check_maxiter(maxiter), _check_tol(tol)
  unrolled = _use_unrolled(unroll, tol)
  if init is not None:
    init = _check_like("init", init, b)

  def solve_fn(operator, rhs):
    return iterate(operator, rhs, init, maxiter, tol, unrolled)

  x, (iterations, min_curvature) = lax.custom_linear_solve(
      matvec, b, solve_fn, symmetric=True, has_aux=True)
  iterations, min_curvature = lax.stop_gradient((iterations, min_curvature))
  return x, finish(matvec, b, x, x, iterations, min_curvature)
