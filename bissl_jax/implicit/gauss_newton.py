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

This module knows nothing of tasks: BiSSL's pretext tasks expose the split through
``task.outputs`` and ``task.output_loss`` (SimCLR: the NT-Xent similarity logits;
BYOL: the normalised predictions), and :mod:`bissl_jax.core.hessian` builds their
operator with :func:`gauss_newton_operator`.
"""
from typing import Any, Callable

import jax

from bissl_jax.types import PyTree

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
