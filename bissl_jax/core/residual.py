"""When the upper step checks its solve: the relative residual ``‖A x − b‖/‖b‖``.

The residual costs one more operator product, so it is computed on some steps only
(``config.bissl.residual_every``), on every step when the residual guard needs it,
and always when the solver reports it for free. M-FAC's is measured on its own model
``I + F/(λ+δ)`` (two passes over the stored gradients), on the same steps.
"""
import dataclasses

import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class ResidualPolicy:
  """Which upper steps compute the residual, and where.

  Attributes:
    every: check every ``every``-th upper step (``config.bissl.residual_every``), counted
      over the run so that a stage whose N_U is a multiple of it checks its last step;
      1: every step; 0: never.
    guard: ``config.bissl.residual_guard``: every step (the guard reads it).
    free: the solver reports it at no cost (``SolverSpec.residual_is_free``).
  """
  every: int
  guard: bool
  free: bool

  def due(self, step):
    """Whether upper step ``step`` (0-based, over the run) computes the residual.

    A Python int ``step`` (the per-step driver's count) gives a Python bool where the
    answer depends on it; a traced one an array.
    """
    if self.every_step:
      return jnp.ones((), bool)
    if self.every == 0:
      return jnp.zeros((), bool)
    return (step + 1) % self.every == 0

  @property
  def every_step(self) -> bool:
    """Whether every upper step checks (known without the step count)."""
    return self.guard or self.every == 1 or self.free

  @property
  def deferred(self) -> bool:
    """Whether the per-step driver computes residuals in a call of its own.

    True when only some steps check (``every`` > 1, no guard, not free). XLA:CPU runs
    the operator product several times slower inside a ``lax.cond`` branch than
    outside one (a checked step cost 6.5× an unchecked one, against 1.05× for the same
    product outside a branch; docs/benchmarks/compare_reference.md), so the step is compiled without
    the product (:func:`bissl_jax.core.upper.upper_step_deferred`) and the due steps
    are checked by :func:`bissl_jax.core.upper.deferred_residual`.
    """
    return not (self.guard or self.every <= 1 or self.free)
