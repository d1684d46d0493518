"""The generalised Gauss–Newton matrix as a Hessian operator (``hessian_mode='gauss_newton'``).

Write a loss as ``L(θ) = ℓ(f(θ))`` with f the network outputs and ℓ convex in
them. Its Hessian is ``Jᵀ ∇²ℓ J + Σ_k ∂ℓ/∂f_k · ∇²f_k`` (J = ∂f/∂θ); the
Gauss–Newton matrix keeps the first term only:

    G = Jᵀ ∇²ℓ(f(θ)) J,

positive semi-definite whenever ℓ is convex, so ``A = I + G/(λ+δ)`` is positive
definite and CG is valid on it, where BiSSL's ``I + H/(λ+δ)`` is often indefinite
(docs/solvers.md). For a least-squares loss with f linear in θ, G is the Hessian.

A product ``G v`` is one JVP through the network, one HVP of ℓ at the outputs
(cheap: ℓ acts on outputs only) and one VJP: about the cost of one HVP of L. The
operator is built once with ``jax.linearize`` of f (the forward pass happens
here; every product reuses its residuals) and returned as a
``jax.tree_util.Partial``, so, like the ``'linearize'`` Hessian map, a jitted
function can return it and others take it as an argument.

Pretext tasks expose the split through ``task.outputs(params, batch_stats,
inputs, target)`` and ``task.output_loss(outputs, inputs, target)`` (SimCLR: the
NT-Xent similarity logits; BYOL: the normalised predictions), see
:mod:`bissl_jax.pretext`.
"""
from typing import Any, Callable, Optional, Sequence

import jax

PyTree = Any
MatVec = Callable[[PyTree], PyTree]


def _gauss_newton_product(jvp_fn, vjp_fn, loss_hvp, tangent: PyTree) -> PyTree:
  (out,) = vjp_fn(loss_hvp(jvp_fn(tangent)))
  return out


def gauss_newton_operator(output_fn: Callable[[PyTree], PyTree],
                          output_loss: Callable[[PyTree], Any], params: PyTree) -> MatVec:
  """The linear map ``v ↦ Jᵀ ∇²ℓ(z) J v`` at ``z = output_fn(params)``.

  Args:
    output_fn: ``params ↦ z``, the network outputs (any pytree).
    output_loss: ``z ↦ ℓ(z)``, a scalar; convex in z for a PSD result.
    params: the point θ at which J and ``∇²ℓ(z)`` are taken.

  Returns:
    A ``jax.tree_util.Partial`` mapping a pytree shaped like ``params`` to ``G``
    times it (symmetric; PSD when ℓ is convex).
  """
  outputs, jvp_fn = jax.linearize(output_fn, params)
  vjp_fn = jax.linear_transpose(jvp_fn, params)
  _, loss_hvp = jax.linearize(jax.grad(output_loss), outputs)
  return jax.tree_util.Partial(_gauss_newton_product, jvp_fn, vjp_fn, loss_hvp)


def _check_task(task) -> None:
  missing = [name for name in ("outputs", "output_loss") if not hasattr(task, name)]
  if missing:
    raise ValueError(f"hessian_mode='gauss_newton' needs a pretext task with "
                     f"outputs(params, batch_stats, inputs, target) and "
                     f"output_loss(outputs, inputs, target); {type(task).__name__} lacks "
                     f"{missing}. Use hessian_mode='linearize', or add both methods.")


def gauss_newton_hessian(task, params: PyTree, batch_stats: PyTree, inputs,
                         target: Optional[PyTree] = None, *,
                         wrt: Optional[Sequence[str]] = ("backbone",)) -> MatVec:
  """The Gauss–Newton operator of a pretext task's loss L_P, for BiSSL's upper stage.

  The drop-in for ``implicit.hessian_operator(loss_fn, θ, mode=...)`` when
  ``hessian_mode == 'gauss_newton'``.

  Args:
    task: a pretext task with ``outputs`` and ``output_loss`` (SimCLR, BYOL).
    params: the lower parameters ``{'backbone': θ_P, 'pretext_head': φ_P}``.
    batch_stats: their statistics (BatchNorm runs in training mode on batch
      statistics; running statistics are not touched).
    inputs: the prepared pretext inputs (the augmented views of the HVP batch).
    target: the task's target network, if it has one (BYOL).
    wrt: ``('backbone',)`` (default): the operator acts on θ alone with φ_P fixed,
      as BiSSL's Hessian; None: on the whole ``params`` tree (``head_in_implicit``).

  Returns:
    ``v ↦ G v`` (a ``jax.tree_util.Partial``), ``v`` shaped like ``params['backbone']``
    (or like ``params`` with ``wrt=None``).
  """
  _check_task(task)
  output_loss = lambda z: task.output_loss(z, inputs, target)
  if wrt is None:
    return gauss_newton_operator(lambda p: task.outputs(p, batch_stats, inputs, target),
                                 output_loss, params)
  wrt = tuple(wrt)
  if wrt != ("backbone",):
    raise ValueError(f"gauss_newton_hessian: wrt must be ('backbone',) or None; got {wrt}.")
  fixed = {k: v for k, v in params.items() if k != "backbone"}

  def output_fn(theta):
    return task.outputs({**fixed, "backbone": theta}, batch_stats, inputs, target)
  return gauss_newton_operator(output_fn, output_loss, params["backbone"])
