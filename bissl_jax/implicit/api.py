"""Implicit gradients of proximally regularised lower problems (BiSSL paper §3.3, Appendix A.1; solvers §4.2.2).

For a lower problem ``θ*(ξ) = argmin_θ L(θ) + (λ/2)·‖θ − ξ‖²`` the stationarity
condition ``∇L(θ*) + λ(θ* − ξ) = 0`` gives ``dθ*/dξ = (I + H/λ)⁻¹`` with ``H =
∇²L(θ*)``; this matrix is symmetric, so the vector-Jacobian product of ``θ*`` with
an outer gradient ``v = ∂F/∂θ*`` is ``A⁻¹ v``, ``A = I + H/λ``. BiSSL adds a
damping ``δ`` for stability: ``A = I + H/(λ + δ)`` (paper: δ = 10, 5 iterations
of layerwise CG). ``implicit_grad`` computes that product for any pytrees and any
user-supplied lower loss; it needs no BiSSL-specific types.

Hessian-vector products are forward-over-reverse (``jax.jvp`` of ``jax.grad``),
never grad-of-grad (which cost 9.6 gradients against 1.7 on CPU, docs/benchmarks.md).
"""
import inspect
from typing import Any, Callable, Optional, Tuple, Union

import jax
import numpy as np

from bissl_jax.implicit import preconditioners
from bissl_jax.implicit.solvers import REGISTRY, SOLVERS, SolveInfo, finish
from bissl_jax.implicit.solvers.base import UNKNOWN_ITERATIONS
from bissl_jax.implicit.tree_math import tree_axpy
from bissl_jax.types import PyTree

MatVec = Callable[[PyTree], PyTree]

HESSIAN_MODES = ("linearize", "jvp")


def hvp(loss_fn: Callable[[PyTree], Any], params: PyTree, tangent: PyTree) -> PyTree:
  """Hessian-vector product ``∇²loss_fn(params) · tangent``, forward-over-reverse.

  Args:
    loss_fn: scalar function of ``params``.
    params: point at which the Hessian is taken.
    tangent: pytree shaped like ``params``.

  Returns:
    ``H · tangent``, shaped like ``params``.
  """
  return jax.jvp(jax.grad(loss_fn), (params,), (tangent,))[1]


def hessian_operator(loss_fn: Callable[[PyTree], Any], params: PyTree, *,
                     mode: str = "linearize") -> MatVec:
  """The linear map ``v ↦ ∇²loss_fn(params) · v``.

  Args:
    loss_fn: scalar function of ``params`` (close over the data batch).
    params: point at which the Hessian is taken.
    mode: ``'linearize'`` runs ``jax.linearize(jax.grad(loss_fn), params)`` once
      (the forward and backward primal pass happen here) and every product then
      reuses its stored residuals: build it once, solve many systems against it.
      ``'jvp'`` recomputes ``hvp`` on every call: no stored residuals, so less
      memory, at the price of the primal work per product (inside one ``jit`` XLA
      shares much of it anyway, docs/benchmarks.md).

  Returns:
    A function mapping a pytree shaped like ``params`` to ``H`` times it.
  """
  if mode == "linearize":
    _, hessian_matvec = jax.linearize(jax.grad(loss_fn), params)
    return hessian_matvec
  if mode == "jvp":
    return lambda tangent: hvp(loss_fn, params, tangent)
  raise ValueError(f"Unknown hessian mode {mode!r}; choose one of {HESSIAN_MODES}.")


def _check_positive_when_concrete(lam, damping) -> None:
  total = lam + damping
  leaves = jax.tree_util.tree_leaves(total)
  if any(isinstance(leaf, jax.core.Tracer) for leaf in leaves):
    return  # traced (jit/vmap/grad over λ): cannot check at trace time
  if not np.all(np.asarray(total) > 0):
    raise ValueError(f"lam + damping must be > 0 so that A = I + H/(lam + damping) is "
                     f"defined; got lam={lam}, damping={damping}. Use a positive lam "
                     f"(the proximal weight) or a positive damping.")


def damped_operator(hessian_matvec: MatVec, *, lam, damping=0.0,
                    identity_mask: Optional[PyTree] = None) -> MatVec:
  """The operator ``A: v ↦ M v + H v / (lam + damping)``.

  Args:
    hessian_matvec: ``v ↦ H v``, e.g. from ``hessian_operator``.
    lam: proximal weight λ; a Python number or a (possibly traced) scalar array,
      so λ schedules and a learnable λ can flow through it.
    damping: δ, added to λ in the denominator (BiSSL: 10).
    identity_mask: which leaves carry the identity ``M``: None for all of them, or
      a tree of Python bools shaped like ``v``. The thesis's head-inclusive implicit
      gradient solves over ``[θ; φ_P]`` with ``M = blockdiag(I, 0)``: the proximal
      term covers θ only.

  Returns:
    ``v ↦ A v``.

  Raises:
    ValueError: if ``lam + damping <= 0`` and both are concrete.
  """
  _check_positive_when_concrete(lam, damping)
  inverse_scale = 1.0 / (lam + damping)
  if identity_mask is None:
    return lambda v: tree_axpy(inverse_scale, hessian_matvec(v), v)

  def matvec(v):
    hv = hessian_matvec(v)
    return jax.tree_util.tree_map(
        lambda h, x, keep: (inverse_scale * h + x).astype(x.dtype) if keep
        else (inverse_scale * h).astype(x.dtype), hv, v, identity_mask)
  return matvec


def resolve_solver(solver: Union[str, Callable]) -> Callable:
  """A solver function from a registry name or a callable.

  A callable must have the signature ``(matvec, b, *, init, maxiter, tol) ->
  (x, SolveInfo)`` (jaxopt's ``linear_solve`` convention); one that returns a
  bare ``x`` gets its ``SolveInfo`` computed here, and one that takes ``unroll``
  is passed the loop driver as well; one with a ``preconditioner`` parameter can be
  given a preconditioner (:func:`check_preconditioner`).
  """
  if callable(solver):
    return _wrap_user_solver(solver)
  if solver not in SOLVERS:
    raise ValueError(f"Unknown solver {solver!r}; choose one of {sorted(SOLVERS)} or "
                     f"pass a callable (matvec, b, *, init, maxiter, tol) -> (x, info).")
  return SOLVERS[solver]


def _wrap_user_solver(fn: Callable) -> Callable:
  try:
    takes_unroll = "unroll" in inspect.signature(fn).parameters
  except (TypeError, ValueError):
    takes_unroll = False

  def solver(matvec, b, *, init=None, maxiter=5, tol=0.0, unroll=None, preconditioner=None):
    kwargs = dict(init=init, maxiter=maxiter, tol=tol)
    if takes_unroll:
      kwargs["unroll"] = unroll
    if preconditioner is not None:  # check_preconditioner saw that fn takes one
      kwargs["preconditioner"] = preconditioner
    out = fn(matvec, b, **kwargs)
    if isinstance(out, tuple) and len(out) == 2 and isinstance(out[1], SolveInfo):
      return out
    # A bare x says nothing about its iterations: report them as unknown, not maxiter.
    return out, finish(matvec, b, out, out, UNKNOWN_ITERATIONS, float("inf"),
                       curvature_tracked=False)
  return solver


def _takes_preconditioner(solver: Union[str, Callable]) -> bool:
  if callable(solver):
    try:
      return "preconditioner" in inspect.signature(solver).parameters
    except (TypeError, ValueError):
      return False
  return solver in REGISTRY and REGISTRY[solver].preconditionable


def check_preconditioner(solver: Union[str, Callable], preconditioner) -> dict:
  """The solver keyword for ``preconditioner``: ``{}`` for None, else checked.

  Raises ValueError naming the solvers that take one when ``solver`` does not
  (``SolverSpec.preconditionable``; a callable solver takes one iff it has a
  ``preconditioner`` parameter), and TypeError when it is not callable.
  """
  if preconditioner is None:
    return {}
  if isinstance(preconditioner, str):
    raise ValueError(f"preconditioner={preconditioner!r}: a name needs its curvature "
                     f"model's inputs, which only implicit_grad has; here pass the callable "
                     f"bissl_jax.implicit.preconditioners.build({preconditioner!r}, mu=..., "
                     f"...) instead.")
  if not _takes_preconditioner(solver):
    able = sorted(name for name, spec in REGISTRY.items() if spec.preconditionable)
    shown = solver if isinstance(solver, str) else getattr(solver, "__name__", "callable")
    raise ValueError(f"solver {shown!r} cannot take a preconditioner; use one of {able} "
                     f"(or a callable solver with a `preconditioner` parameter), or pass "
                     f"preconditioner=None.")
  if not callable(preconditioner):
    raise TypeError(f"preconditioner must be a callable r -> M r on pytrees shaped like "
                    f"the right-hand side (or None); got {type(preconditioner).__name__}.")
  return {"preconditioner": preconditioner}


def solve(matvec: MatVec, b: PyTree, *, solver: Union[str, Callable] = "cg",
          maxiter: int = 5, tol: float = 0.0, init: Optional[PyTree] = None,
          unroll: Optional[bool] = None, preconditioner: Optional[MatVec] = None
          ) -> Tuple[PyTree, SolveInfo]:
  """Solves ``A x = b`` with a solver of ``solvers.SOLVERS`` or a callable.

  Args:
    matvec: ``v ↦ A v``.
    b: right-hand side pytree.
    solver: a registry name (``'cg'``, ``'layerwise_cg'``, ``'neumann'``,
      ``'first_order'``, ...) or a callable, see :func:`resolve_solver`.
    maxiter: iterations (operator products).
    tol: relative tolerance (``cg`` only; 0 = fixed iterations).
    init: warm start (``cg``, ``neumann``; ``layerwise_cg`` rejects it).
    unroll: loop driver; None = unrolled on CPU for fixed-iteration solves.
    preconditioner: ``r ↦ M r``, ``M`` symmetric positive definite and ≈ ``A⁻¹``,
      for solvers that declare ``preconditionable`` (``cg``, ``minres``); None = none.

  Returns:
    ``(x, SolveInfo)``.
  """
  solver_fn = resolve_solver(solver)
  extra = check_preconditioner(solver, preconditioner)
  check_finite_rhs(b)
  return solver_fn(matvec, b, init=init, maxiter=maxiter, tol=tol, unroll=unroll, **extra)


def check_finite_rhs(b: PyTree) -> None:
  """Raises ValueError if a concrete right-hand side holds NaN or inf.

  The one policy for a non-finite right-hand side: concrete input is rejected here
  with a message; under ``jit`` (traced input) every solver propagates the NaN into
  its solution and sets ``SolveInfo.nonfinite``, which BiSSL's non-finite check reads.
  """
  leaves = jax.tree_util.tree_leaves(b)
  if any(isinstance(leaf, jax.core.Tracer) for leaf in leaves):
    return
  bad = [jax.tree_util.keystr(path) for path, leaf in jax.tree_util.tree_flatten_with_path(b)[0]
         if not np.all(np.isfinite(np.asarray(leaf)))]
  if bad:
    raise ValueError(f"The right-hand side (outer gradient) has NaN or inf entries in "
                     f"{bad}; a solve cannot recover from that. Check the outer loss and "
                     f"its inputs.")


def implicit_solve(hessian_matvec: MatVec, outer_grad: PyTree, *, lam, damping=0.0,
                   solver: Union[str, Callable] = "cg", maxiter: int = 5,
                   tol: float = 0.0, init: Optional[PyTree] = None,
                   identity_mask: Optional[PyTree] = None,
                   unroll: Optional[bool] = None, preconditioner: Optional[MatVec] = None
                   ) -> Tuple[PyTree, SolveInfo]:
  """:func:`implicit_grad` against a prebuilt Hessian operator ``v ↦ H v``.

  Build the operator once (``hessian_operator``, or a Gauss-Newton one) and
  solve many right-hand sides against it, as BiSSL's upper stage does.

  Args:
    hessian_matvec: the undamped ``v ↦ H v``.
    outer_grad: the right-hand side ``v``.
    lam, damping, solver, maxiter, tol, init, unroll, preconditioner: as in
      :func:`implicit_grad`.
    identity_mask: see :func:`damped_operator`.

  Returns:
    ``(solution, SolveInfo)``.
  """
  solver_fn = resolve_solver(solver)  # fail before any tracing work
  extra = check_preconditioner(solver, preconditioner)
  check_finite_rhs(outer_grad)
  matvec = damped_operator(hessian_matvec, lam=lam, damping=damping,
                           identity_mask=identity_mask)
  return solver_fn(matvec, outer_grad, init=init, maxiter=maxiter, tol=tol, unroll=unroll,
                   **extra)


def _check_same_structure(outer_grad: PyTree, inner_params: PyTree) -> None:
  grad_struct = jax.tree_util.tree_structure(outer_grad)
  params_struct = jax.tree_util.tree_structure(inner_params)
  if grad_struct != params_struct:
    raise ValueError("outer_grad must have the same pytree structure as "
                     f"inner_params; got {grad_struct} vs {params_struct}.")
  for g, p in zip(jax.tree_util.tree_leaves(outer_grad),
                  jax.tree_util.tree_leaves(inner_params)):
    if np.shape(g) != np.shape(p):
      raise ValueError(f"outer_grad leaf shape {np.shape(g)} does not match the "
                       f"inner_params leaf shape {np.shape(p)}.")


def implicit_grad(inner_loss: Callable[[PyTree], Any], inner_params: PyTree,
                  outer_grad: PyTree, *, lam, damping=0.0,
                  solver: Union[str, Callable] = "cg", maxiter: int = 5, tol: float = 0.0,
                  init: Optional[PyTree] = None, hessian_mode: str = "linearize",
                  identity_mask: Optional[PyTree] = None, unroll: Optional[bool] = None,
                  preconditioner: Union[None, str, MatVec] = None,
                  preconditioner_gradients: Optional[PyTree] = None
                  ) -> Tuple[PyTree, SolveInfo]:
  """Approximates ``A⁻¹ outer_grad`` with ``A = I + H/(lam + damping)``.

  ``H = ∇²inner_loss(inner_params)``. For the proximal lower problem
  ``θ*(ξ) = argmin_θ inner_loss(θ) + (lam/2)·‖θ − ξ‖²`` evaluated at its solution
  and ``damping = 0``, the result is exactly the vector-Jacobian product
  ``(dθ*/dξ)ᵀ · outer_grad``: pass the *gradient* of the outer objective with
  respect to θ* and get its gradient with respect to ξ (same sign, no minus).
  In BiSSL, ``inner_loss`` is the pretext loss L_P(·, φ_P) on one batch (without
  the proximal term, which contributes the identity), ``outer_grad`` is
  ``∇_θ L_D(θ_P, φ_D)`` and the result is ``v_IG``; the paper's setting is
  ``solver='layerwise_cg', maxiter=5, damping=10``.

  Composes with ``jit``, ``vmap`` (e.g. over a batch of outer gradients) and
  ``grad`` (see ``solvers`` for how each solver is differentiated).

  Args:
    inner_loss: scalar lower loss of ``inner_params`` (close over the batch).
    inner_params: the lower solution θ* at which H is taken.
    outer_grad: pytree shaped like ``inner_params``.
    lam: proximal weight λ (> 0 together with damping; may be traced).
    damping: δ added to λ.
    solver: a key of ``solvers.SOLVERS`` or a callable (see :func:`resolve_solver`).
    maxiter: solver iterations (= Hessian-vector products).
    tol: relative tolerance (``cg`` only; 0 = fixed iterations).
    init: warm start, e.g. the previous step's solution (``cg``, ``neumann``).
    hessian_mode: ``'linearize'`` (one linearization, reused) or ``'jvp'``.
    identity_mask: leaves that carry the identity (see :func:`damped_operator`).
    unroll: loop driver; None = unrolled on CPU for fixed-iteration solves.
    preconditioner: ``r ↦ M r`` with ``M`` symmetric positive definite and ≈ ``A⁻¹``
      (e.g. M-FAC's ``(I + F/λ')⁻¹`` or a diagonal); only for solvers that declare
      ``preconditionable`` (``cg``, ``minres``): others raise ValueError. None = none,
      the unpreconditioned numerics bit for bit. Or a name
      (:mod:`~bissl_jax.implicit.preconditioners`): ``'kfac'``/``'ekfac'`` build
      K-FAC's (EK-FAC's) ``(I + F/(lam+damping))⁻¹`` from ``inner_loss`` at
      ``inner_params`` once; ``'mfac'`` M-FAC's per leaf from
      ``preconditioner_gradients``.
    preconditioner_gradients: for ``preconditioner='mfac'`` only: m gradients of
      ``inner_loss`` (e.g. the last m lower steps'), shaped like ``inner_params`` with
      a leading axis m.

  Returns:
    ``(solution, SolveInfo)``; ``solution`` is shaped like ``outer_grad``.
  """
  _check_same_structure(outer_grad, inner_params)
  _check_positive_when_concrete(lam, damping)
  if hessian_mode not in HESSIAN_MODES:  # fail before any tracing work
    raise ValueError(f"Unknown hessian mode {hessian_mode!r}; choose one of "
                     f"{HESSIAN_MODES}.")
  resolve_solver(solver)
  if preconditioner_gradients is not None and preconditioner != "mfac":
    raise ValueError("preconditioner_gradients is only read by preconditioner='mfac'; "
                     f"got preconditioner={preconditioner!r}: drop it or pass 'mfac'.")
  if isinstance(preconditioner, str):
    check_preconditioner(solver, lambda r: r)   # the solver must take one
    preconditioner = preconditioners.build(
        preconditioner, mu=lam + damping, inner_loss=inner_loss, inner_params=inner_params,
        gradients=preconditioner_gradients)
  check_preconditioner(solver, preconditioner)
  hessian_matvec = hessian_operator(inner_loss, inner_params, mode=hessian_mode)
  return implicit_solve(hessian_matvec, outer_grad, lam=lam, damping=damping,
                        solver=solver, maxiter=maxiter, tol=tol, init=init,
                        identity_mask=identity_mask, unroll=unroll,
                        preconditioner=preconditioner)
