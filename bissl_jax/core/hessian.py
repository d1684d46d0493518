"""The one builder of the pretext Hessian operator of BiSSL's upper stage.

``H`` is the Hessian of the pretext loss L_P over θ (or over ``[θ; φ_P]`` with
``head_in_implicit``), on the stage's fixed HVP inputs, with φ_P and the statistics
held fixed (BiSSL paper §3, Algorithm 2). Three modes (``config.bissl.hessian_mode``):

* ``'linearize'``: the exact Hessian, linearized once (``jax.linearize`` of the
  gradient) and reused by every product of the stage;
* ``'jvp'``: the exact Hessian, one forward-over-reverse product at a time (less memory);
* ``'gauss_newton'``: the generalised Gauss–Newton matrix ``Jᵀ∇²ℓJ`` of the task's
  split ``L_P = ℓ(f(θ))`` (positive semi-definite), for tasks that expose
  ``outputs(params, batch_stats, inputs, target)`` and ``output_loss(outputs, inputs,
  target)`` (SimCLR, BYOL).

The training path (:mod:`bissl_jax.core.upper`), the benches and the tests all build
the operator here, so the task check runs wherever a Gauss–Newton operator is made.
"""
from typing import Callable, Optional, Sequence

from bissl_jax import implicit
from bissl_jax.implicit import gauss_newton
from bissl_jax.types import PyTree

HESSIAN_MODES = implicit.HESSIAN_MODES + ("gauss_newton",)
GAUSS_NEWTON_METHODS = ("outputs", "output_loss")


def supports_gauss_newton(task) -> bool:
  """Whether a pretext task (or its class) exposes the split ``L_P = ℓ(f(θ))``."""
  return all(hasattr(task, name) for name in GAUSS_NEWTON_METHODS)


def check_hessian_mode(task, mode: str) -> None:
  """Raises ValueError when ``mode`` cannot be built for ``task``, naming the fields."""
  if mode not in HESSIAN_MODES:
    raise ValueError(f"Unknown hessian mode {mode!r}; choose one of {HESSIAN_MODES}.")
  if mode == "gauss_newton" and not supports_gauss_newton(task):
    name = task.__name__ if isinstance(task, type) else type(task).__name__
    missing = [m for m in GAUSS_NEWTON_METHODS if not hasattr(task, m)]
    raise ValueError(
        f"config.bissl.hessian_mode='gauss_newton' needs a pretext task with "
        f"outputs(params, batch_stats, inputs, target) and output_loss(outputs, inputs, "
        f"target); the pretext task {name} (config.pretext.task) lacks {missing}. Use "
        f"hessian_mode='linearize', or add both methods to the task.")


def pretext_hessian(task, mode: str, at: Callable[[PyTree], PyTree], theta: PyTree,
                    batch_stats: PyTree, inputs, target=None):
  """The undamped ``v ↦ H v`` of L_P at ``theta``.

  Args:
    task: the pretext task.
    mode: a :data:`HESSIAN_MODES` entry.
    at: ``theta ↦`` the task's full ``params`` (the fixed leaves merged back in).
    theta: the point at which H is taken (the solve space).
    batch_stats: the lower model's statistics (BatchNorm in training mode, running
      statistics untouched).
    inputs: the prepared HVP inputs.
    target: the task's target network (BYOL) or None.

  Returns:
    The linear map; in ``'linearize'`` and ``'gauss_newton'`` mode a
    ``jax.tree_util.Partial`` that can cross ``jit`` boundaries.
  """
  check_hessian_mode(task, mode)
  if mode == "gauss_newton":
    return gauss_newton.gauss_newton_operator(
        lambda t: task.outputs(at(t), batch_stats, inputs, target),
        lambda z: task.output_loss(z, inputs, target), theta)
  return implicit.hessian_operator(
      lambda t: task.loss(at(t), batch_stats, inputs, target)[0], theta, mode=mode)


def gauss_newton_hessian(task, params: PyTree, batch_stats: PyTree, inputs,
                         target: Optional[PyTree] = None, *,
                         wrt: Optional[Sequence[str]] = ("backbone",)):
  """The Gauss–Newton operator of a pretext task's L_P over θ (or the whole tree).

  Args:
    task: a pretext task with ``outputs`` and ``output_loss`` (SimCLR, BYOL).
    params: the lower parameters ``{'backbone': θ_P, 'pretext_head': φ_P}``.
    batch_stats: their statistics.
    inputs: the prepared pretext inputs (the augmented views of the HVP batch).
    target: the task's target network, if it has one (BYOL).
    wrt: ``('backbone',)`` (default): the operator acts on θ alone with φ_P fixed,
      as BiSSL's Hessian; None: on the whole ``params`` tree (``head_in_implicit``).

  Returns:
    ``v ↦ G v`` (a ``jax.tree_util.Partial``), ``v`` shaped like ``params['backbone']``
    (or like ``params`` with ``wrt=None``).
  """
  if wrt is None:
    return pretext_hessian(task, "gauss_newton", lambda p: p, params, batch_stats, inputs,
                           target)
  if tuple(wrt) != ("backbone",):
    raise ValueError(f"gauss_newton_hessian: wrt must be ('backbone',) or None; got {wrt}.")
  fixed = {k: v for k, v in params.items() if k != "backbone"}
  return pretext_hessian(task, "gauss_newton", lambda t: {**fixed, "backbone": t},
                         params["backbone"], batch_stats, inputs, target)
