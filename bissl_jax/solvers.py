"""Matrix-free linear solvers for ``A x = b`` on pytrees (BiSSL paper §4.2.2 and Algorithm 2; docs/implicit_grad.md).

Every solver has the signature

    fn(matvec, b, *, init=None, maxiter=5, tol=0.0, unroll=None) -> (x, SolveInfo)

where ``matvec`` maps a pytree shaped like ``b`` to ``A`` applied to it, ``A`` is
symmetric (positive definite for ``cg``), and ``b``/``x`` are arbitrary pytrees.
``maxiter`` and ``tol`` must be concrete Python numbers: they decide the loop
structure at trace time. The diagnostics in ``SolveInfo`` are arrays, so every
solver works under ``jit`` and ``vmap``.

**The XLA:CPU loop cliff.** Convolution gradients inside ``while_loop``,
``fori_loop`` or ``scan`` bodies run about 40x slower on XLA:CPU than the same ops
in straight-line code. Each fixed-iteration solver therefore has two drivers for
one and the same step function: an unrolled Python ``for`` loop (traced into
straight-line code under ``jit``) and a ``lax`` loop. ``unroll=None`` picks the
unrolled driver iff ``jax.default_backend() == 'cpu'`` (and, for ``cg``, ``tol ==
0``); ``unroll=True``/``False`` forces one. The unrolled driver always spends
``maxiter`` operator products; when ``cg`` has converged its remaining steps are
masked out, so both drivers return the same answer.

**Gradients.** ``cg`` is wrapped in ``lax.custom_linear_solve`` exactly as
``jax.scipy.sparse.linalg.cg`` is: derivatives are implicit (another ``cg`` solve
of the transposed system, which reuses ``init``) and are accurate only when the
solves converge. ``layerwise_cg`` and ``neumann`` are fixed truncated maps and are
differentiated *through* their iterations, giving the exact derivative of what
they compute. ``first_order`` is the identity.

``minres`` (symmetric indefinite ``A``; residual never grows) and ``jax_cg`` (the
stock ``jax.scipy.sparse.linalg.cg`` with diagnostics added) live in
:mod:`bissl_jax.krylov` and are registered here too. The shared ``SolveInfo`` and
``finish`` live in :mod:`bissl_jax.solver_base` and are re-exported here.
"""
from typing import Any, Callable, NamedTuple, Optional, Tuple

import jax
import jax.numpy as jnp
from jax import lax

from bissl_jax import krylov
from bissl_jax import loops
from bissl_jax.solver_base import (SolveInfo, _check_like, _check_maxiter,  # noqa: F401
                                   _check_tol, _rayleigh, _require_fixed_iterations,
                                   _select, _use_unrolled, finish, symmetric_krylov)
from bissl_jax.tree_math import (tree_add, tree_axpy, tree_leaf_vdots, tree_sub,
                                 tree_vdot, tree_where_finite, tree_zeros_like)

PyTree = Any
MatVec = Callable[[PyTree], PyTree]

# Added to every denominator of layerwise CG, as in the reference implementation.
LAYERWISE_EPS = 1e-12


# ---------------------------------------------------------------------------
# Global conjugate gradient.

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


# ---------------------------------------------------------------------------
# Layerwise conjugate gradient (the paper's solver).

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


# ---------------------------------------------------------------------------
# Truncated Neumann series and the first-order approximation.

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


SOLVERS = {
    "cg": cg,
    "layerwise_cg": layerwise_cg,
    "neumann": neumann,
    "first_order": first_order,
    "minres": krylov.minres,
    "jax_cg": krylov.jax_cg,
}
"""Every operator-based solver by name (``config.bissl.solver``). M-FAC is not here:
it takes stored gradients instead of an operator, see :mod:`bissl_jax.mfac`."""

SOLVER_NAMES = tuple(sorted(SOLVERS)) + ("mfac",)
"""Every value ``config.bissl.solver`` accepts: the registry plus ``'mfac'``."""
