"""Pretext tasks L_P of BiSSL: SimCLR (NT-Xent) and BYOL (BiSSL paper §4.2.1).

Every task follows :class:`bissl_jax.protocols.PretextTask`: ``prepare(rng, images)``
turns a raw uint8 batch into the loss inputs (here, two augmented views) and
``loss(params, batch_stats, views, target=None) -> (loss, aux)`` takes
``params = {'backbone': θ, 'pretext_head': φ_P}`` (other keys ignored).

BatchNorm grouping (``bn_grouping``, :func:`two_view_apply`): ``'joint'`` sends both
views through the network as one batch of 2B, so BatchNorm takes one statistic over
both views; ``'per_view'`` sends each view on its own, as the reference PyTorch code
does (the paper-reproduction configs use it). The same grouping applies in the lower
steps and in the upper stage's Hessian. The loss is written for the global batch:
under jit with the batch sharded over a device mesh, XLA inserts the cross-device
reductions. It is built from smooth primitives only, so it can be differentiated
twice (BiSSL takes Hessian-vector products of it).
"""
import dataclasses
from typing import Any, ClassVar, Optional, Tuple

import jax
import jax.numpy as jnp

from bissl_jax import augment
from bissl_jax.mae import MAE
from bissl_jax.models import BisslModel

PyTree = Any

_NORM_EPS = 1e-12  # as torch.nn.functional.normalize


def l2_normalize(x: jax.Array, axis: int = -1) -> jax.Array:
  """``x / max(‖x‖, 1e-12)``; smooth away from 0 (rsqrt of a clamped square norm)."""
  sq = jnp.sum(jnp.square(x), axis=axis, keepdims=True)
  return x * jax.lax.rsqrt(jnp.maximum(sq, _NORM_EPS**2))


def _at_least_f32(x):
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def nt_xent(z1: jax.Array, z2: jax.Array, temperature: float = 0.5) -> jax.Array:
  """NT-Xent (SimCLR) over the whole batch.

  Args:
    z1, z2: ``(B, D)`` embeddings of the two views; row i of each is a positive pair.
    temperature: τ.

  Returns:
    Scalar: mean over all 2B anchors of the cross-entropy of picking the other view
    among the 2B−1 other embeddings, with cosine similarity / τ as logits.
  """
  batch = z1.shape[0]
  z = l2_normalize(_at_least_f32(jnp.concatenate([z1, z2], axis=0)))
  logits = (z @ z.T) / temperature
  # Self-similarity is excluded from the softmax; a finite fill keeps every
  # derivative finite (exp underflows to exactly 0).
  logits = jnp.where(jnp.eye(2 * batch, dtype=bool), -1e9, logits)
  positives = jnp.concatenate([jnp.arange(batch, 2 * batch), jnp.arange(batch)])
  pos_logits = jnp.take_along_axis(logits, positives[:, None], axis=1)[:, 0]
  return jnp.mean(jax.nn.logsumexp(logits, axis=1) - pos_logits)


def similarity_logits(z: jax.Array, temperature: float = 0.5) -> jax.Array:
  """``(2B, 2B)`` cosine similarities / τ of the joint embeddings (the NT-Xent logits).

  Self-similarities are kept here; :func:`nt_xent_of_logits` excludes them.
  """
  z = l2_normalize(_at_least_f32(z))
  return (z @ z.T) / temperature


def nt_xent_of_logits(logits: jax.Array) -> jax.Array:
  """NT-Xent from :func:`similarity_logits` of ``concat([z1, z2])``; equals :func:`nt_xent`.

  Convex in the logits (log-sum-exp minus a linear term), which is what makes the
  Gauss–Newton matrix of SimCLR split at the logits positive semi-definite.
  """
  batch = logits.shape[0] // 2
  logits = jnp.where(jnp.eye(2 * batch, dtype=bool), -1e9, logits)
  positives = jnp.concatenate([jnp.arange(batch, 2 * batch), jnp.arange(batch)])
  pos_logits = jnp.take_along_axis(logits, positives[:, None], axis=1)[:, 0]
  return jnp.mean(jax.nn.logsumexp(logits, axis=1) - pos_logits)


def byol_regression_loss(p: jax.Array, z: jax.Array) -> jax.Array:
  """Mean over the batch of ``2 − 2·cos(p, stop_gradient(z))``."""
  p = l2_normalize(_at_least_f32(p))
  z = l2_normalize(_at_least_f32(jax.lax.stop_gradient(z)))
  return jnp.mean(2.0 - 2.0 * jnp.sum(p * z, axis=-1))


def ema_update(target: PyTree, online: PyTree, decay) -> PyTree:
  """``decay·target + (1 − decay)·online`` leaf by leaf (pure)."""
  return jax.tree_util.tree_map(
      lambda t, o: (decay * t + (1.0 - decay) * o).astype(t.dtype), target, online)


def two_views(rng, images, image_size: Optional[int]):
  """SimCLR/BYOL's asymmetric pair of views, cropped to ``image_size`` (default: the input side)."""
  return augment.pretext_views(rng, images, size=image_size or images.shape[1])


def _split_views(x: jax.Array) -> Tuple[jax.Array, jax.Array]:
  half = x.shape[0] // 2
  return x[:half], x[half:]


def _joint_batch(views) -> jax.Array:
  v1, v2 = views
  if v1.shape != v2.shape:
    raise ValueError(f"The two views must have the same shape; got {v1.shape} and {v2.shape}.")
  return jnp.concatenate([v1, v2], axis=0)


BN_GROUPINGS = ("joint", "per_view")


def two_view_apply(apply, params, stats, views, grouping: str):
  """Runs a BatchNorm-carrying ``apply(params, stats, x) -> (y, stats)`` on two views.

  ``'joint'``: one batch of 2B (SimCLR's original TPU code): one set of batch
  statistics over both views and one running-statistics update. ``'per_view'``: the
  reference PyTorch code's order (each view through the network on its own): batch
  statistics per view, and the running statistics updated by view 1, then view 2.
  Under data parallelism the statistics of each group are over its global batch.

  Returns:
    ``(y of both views concatenated (2B, ...), new stats)``.
  """
  if grouping == "joint":
    return apply(params, stats, views if not isinstance(views, tuple) else _joint_batch(views))
  if grouping != "per_view":
    raise ValueError(f"Unknown BatchNorm grouping {grouping!r}; choose one of {BN_GROUPINGS} "
                     f"(config.pretext.bn_grouping).")
  v1, v2 = views if isinstance(views, tuple) else _split_views(views)
  y1, stats = apply(params, stats, v1)
  y2, stats = apply(params, stats, v2)
  return jnp.concatenate([y1, y2], axis=0), stats


def _mean_cosine(a, b):
  return jnp.mean(jnp.sum(l2_normalize(a) * l2_normalize(b), axis=-1))


@dataclasses.dataclass(frozen=True)
class SimCLR:
  """SimCLR: NT-Xent on the projector outputs of two views.

  Attributes:
    model: the network bundle.
    temperature: τ of NT-Xent (0.5 in BiSSL).
  """
  model: BisslModel
  temperature: float = 0.5
  image_size: Optional[int] = None
  bn_grouping: str = "joint"
  has_target: ClassVar[bool] = False

  def prepare(self, rng, images):
    """The two augmented views of a uint8 batch (see :func:`two_views`)."""
    return two_views(rng, images, self.image_size)

  def loss(self, params: PyTree, batch_stats: PyTree, views, target: Optional[PyTree] = None
           ) -> Tuple[jax.Array, dict]:
    """Training-mode SimCLR loss.

    Args:
      params: ``{'backbone', 'pretext_head': {'projector'}}``; extra keys are ignored.
      batch_stats: ``{'backbone', 'pretext_head': {'projector'}}``.
      views: ``(v1, v2)``, float NHWC, augmented and normalised.
      target: unused (SimCLR has no target network).

    Returns:
      ``(loss, {'batch_stats': updated stats, 'metrics': {'loss', 'positive_cosine'}})``.
    """
    del target
    z, new_stats = self._projections(params, batch_stats, views)
    z1, z2 = _split_views(z)
    loss = nt_xent(z1, z2, self.temperature)
    metrics = {"loss": loss, "positive_cosine": jax.lax.stop_gradient(_mean_cosine(z1, z2))}
    return loss, {"batch_stats": new_stats, "metrics": metrics}

  def outputs(self, params: PyTree, batch_stats: PyTree, views,
              target: Optional[PyTree] = None) -> jax.Array:
    """The network outputs at which the loss is convex: NT-Xent's similarity logits.

    Same forward as :meth:`loss` (training-mode BatchNorm; updated statistics are
    dropped), so ``output_loss(outputs(...)) == loss(...)[0]``. The split is at the
    ``(2B, 2B)`` logits ``cos(z_i, z_j)/τ`` rather than at the projector outputs z:
    NT-Xent is not convex in z (normalisation, bilinear similarity), so a
    Gauss–Newton matrix split at z could be indefinite; split here it is PSD.
    """
    del target
    return similarity_logits(self._projections(params, batch_stats, views)[0],
                             self.temperature)

  def _projections(self, params, batch_stats, views):
    """Projector outputs ``(2B, D)`` of both views and the updated statistics."""
    model, g = self.model, self.bn_grouping
    h, bb_stats = two_view_apply(lambda p, st, x: model.features(p, st, x, train=True),
                                 params["backbone"], batch_stats["backbone"], views, g)
    z, proj_stats = two_view_apply(lambda p, st, x: model.project(p, st, x, train=True),
                                   params["pretext_head"]["projector"],
                                   batch_stats["pretext_head"]["projector"], h, g)
    return z, {"backbone": bb_stats, "pretext_head": {"projector": proj_stats}}

  def output_loss(self, outputs: jax.Array, views=None,
                  target: Optional[PyTree] = None) -> jax.Array:
    """The loss as a function of :meth:`outputs` (NT-Xent of the logits)."""
    del views, target
    return nt_xent_of_logits(outputs)


@dataclasses.dataclass(frozen=True)
class BYOL:
  """BYOL: the online predictor regresses the EMA target's projection of the other view.

  The target network (backbone + projector) lives outside ``params`` as
  ``{'params': {'backbone', 'projector'}, 'batch_stats': {'backbone', 'projector'}}``.

  Attributes:
    model: the network bundle; must have a predictor.
    ema_decay: EMA decay of the target parameters (0.9995 in BiSSL).
  """
  model: BisslModel
  ema_decay: float = 0.9995
  image_size: Optional[int] = None
  bn_grouping: str = "joint"
  has_target: ClassVar[bool] = True

  def prepare(self, rng, images):
    """The two augmented views of a uint8 batch (see :func:`two_views`)."""
    return two_views(rng, images, self.image_size)

  def __post_init__(self):
    if self.model.predictor is None:
      raise ValueError("BYOL needs a predictor; build the model with "
                       "predictor='256-256-256' (model.predictor is None).")

  def init_target(self, params: PyTree, batch_stats: PyTree) -> PyTree:
    """Target network copied from the online backbone and projector (fresh buffers)."""
    copy = lambda tree: jax.tree_util.tree_map(jnp.array, tree)
    return copy(self._online_as_target(params, batch_stats))

  def update_target(self, target: PyTree, params: PyTree, batch_stats: PyTree) -> PyTree:
    """EMA of the target towards the online network, with ``ema_decay``.

    The running statistics follow the same EMA as the parameters. They are never
    read during training (the target forward uses batch statistics); they are kept
    so the target stays a complete network that can be run in evaluation mode.
    """
    online = self._online_as_target(params, batch_stats)
    return ema_update(target, online, self.ema_decay)

  @staticmethod
  def _online_as_target(params, batch_stats):
    return {"params": {"backbone": params["backbone"],
                       "projector": params["pretext_head"]["projector"]},
            "batch_stats": {"backbone": batch_stats["backbone"],
                            "projector": batch_stats["pretext_head"]["projector"]}}

  def _target_projections(self, target, views):
    # Training mode like the reference (target BN on batch statistics, grouped as the
    # online network's); its updated running statistics are dropped, see update_target.
    target = jax.lax.stop_gradient(target)
    tp, ts = target["params"], target["batch_stats"]
    model, g = self.model, self.bn_grouping
    h, _ = two_view_apply(lambda p, st, x: model.features(p, st, x, train=True),
                          tp["backbone"], ts["backbone"], views, g)
    z, _ = two_view_apply(lambda p, st, x: model.project(p, st, x, train=True),
                          tp["projector"], ts["projector"], h, g)
    return jax.lax.stop_gradient(z)

  def _predictions(self, params, batch_stats, views):
    """Online predictor outputs ``(2B, D)`` of both views and the updated statistics."""
    model, g = self.model, self.bn_grouping
    head, head_stats = params["pretext_head"], batch_stats["pretext_head"]
    h, bb_stats = two_view_apply(lambda p, st, x: model.features(p, st, x, train=True),
                                 params["backbone"], batch_stats["backbone"], views, g)
    z, proj_stats = two_view_apply(lambda p, st, x: model.project(p, st, x, train=True),
                                   head["projector"], head_stats["projector"], h, g)
    p, pred_stats = two_view_apply(lambda q, st, x: model.predict(q, st, x, train=True),
                                   head["predictor"], head_stats["predictor"], z, g)
    return p, {"backbone": bb_stats,
               "pretext_head": {"projector": proj_stats, "predictor": pred_stats}}

  def loss(self, params: PyTree, batch_stats: PyTree, views, target: Optional[PyTree] = None
           ) -> Tuple[jax.Array, dict]:
    """Symmetric BYOL loss ``ℓ(p1, z2ᵗ) + ℓ(p2, z1ᵗ)`` with ``ℓ = mean(2 − 2·cos)``.

    Args:
      params: ``{'backbone', 'pretext_head': {'projector', 'predictor'}}``; extra keys ignored.
      batch_stats: ``{'backbone', 'pretext_head': {'projector', 'predictor'}}``.
      views: ``(v1, v2)``, float NHWC, augmented and normalised.
      target: from :meth:`init_target`; required.

    Returns:
      ``(loss, {'batch_stats': updated online stats, 'metrics': {'loss', 'online_target_cosine'}})``.
    """
    if target is None:
      raise ValueError("BYOL.loss needs the target network; create it with "
                       "task.init_target(params, batch_stats).")
    p, new_stats = self._predictions(params, batch_stats, views)
    p1, p2 = _split_views(p)
    zt1, zt2 = _split_views(self._target_projections(target, views))
    loss = byol_regression_loss(p1, zt2) + byol_regression_loss(p2, zt1)
    cosine = 0.5 * (_mean_cosine(p1, zt2) + _mean_cosine(p2, zt1))
    metrics = {"loss": loss, "online_target_cosine": jax.lax.stop_gradient(cosine)}
    return loss, {"batch_stats": new_stats, "metrics": metrics}

  def outputs(self, params: PyTree, batch_stats: PyTree, views,
              target: Optional[PyTree] = None) -> jax.Array:
    """The network outputs at which the loss is convex: normalised predictions ``p/‖p‖``.

    ``(2B, D)``, both views; same online forward as :meth:`loss` (training-mode
    BatchNorm, updated statistics dropped). ``target`` is unused here (the target
    projections enter through :meth:`output_loss`).
    """
    del target
    return l2_normalize(_at_least_f32(self._predictions(params, batch_stats, views)[0]))

  def output_loss(self, outputs: jax.Array, views, target: Optional[PyTree] = None
                  ) -> jax.Array:
    """The loss of :meth:`outputs` p̂: ``mean‖p̂1 − ẑ2ᵗ‖² + mean‖p̂2 − ẑ1ᵗ‖²``.

    For unit vectors ``‖p̂ − ẑ‖² = 2 − 2·cos``, so this equals :meth:`loss` (to
    float rounding); unlike ``2 − 2 p̂·ẑ`` it is a convex quadratic in p̂ (Hessian
    2/B·I), which gives the usual Gauss–Newton matrix of a squared error.
    """
    if target is None:
      raise ValueError("BYOL.output_loss needs the target network; create it with "
                       "task.init_target(params, batch_stats).")
    p1, p2 = _split_views(outputs)
    zt = l2_normalize(_at_least_f32(self._target_projections(target, views)))
    zt1, zt2 = _split_views(zt)
    squared = lambda a, b: jnp.mean(jnp.sum(jnp.square(a - b), axis=-1))
    return squared(p1, zt2) + squared(p2, zt1)


# MAE (bissl_jax.mae) needs a ViT model with a decoder (bissl_jax.vit_model).
TASKS = {"simclr": SimCLR, "byol": BYOL, "mae": MAE}


def make_pretext_task(name: str, model: BisslModel, **kwargs):
  """Builds a pretext task by name.

  Args:
    name: ``'simclr'``, ``'byol'`` or ``'mae'`` (case-insensitive).
    model: the network bundle (a ViT with a decoder for ``'mae'``).
    **kwargs: task fields, e.g. ``temperature``, ``ema_decay`` or ``mask_ratio``.

  Returns:
    A :class:`SimCLR`, :class:`BYOL` or :class:`bissl_jax.mae.MAE`.
  """
  key = str(name).lower()
  if key not in TASKS:
    raise ValueError(f"Unknown pretext task {name!r}; valid choices: {sorted(TASKS)}.")
  return TASKS[key](model=model, **kwargs)
