"""Layer-wise conjugate gradient, the BiSSL paper's solver (``solver='layerwise_cg'``).

Every leaf carries its own step sizes; one global operator product per iteration.
Reproduced as the reference implementation ran it (BiSSL paper, Algorithm 1 and
Appendix B), including the 1e-12 added to each denominator.
"""
from typing import NamedTuple, Optional, Tuple

import jax
import jax.numpy as jnp

from bissl_jax.implicit import loops
from bissl_jax.implicit.solvers.base import (MatVec, SolveInfo, _check_maxiter, _check_tol,
                                             _rayleigh, _require_fixed_iterations,
                                             _use_unrolled, finish)
from bissl_jax.implicit.solvers.spec import SolverSpec
from bissl_jax.implicit.tree_math import (tree_leaf_vdots, tree_vdot, tree_where_finite,
                                          tree_zeros_like)
from bissl_jax.types import PyTree

# Added to every denominator of layerwise CG, as in the reference implementation.
LAYERWISE_EPS = 1e-12


class _LayerwiseState(NamedTuple):
  x: PyTree
  r: PyTree
  p: PyTree
  rs: PyTree                  # per-leaf r_l·r_l
  min_curvature: jnp.ndarray


def layerwise_cg(matvec: MatVec, b: PyTree, *, init: Optional[PyTree] = None,
                 maxiter: int = 5, tol: float = 0.0, unroll: Optional[bool] = None
                 ) -> Tuple[PyTree, SolveInfo]:
  """CG in which every leaf carries its own step sizes (BiSSL's default solver).

  One global product ``Ap = A(p)`` per iteration; then, for every leaf ``l``::

      α_l = r_l·r_l / (p_l·Ap_l + 1e-12);  x_l += α_l p_l;  r'_l = r_l − α_l Ap_l
      β_l = r'_l·r'_l / (r_l·r_l + 1e-12); p_l = r'_l + β_l p_l

  starting from ``x = 0``, ``r = p = b`` and running exactly ``maxiter`` iterations
  (maxiter=5 with damping 10 is the paper's setting). Non-finite entries of the
  result are replaced with 0 (``info.nonfinite`` still reports them). This is not
  a Krylov method for A as a whole and need not converge; it is reproduced as the
  reference implementation ran it.

  Args:
    matvec: ``v ↦ A v``.
    b: right-hand side pytree.
    init: must be None (layerwise CG always starts from zero).
    maxiter: number of iterations.
    tol: must be 0 (there is no tolerance mode).
    unroll: force the unrolled (True) or ``fori_loop`` (False) driver; None picks
      unrolled iff the default backend is CPU.

  Returns:
    ``(x, SolveInfo)``.
  """
  maxiter, tol = _check_maxiter(maxiter), _check_tol(tol)
  if init is not None:
    raise ValueError("layerwise_cg always starts from zero, as in the reference "
                     "implementation, and cannot be warm-started; pass init=None, "
                     "or use solver='cg' for warm starts.")
  _require_fixed_iterations("layerwise_cg", tol)
  leaf_map = jax.tree_util.tree_map

  def step(s: _LayerwiseState) -> _LayerwiseState:
    ap = matvec(s.p)
    pap = tree_leaf_vdots(s.p, ap)
    alpha = leaf_map(lambda rs, pa: rs / (pa + LAYERWISE_EPS), s.rs, pap)
    x = leaf_map(lambda a, p, x: (x + a * p).astype(x.dtype), alpha, s.p, s.x)
    r = leaf_map(lambda a, q, r: (r - a * q).astype(r.dtype), alpha, ap, s.r)
    rs = tree_leaf_vdots(r, r)
    beta = leaf_map(lambda new, old: new / (old + LAYERWISE_EPS), rs, s.rs)
    p = leaf_map(lambda bt, p, r: (r + bt * p).astype(r.dtype), beta, s.p, r)
    curvature = _rayleigh(sum(jax.tree_util.tree_leaves(pap)), tree_vdot(s.p, s.p))
    return _LayerwiseState(x=x, r=r, p=p, rs=rs,
                           min_curvature=jnp.minimum(s.min_curvature, curvature))

  state = _LayerwiseState(x=tree_zeros_like(b), r=b, p=b, rs=tree_leaf_vdots(b, b),
                          min_curvature=jnp.asarray(jnp.inf, jnp.float32))
  state = loops.fori(lambda _, s: step(s), state, maxiter, unroll=_use_unrolled(unroll))
  x = tree_where_finite(state.x)
  return x, finish(matvec, b, x, state.x, maxiter, state.min_curvature)


SPEC = SolverSpec(
    name="layerwise_cg", solve=layerwise_cg,
    summary="The paper's solver: CG with per-leaf step sizes, exactly maxiter iterations "
            "from zero (need not converge).")
