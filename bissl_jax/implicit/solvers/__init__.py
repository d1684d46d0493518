"""Linear solvers for the implicit gradient, one module per solver, and their registry.

Every operator solver has the signature

    fn(matvec, b, *, init=None, maxiter=5, tol=0.0, unroll=None) -> (x, SolveInfo)

where ``matvec`` maps a pytree shaped like ``b`` to ``A`` applied to it, ``A`` is
symmetric (positive definite for ``cg``), and ``b``/``x`` are arbitrary pytrees.
``maxiter`` and ``tol`` must be concrete Python numbers: they decide the loop
structure at trace time. The diagnostics in ``SolveInfo`` are arrays, so every
solver works under ``jit`` and ``vmap``. Solvers that declare ``preconditionable``
(``cg``, ``minres``) also take ``preconditioner=M``, a callable ``r ↦ M r`` with ``M``
symmetric positive definite and ≈ ``A⁻¹``; None applies nothing.

Each solver module declares a :class:`~bissl_jax.implicit.solvers.spec.SolverSpec`
(``SPEC``): what it can do (warm start, tolerance, indefinite operators) and what it
needs (an operator, or a window of stored gradients). :data:`REGISTRY` collects them;
:func:`register` adds one from outside the library, after which ``config.bissl.solver``
accepts its name like any built-in.

**The XLA:CPU loop cliff.** Convolution gradients inside ``while_loop``,
``fori_loop`` or ``scan`` bodies run about 40x slower on XLA:CPU than the same ops
in straight-line code. Each fixed-iteration solver therefore has two drivers for
one and the same step function: an unrolled Python ``for`` loop (traced into
straight-line code under ``jit``) and a ``lax`` loop. ``unroll=None`` picks the
unrolled driver iff ``jax.default_backend() == 'cpu'`` (and, for ``cg``, ``tol ==
0``); ``unroll=True``/``False`` forces one. The unrolled driver always spends
``maxiter`` operator products; when ``cg`` has converged its remaining steps are
masked out, so both drivers return the same answer.

**Gradients.** ``cg`` and ``minres`` are wrapped in ``lax.custom_linear_solve`` exactly
as ``jax.scipy.sparse.linalg.cg`` is: derivatives are implicit (another solve of the
transposed system, which reuses ``init``) and are accurate only when the solves
converge. ``layerwise_cg`` and ``neumann`` are fixed truncated maps and are
differentiated *through* their iterations, giving the exact derivative of what they
compute. ``first_order`` is the identity.
"""
from typing import Callable, Dict

from bissl_jax.implicit.solvers import cg
from bissl_jax.implicit.solvers import ekfac
from bissl_jax.implicit.solvers import first_order
from bissl_jax.implicit.solvers import jax_cg
from bissl_jax.implicit.solvers import kfac
from bissl_jax.implicit.solvers import layerwise_cg
from bissl_jax.implicit.solvers import mfac
from bissl_jax.implicit.solvers import minres
from bissl_jax.implicit.solvers import neumann
from bissl_jax.implicit.solvers.base import SolveInfo, finish
from bissl_jax.implicit.solvers.spec import SolverSpec

__all__ = ["REGISTRY", "SOLVERS", "SolveInfo", "SolverSpec", "finish", "get", "names", "register"]

REGISTRY: Dict[str, SolverSpec] = {}
"""Every solver by name (``config.bissl.solver``), built-in or registered."""

SOLVERS: Dict[str, Callable] = {}
"""The operator solvers' functions by name (what ``implicit_grad(solver=name)`` calls)."""


def register(spec: SolverSpec) -> SolverSpec:
  """Adds a solver to :data:`REGISTRY` (and :data:`SOLVERS` if it takes an operator).

  Registering a name again replaces the solver (a notebook that re-runs its cell).
  Returns ``spec``, so a module can write ``SPEC = register(SolverSpec(...))``.
  """
  if not isinstance(spec, SolverSpec):
    raise TypeError(f"register() takes a SolverSpec, got {type(spec).__name__}.")
  REGISTRY[spec.name] = spec
  if spec.needs_operator:
    SOLVERS[spec.name] = spec.solve
  else:
    SOLVERS.pop(spec.name, None)
  return spec


def get(name: str) -> SolverSpec:
  """The solver registered as ``name``; a ValueError naming the choices otherwise."""
  if name not in REGISTRY:
    raise ValueError(f"Unknown solver {name!r}; choose one of {sorted(REGISTRY)}, or "
                     "register your own with bissl_jax.implicit.solvers.register(SolverSpec(...)).")
  return REGISTRY[name]


def names() -> tuple:
  """Every registered name, sorted (what ``config.bissl.solver`` accepts)."""
  return tuple(sorted(REGISTRY))


for _module in (cg, layerwise_cg, neumann, first_order, minres, jax_cg, mfac, kfac, ekfac):
  register(_module.SPEC)
del _module
