"""What a solver declares about itself: the one place its capabilities are written.

Config validation, the BiSSL state (which solver state to keep), the lower step (whether
to store gradients; also for a gradient-window preconditioner) and the upper step (whether to build a Hessian operator, whether a
residual costs a product) read these declarations; no module outside a solver's own and
the registry spells a solver's name.

Two kinds of solver:

* **operator solvers** (``needs='operator'``): ``solve(matvec, b, *, init, maxiter, tol,
  unroll) -> (x, SolveInfo)`` for ``A x = b`` given ``v ↦ A v`` (CG, MINRES, Neumann,
  ...); the upper stage builds the damped Hessian operator for them. Those that
  declare ``preconditionable`` also take ``preconditioner=``.
* **gradient-window solvers** (``needs='gradient_window'``): they solve against a
  curvature model built from the pretext gradients that the lower steps store (M-FAC).
  They provide ``window_init``, ``window_push`` and ``window_solve`` (below) and need no
  Hessian-vector product.
* **curvature-model solvers** (``needs='curvature_model'``): they build a curvature model
  from the pretext loss on the upper stage's batch once per stage (K-FAC) with
  ``curvature_factor`` and solve against it with ``curvature_solve``; no Hessian-vector
  product and no stored gradients.
"""
import dataclasses
from typing import Any, Callable, Optional

NEEDS = ("operator", "gradient_window", "curvature_model")


@dataclasses.dataclass(frozen=True)
class SolverSpec:
  """A solver and its declared capabilities.

  Attributes:
    name: the registry name (``config.bissl.solver``).
    solve: operator solvers: ``(matvec, b, *, init, maxiter, tol, unroll) -> (x, info)``.
      Gradient-window solvers: None.
    needs: ``'operator'`` or ``'gradient_window'``.
    warm_start: accepts ``init`` (the previous step's solution) as its start.
    tolerance: has a tolerance mode (``tol > 0`` stops early).
    indefinite_safe: valid for a symmetric indefinite operator (BiSSL's damped Hessian
      often is); CG-type solvers are not.
    preconditionable: ``solve`` takes ``preconditioner=M`` (a callable ``r ↦ M r`` on
      pytrees, ``M`` symmetric positive definite, ≈ ``A⁻¹``); ``None`` there must give
      the unpreconditioned numerics bit for bit.
    solves_head: can solve over ``[θ; φ_P]`` (``config.bissl.head_in_implicit``).
    residual_is_free: its ``SolveInfo.residual`` costs no operator product (a
      gradient-window solver measures it on its own model), so every step reports one.
    operator_products: products per solve, ``None`` = ``maxiter`` (documentation and
      cost benches).
    window_init: ``(params_like, settings) -> window``: the empty gradient window over
      the trainable θ (``settings``: the ``config.bissl`` values the solver reads).
    window_push: ``(window, grads) -> window``: one lower step's pretext gradient.
    window_solve: ``(window, v, lam, settings) -> (x, info)``; with ``window_factor``
      also ``factor=`` (that hook's result) and ``diagnostics=`` (False: no residual
      and no curvature, the policy checks the residual with ``window_matvec``).
    window_factor: optional ``(window, lam, settings) -> factor``: what every solve of
      one upper stage shares (the window and λ do not change within one), built once
      per stage by ``prepare_stage``.
    window_matvec: ``(window, lam, settings) -> (x ↦ A x)``, the model ``A`` the solve
      inverts; needed unless ``residual_is_free`` (then the solve always reports it).
    curvature_factor: ``(loss_fn, params, settings) -> factor``: a curvature-model
      solver's model of ``loss_fn`` (the pretext loss of the stage's batch as a function
      of the trainable θ) at ``params``; built once per stage.
    curvature_solve: ``(factor, v, lam, settings, diagnostics=True) -> (x, info)``, ``x``
      ≈ ``(I + F/lam)⁻¹ v`` for the model ``F`` (``lam``: λ + δ).
    curvature_matvec: ``(factor, lam, settings) -> (x ↦ (I + F/lam) x)``, for the
      residual check.
    summary: one line for docs and ``--help``.
  """
  name: str
  solve: Optional[Callable] = None
  needs: str = "operator"
  warm_start: bool = False
  tolerance: bool = False
  indefinite_safe: bool = False
  preconditionable: bool = False
  solves_head: bool = True
  residual_is_free: bool = False
  operator_products: Optional[int] = None
  window_init: Optional[Callable[..., Any]] = None
  window_push: Optional[Callable[..., Any]] = None
  window_solve: Optional[Callable[..., Any]] = None
  window_factor: Optional[Callable[..., Any]] = None
  window_matvec: Optional[Callable[..., Any]] = None
  curvature_factor: Optional[Callable[..., Any]] = None
  curvature_solve: Optional[Callable[..., Any]] = None
  curvature_matvec: Optional[Callable[..., Any]] = None
  summary: str = ""

  def __post_init__(self):
    if self.preconditionable and self.needs != "operator":
      raise ValueError(f"SolverSpec {self.name!r}: only an operator solver can take a "
                       "preconditioner.")
    if self.needs not in NEEDS:
      raise ValueError(f"SolverSpec {self.name!r}: needs={self.needs!r} is not one of {NEEDS}.")
    if self.needs == "operator" and not callable(self.solve):
      raise ValueError(f"SolverSpec {self.name!r}: an operator solver needs a callable `solve`.")
    hooks = (self.window_init, self.window_push, self.window_solve)
    if self.needs == "gradient_window" and not all(callable(h) for h in hooks):
      raise ValueError(f"SolverSpec {self.name!r}: a gradient-window solver needs "
                       "window_init, window_push and window_solve.")
    if self.needs == "gradient_window" and not (self.residual_is_free
                                                or callable(self.window_matvec)):
      raise ValueError(f"SolverSpec {self.name!r}: a gradient-window solver whose residual "
                       "is not free needs window_matvec (the policy's residual check).")
    model_hooks = (self.curvature_factor, self.curvature_solve, self.curvature_matvec)
    if self.needs == "curvature_model" and not all(callable(h) for h in model_hooks):
      raise ValueError(f"SolverSpec {self.name!r}: a curvature-model solver needs "
                       "curvature_factor, curvature_solve and curvature_matvec.")

  @property
  def is_curvature_model(self) -> bool:
    return self.needs == "curvature_model"

  @property
  def needs_operator(self) -> bool:
    return self.needs == "operator"

  @property
  def keeps_gradient_window(self) -> bool:
    return self.needs == "gradient_window"
