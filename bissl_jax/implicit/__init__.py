"""Implicit gradients of proximally regularised lower problems, on any pytrees.

The standalone layer of bissl_jax: it imports nothing else of the library (only the
leaf ``bissl_jax.types``), so ``from bissl_jax import implicit_grad`` is usable without
models, tasks or the pipeline.

- ``api``: ``hvp``, ``hessian_operator``, ``damped_operator``, ``solve``,
  ``implicit_solve``, ``implicit_grad``;
- ``solvers/``: one module per linear solver and the registry;
- ``gauss_newton``: the Gauss–Newton operator; ``residual_guard``: the first-order
  fallback; ``loops``, ``tree_math``: the loop primitive and pytree algebra.
"""
from bissl_jax.implicit.api import HESSIAN_MODES
from bissl_jax.implicit.api import check_finite_rhs
from bissl_jax.implicit.api import check_preconditioner
from bissl_jax.implicit.api import damped_operator
from bissl_jax.implicit.api import hessian_operator
from bissl_jax.implicit.api import hvp
from bissl_jax.implicit.api import implicit_grad
from bissl_jax.implicit.api import implicit_solve
from bissl_jax.implicit.api import resolve_solver
from bissl_jax.implicit.api import solve

__all__ = ["HESSIAN_MODES", "check_finite_rhs", "check_preconditioner", "damped_operator",
           "hessian_operator", "hvp", "implicit_grad", "implicit_solve", "resolve_solver", "solve"]
