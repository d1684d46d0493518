"""MINRES for symmetric indefinite systems (``solver='minres'``).

It follows the registry signature of :mod:`bissl_jax.implicit.solvers`,
``fn(matvec, b, *, init=None, maxiter=5, tol=0.0, unroll=None) -> (x, SolveInfo)``.

**Why MINRES.** BiSSL's damped operator ``A = I + H/(λ+δ)`` is often indefinite
(docs/solvers.md: pretext Hessians have eigenvalues far below −(λ+δ)). CG assumes a
positive-definite ``A``; on an indefinite one its residual can grow without bound.
MINRES (Paige & Saunders, 1975) needs only a symmetric ``A``: iteration ``k``
returns the point of the Krylov space ``K_k(A, r_0)`` with the smallest residual
``‖A x − b‖``, so the residual never grows with ``k``. It costs one product per
iteration, like CG, and a few more vectors of memory. It takes an optional symmetric
positive definite preconditioner and reports the smallest Ritz value of its Lanczos
tridiagonal as ``SolveInfo.min_curvature`` (see :func:`minres`).
"""
from typing import NamedTuple, Optional, Tuple

import jax.numpy as jnp
from jax import lax

from bissl_jax.implicit import loops
from bissl_jax.implicit.solvers.base import (MatVec, Preconditioner, SolveInfo, _select,
                                             symmetric_krylov, with_preconditioner)
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
  z: Optional[PyTree]         # M r2; None without a preconditioner (then it is r2)
  w: PyTree                   # the two latest search directions
  w2: PyTree
  beta: jnp.ndarray           # ‖r2‖ (‖r2‖_M = sqrt(r2ᵀ M r2) when preconditioned)
  old_beta: jnp.ndarray
  dbar: jnp.ndarray           # Givens-rotation bookkeeping (Paige–Saunders names)
  epsilon: jnp.ndarray
  phibar: jnp.ndarray         # ‖b − A x‖ (‖·‖_M when preconditioned; exact in exact arithmetic)
  cs: jnp.ndarray
  sn: jnp.ndarray
  k: jnp.ndarray
  alphas: jnp.ndarray         # (maxiter,) the Lanczos tridiagonal: its diagonal ...
  betas: jnp.ndarray          # ... and beta_{k+1} of each step (its off-diagonal)


def smallest_ritz_value(alphas: jnp.ndarray, betas: jnp.ndarray, k) -> jnp.ndarray:
  """The smallest eigenvalue of the Lanczos tridiagonal ``T_k`` of the first ``k`` steps.

  ``T_k`` has diagonal ``alphas[:k]`` and off-diagonal ``betas[:k-1]``; the arrays have
  the static length ``maxiter`` and entries past ``k`` are masked: the padded block is
  decoupled and carries ``alphas[0]`` on its diagonal, which is at least
  ``λ_min(T_k)`` (a diagonal entry bounds the smallest eigenvalue from above), so the
  ``maxiter × maxiter`` ``eigvalsh`` returns ``λ_min(T_k)`` exactly. ``+inf`` for
  ``k = 0`` (no product taken); NaN if a recorded entry is not finite (then a product
  was not finite, which ``SolveInfo.nonfinite`` reports).
  """
  n = alphas.shape[0]
  if n == 0:
    return jnp.asarray(jnp.inf, jnp.float32)
  index = jnp.arange(n)
  inside = index < k
  finite = (jnp.all(jnp.isfinite(jnp.where(inside, alphas, 0.0)))
            & jnp.all(jnp.isfinite(jnp.where(inside, betas, 0.0))))
  clean_alphas = jnp.where(jnp.isfinite(alphas), alphas, 0.0)  # eigvalsh never sees NaN
  diagonal = jnp.where(inside, clean_alphas, clean_alphas[0])
  off = jnp.where((index[:-1] + 1 < k) & jnp.isfinite(betas[:-1]), betas[:-1], 0.0)
  tridiagonal = jnp.diag(diagonal) + jnp.diag(off, 1) + jnp.diag(off, -1)
  smallest = jnp.linalg.eigvalsh(tridiagonal)[0]
  smallest = jnp.where(k > 0, smallest, jnp.inf)
  return jnp.where(finite, smallest, jnp.nan).astype(jnp.float32)


def _minres_iterations(matvec: MatVec, b: PyTree, init: Optional[PyTree], maxiter: int,
                       tol: float, unrolled: bool,
                       preconditioner: Optional[Preconditioner] = None) -> Tuple[PyTree, Tuple]:
  """(Preconditioned) MINRES; the recurrence of SciPy's ``minres``.

  ``preconditioner=None`` takes the ``M = I`` branch without applying anything: bit
  for bit the unpreconditioned recurrence.
  """
  if init is None:
    x, r = tree_zeros_like(b), b       # skip the product A·0
  else:
    x, r = init, tree_sub(b, matvec(init))
  if preconditioner is None:
    z, beta1 = None, tree_norm(r)
    b_norm = tree_norm(b)
  else:
    z = preconditioner(r)
    beta1 = jnp.sqrt(tree_vdot(r, z))
    b_norm = beta1 if init is None else jnp.sqrt(tree_vdot(b, preconditioner(b)))
  threshold = tol * b_norm
  scalar = lambda value: jnp.asarray(value, beta1.dtype)  # float64 leaves stay float64
  zeros = tree_zeros_like(b)
  state = _MinresState(
      x=x, r1=r, r2=r, z=z, w=zeros, w2=zeros, beta=beta1, old_beta=scalar(0.0),
      dbar=scalar(0.0), epsilon=scalar(0.0), phibar=beta1, cs=scalar(-1.0), sn=scalar(0.0),
      k=jnp.zeros((), jnp.int32), alphas=jnp.zeros((maxiter,), beta1.dtype),
      betas=jnp.zeros((maxiter,), beta1.dtype))

  def step(s: _MinresState) -> _MinresState:
    # Masked like cg: a converged state (phibar ≤ tol·‖b‖, or an exhausted Krylov
    # space, beta = 0) is left untouched, and no 0/0 is ever formed.
    # Written so that NaN counts as active: a NaN right-hand side propagates into x.
    active = jnp.logical_not(s.phibar <= threshold) & jnp.logical_not(s.beta <= 0)
    beta = jnp.where(active, s.beta, 1.0)
    v = tree_scale(s.r2 if preconditioner is None else s.z, 1.0 / beta)  # Lanczos vector
    av = matvec(v)
    old_beta = jnp.where(s.k > 0, s.old_beta, 1.0)
    y = tree_axpy(jnp.where(s.k > 0, -beta / old_beta, 0.0), s.r1, av)
    alpha = tree_vdot(v, y)
    y = tree_axpy(-alpha / beta, s.r2, y)
    if preconditioner is None:
      z, new_beta = None, tree_norm(y)
    else:
      z = preconditioner(y)
      new_beta = jnp.sqrt(tree_vdot(y, z))
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
        x=tree_axpy(phi, w, s.x), r1=s.r2, r2=y, z=z, w=w, w2=s.w, beta=new_beta,
        old_beta=beta, dbar=dbar, epsilon=epsilon, phibar=sn * s.phibar, cs=cs, sn=sn,
        k=s.k + 1, alphas=s.alphas.at[s.k].set(alpha.astype(s.alphas.dtype)),
        betas=s.betas.at[s.k].set(new_beta.astype(s.betas.dtype)))
    return _select(active, new, s)

  if unrolled:  # fixed length; converged steps are masked out inside `step`
    state = loops.fori(lambda _, s: step(s), state, maxiter, unroll=True)
  else:
    state = lax.while_loop(
        lambda s: (jnp.logical_not(s.phibar <= threshold) & jnp.logical_not(s.beta <= 0)
                   & (s.k < maxiter)), step, state)
  return state.x, (state.k, smallest_ritz_value(state.alphas, state.betas, state.k))


def minres(matvec: MatVec, b: PyTree, *, init: Optional[PyTree] = None, maxiter: int = 5,
           tol: float = 0.0, unroll: Optional[bool] = None,
           preconditioner: Optional[Preconditioner] = None) -> Tuple[PyTree, SolveInfo]:
  """MINRES on the whole pytree seen as one vector, for symmetric (indefinite) ``A``.

  Iterate ``k`` minimises ``‖A x − b‖`` over ``init + K_k(A, b − A·init)``, so the
  residual is non-increasing in ``k`` for any symmetric ``A`` (in exact arithmetic;
  in floating point up to rounding). Modes as :func:`bissl_jax.implicit.solvers.cg.cg`:
  fixed iterations (``tol=0``: exactly ``maxiter`` steps unless the residual or
  the Lanczos vector becomes exactly 0), tolerance (stop once the recurrence's
  residual estimate is ``≤ tol·‖b‖``) and a warm start from ``init`` (one extra
  product).

  **Preconditioned** (``preconditioner=M``, ``r ↦ M r`` with ``M`` symmetric positive
  definite, ≈ ``A⁻¹``): the preconditioned MINRES of Paige & Saunders (1975) as in
  SciPy and Greenbaum (1997, §8.2): Lanczos on ``M A`` in the ``M⁻¹`` inner product
  (equivalently on the symmetric ``M^{1/2} A M^{1/2}``), so ``A`` may stay indefinite.
  Iterate ``k`` minimises ``‖A x − b‖_M = sqrt((A x − b)ᵀ M (A x − b))`` (the
  ``P⁻¹``-norm for the preconditioner ``P = M⁻¹ ≈ A``) over ``init + K_k(M A, M r_0)``;
  the tolerance stop compares that ``M``-norm residual estimate with ``tol·‖b‖_M``. One
  application of ``M`` per iteration plus one at the start (two with ``init`` and
  ``tol > 0``). ``info.residual`` is, as for every solver, the Euclidean
  ``‖A x − b‖ / ‖b‖`` recomputed with the true operator.

  **Indefiniteness diagnostic.** ``info.min_curvature`` is the smallest Ritz value:
  the smallest eigenvalue of the ``k × k`` Lanczos tridiagonal ``T_k`` (the
  ``alpha``/``beta`` of the ``k`` steps taken; :func:`smallest_ritz_value`). Without a
  preconditioner it is the minimum of ``uᵀA u / uᵀu`` over the Krylov space, so it is
  at most every Lanczos vector's ``vᵀA v`` and an upper bound on ``λ_min(A)`` that
  reaches it once the Krylov space contains its eigenvector: negative proves ``A``
  indefinite, and after ``n`` steps on an ``n``-dimensional space it is ``λ_min(A)``.
  With a preconditioner these are the Ritz values of ``M A`` (the minimum of
  ``uᵀA u / uᵀM⁻¹u``): another scale, the same sign (``M^{1/2} A M^{1/2}`` has ``A``'s
  inertia), so negative still proves ``A`` indefinite.

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
    preconditioner: optional SPD ``r ↦ M r`` with ``M ≈ A⁻¹``; None = no preconditioning.

  Returns:
    ``(x, SolveInfo)``.
  """
  iterate = with_preconditioner(_minres_iterations, preconditioner)
  return symmetric_krylov(iterate, matvec, b, init=init, maxiter=maxiter, tol=tol,
                          unroll=unroll)


SPEC = SolverSpec(
    name="minres", solve=minres, warm_start=True, tolerance=True, indefinite_safe=True,
    preconditionable=True,
    summary="MINRES: symmetric (possibly indefinite) A; the residual never grows.")
