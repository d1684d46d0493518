"""bissl_jax: bilevel self-supervised learning (BiSSL) in JAX/Flax.

The standalone bilevel utility::

    from bissl_jax import implicit_grad, hvp

solves ``(I + H/(λ+δ))⁻¹ v`` for the Hessian H of any inner loss over any pytree.
The BiSSL training core is composed in :mod:`bissl_jax.core.alternation`, the pipeline
lives in :mod:`bissl_jax.pipeline`; ``docs/architecture.md`` has the module map.

Importing the package makes JAX compile its random-number hash on CPU as straight-line
code (:mod:`bissl_jax.runtime.cpu_random`): the same bits, faster to compile at full
optimisation and to run.
"""
from bissl_jax.implicit import damped_operator
from bissl_jax.implicit import hessian_operator
from bissl_jax.implicit import hvp
from bissl_jax.implicit import implicit_grad
from bissl_jax.implicit import implicit_solve
from bissl_jax.implicit import solve
from bissl_jax.implicit.solvers import SolveInfo
from bissl_jax.runtime import cpu_random as _cpu_random

_cpu_random.unroll_threefry_on_cpu()

__version__ = "0.1.0"

__all__ = ["implicit_grad", "implicit_solve", "hvp", "hessian_operator", "damped_operator",
           "solve", "SolveInfo"]
