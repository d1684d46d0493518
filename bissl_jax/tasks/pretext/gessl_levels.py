"""GeSSL's two levels as pure functions (GeSSL paper §3.2, Eq. 6 and 7).

Batches become B-way classification tasks (:func:`make_tasks`); the first level adapts
to each with K SGD steps of cross-entropy; the second level compares the adapted
model's predictions with a self-motivated target's (:func:`second_level_divergence`),
differentiated through the K inner steps (:func:`unrolled_second_level`), or with the
finite-difference approximation AID-FD. :mod:`bissl_jax.tasks.pretext.gessl` wraps a
base pretext task with them.
"""
from typing import Callable, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from bissl_jax.implicit import loops
from bissl_jax.implicit import tree_math
from bissl_jax.tasks import augment
from bissl_jax.types import PyTree

SECOND_LEVEL_LOSSES = ("kl", "cross_entropy", "mse", "wasserstein")


# ----------------------------------------------------------------------------- tasks

def multi_views(rng: jax.Array, images: jax.Array, *, num_views: int, size: int,
                normalize_output: bool = True) -> jax.Array:
  """``num_views`` augmented views of every image, stacked ``(A, N, size, size, 3)``.

  Views come in :func:`bissl_jax.tasks.augment.pretext_views` pairs (the asymmetric
  SimCLR/BYOL pair), so views 0 and 1 are a pair of exactly the kind the base task
  draws (from the first of the split keys); an odd ``num_views`` drops the second
  view of the last pair.
  """
  pairs = (num_views + 1) // 2
  views = []
  for key in jax.random.split(rng, pairs):
    views.extend(augment.pretext_views(key, images, size=size,
                                       normalize_output=normalize_output))
  return jnp.stack(views[:num_views])


def task_labels(classes: int, num_views: int) -> jax.Array:
  """Pseudo-labels of one task in :func:`make_tasks` order: view-major, ``tile(arange(B), A)``."""
  return jnp.tile(jnp.arange(classes, dtype=jnp.int32), num_views)


def make_tasks(views: jax.Array, n_tasks: int) -> Tuple[jax.Array, jax.Array]:
  """Splits ``(A, N, ...)`` views into ``n_tasks`` B-way tasks, B = N / n_tasks.

  Task l holds images ``l·B … (l+1)·B − 1`` (contiguous: the loader already
  shuffles); within a task, image i is class i and its A views are its samples.

  Returns:
    ``(x, y)``: ``x`` of shape ``(n_tasks, A·B, ...)``, ``y`` int32 ``(n_tasks, A·B)``.
  """
  num_views, batch = views.shape[:2]
  if batch % n_tasks:
    raise ValueError(f"A batch of {batch} images cannot be split into n_tasks={n_tasks} "
                     "equal tasks; make the batch size a multiple of n_tasks.")
  classes = batch // n_tasks
  x = views.reshape((num_views, n_tasks, classes) + views.shape[2:])
  x = jnp.swapaxes(x, 0, 1).reshape((n_tasks, num_views * classes) + views.shape[2:])
  y = jnp.broadcast_to(task_labels(classes, num_views), (n_tasks, num_views * classes))
  return x, y


# ----------------------------------------------------------------------------- divergences

def _per_sample(name: str, target_logits: jax.Array, logits: jax.Array) -> jax.Array:
  log_q = jax.nn.log_softmax(logits, axis=-1)
  log_p = jax.nn.log_softmax(target_logits, axis=-1)
  p = jnp.exp(log_p)
  if name == "kl":
    return jnp.sum(p * (log_p - log_q), axis=-1)
  if name == "cross_entropy":
    return -jnp.sum(p * log_q, axis=-1)
  if name == "mse":
    return jnp.mean(jnp.square(p - jnp.exp(log_q)), axis=-1)
  if name == "wasserstein":
    # W1 between categorical distributions on the class indices 0..C−1 with unit
    # spacing: the L1 distance of the two CDFs.
    cdf = lambda a: jnp.cumsum(a, axis=-1)
    return jnp.sum(jnp.abs(cdf(p) - cdf(jnp.exp(log_q))), axis=-1)
  raise ValueError(f"Unknown second_level_loss {name!r}; valid choices: {SECOND_LEVEL_LOSSES}.")


def second_level_divergence(name: str, target_logits: jax.Array, logits: jax.Array
                            ) -> jax.Array:
  """Mean over samples of ``D(softmax(target_logits) ‖ softmax(logits))``.

  Args:
    name: 'kl' (the paper's), 'cross_entropy' (soft, against the target's
      probabilities: KL plus the target's entropy, so the same gradient when the
      target is under stop-gradient), 'mse' (of the probabilities, mean over
      classes) or 'wasserstein' (1-D W1 over the class index, see docs/gessl.md).
    target_logits, logits: ``(..., samples, classes)``.

  Returns:
    Shape ``(...)``.
  """
  return jnp.mean(_per_sample(name, target_logits, logits), axis=-1)


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Mean cross-entropy of integer labels (the first-level loss ℓ of Eq. 6)."""
  return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, labels))


# ----------------------------------------------------------------------------- the bilevel core

def _apply_step(params: PyTree, grads: PyTree, mask: PyTree, lr) -> PyTree:
  return jax.tree_util.tree_map(lambda p, g, m: p - lr * g if m else p, params, grads, mask)


def _sgd_step(inner_loss: Callable, params: PyTree, mask: PyTree, lr, stop: bool) -> PyTree:
  grads = jax.grad(inner_loss)(params)
  if stop:  # first order: drops the inner Hessian from d θ^K / d θ
    grads = jax.lax.stop_gradient(grads)
  return _apply_step(params, grads, mask, lr)


def _zero_cotangent(x):
  x = jnp.asarray(x) if not isinstance(x, jax.Array) else x
  if jnp.issubdtype(x.dtype, jnp.inexact):
    return jnp.zeros_like(x)
  return np.zeros(x.shape, dtype=jax.dtypes.float0)


def _fd_sgd_step(inner_loss: Callable, params: PyTree, mask: PyTree, lr, radius: float
                 ) -> PyTree:
  """The SGD step of :func:`_sgd_step` whose reverse pass takes the Hessian-vector
  product by a central finite difference of gradients (AID-FD, paper G.4).

  The step is p ↦ p − α m⊙∇ℓ(p); its VJP is v ↦ v − α H (m⊙v), and H u is taken as
  (∇ℓ(p + εu) − ∇ℓ(p − εu)) / 2ε with ε = radius / ‖u‖ (the DARTS rule). Values the
  loss closes over (data, statistics) get no gradient through this step.
  """
  # The loss with every value it closes over (including integer labels, which
  # jax.closure_convert would leave captured) as an explicit argument, so that the
  # custom VJP below is valid under vmap and jit.
  leaves, treedef = jax.tree_util.tree_flatten(params)
  closed = jax.make_jaxpr(lambda *xs: inner_loss(treedef.unflatten(xs)))(*leaves)
  loss_fn = lambda p, *c: jax.core.eval_jaxpr(closed.jaxpr, c,
                                              *jax.tree_util.tree_leaves(p))[0]
  consts = tuple(closed.consts)
  grad_fn = jax.grad(loss_fn)

  @jax.custom_vjp
  def step(p, consts):
    return _apply_step(p, grad_fn(p, *consts), mask, lr)

  def fwd(p, consts):
    return step(p, consts), (p, consts)

  def bwd(res, v):
    p, consts = res
    u = jax.tree_util.tree_map(lambda x, m: x if m else jnp.zeros_like(x), v, mask)
    norm = tree_math.tree_norm(u)
    eps = jnp.where(norm > 0, radius / jnp.where(norm > 0, norm, 1.0), 0.0)
    plus = grad_fn(tree_math.tree_axpy(eps, u, p), *consts)
    minus = grad_fn(tree_math.tree_axpy(-eps, u, p), *consts)
    scale = jnp.where(eps > 0, 0.5 / jnp.where(eps > 0, eps, 1.0), 0.0)
    hu = tree_math.tree_scale(tree_math.tree_sub(plus, minus), scale)
    hu = jax.tree_util.tree_map(lambda h, m: h if m else jnp.zeros_like(h), hu, mask)
    return tree_math.tree_axpy(-lr, hu, v), tuple(_zero_cotangent(c) for c in consts)

  step.defvjp(fwd, bwd)
  return step(params, consts)


def unrolled_second_level(inner_loss: Callable[[PyTree], jax.Array],
                          divergence: Callable[[PyTree, PyTree], jax.Array],
                          params: PyTree, *, steps: int, extra_steps: int, inner_lr,
                          first_order: bool = False, mask: Optional[PyTree] = None,
                          unroll: Optional[bool] = None, target: Optional[PyTree] = None,
                          has_aux: bool = False, fd_radius: float = 0.0):
  """GeSSL's second-level objective for one task, as a differentiable function of θ.

  θᴷ = K SGD steps of ``inner_loss`` from θ (lr α); θ̃ = ``stop_gradient`` of
  ``extra_steps`` = λ−1 more steps from θᴷ; the value is ``divergence(θ̃, θᴷ)``.
  ``jax.grad`` of it differentiates through the K steps (ITD-RMAD, second order);
  with ``first_order`` the inner gradients are under stop-gradient, so
  ``dθᴷ/dθ = I`` and the gradient is ``∇D`` at θᴷ (first-order MAML).

  Args:
    inner_loss: ``params -> scalar``, the task's loss ℓ.
    divergence: ``(target_params, adapted_params) -> scalar``.
    params: θ, any pytree.
    steps: K ≥ 0.
    extra_steps: λ − 1 ≥ 0.
    inner_lr: α.
    first_order: drop the inner Hessian term.
    mask: a tree of Python bools like ``params``; False leaves are not adapted
      (they still carry gradient through their use in the loss). None: all adapted.
    unroll: passed to :func:`bissl_jax.implicit.loops.fori`.
    target: a given θ̃ (e.g. from an earlier call) instead of the λ−1 steps; it is
      what the gradient holds fixed, so finite differences of the value at a fixed
      ``target`` check the gradient.
    has_aux: ``divergence`` returns ``(value, aux)``.
    fd_radius: > 0 takes the reverse pass's Hessian-vector products by central
      finite differences of gradients of this radius (AID-FD, see
      :func:`_fd_sgd_step`) instead of exactly; 0: exact (ITD-RMAD). Ignored with
      ``first_order``.

  Returns:
    ``(value, (θᴷ, θ̃))``, or ``(value, (θᴷ, θ̃), aux)`` with ``has_aux``.
  """
  if mask is None:
    mask = jax.tree_util.tree_map(lambda _: True, params)
  if fd_radius and not first_order:
    body = lambda _, p: _fd_sgd_step(inner_loss, p, mask, inner_lr, float(fd_radius))
  else:
    body = lambda _, p: _sgd_step(inner_loss, p, mask, inner_lr, first_order)
  adapted = loops.fori(body, params, int(steps), unroll=unroll)
  if target is None:
    target = loops.fori(lambda _, p: _sgd_step(inner_loss, p, mask, inner_lr, True),
                        jax.lax.stop_gradient(adapted), int(extra_steps), unroll=unroll)
  target = jax.lax.stop_gradient(target)
  if has_aux:
    value, aux = divergence(target, adapted)
    return value, (adapted, target), aux
  return divergence(target, adapted), (adapted, target)


# ----------------------------------------------------------------------------- the task
