"""BYOL (Grill et al. 2020): an online network regresses an EMA target's projections
(BiSSL paper §4.1; the target is re-copied from the online network when BiSSL starts)."""
import dataclasses
from typing import ClassVar, Optional, Tuple

import jax
import jax.numpy as jnp

from bissl_jax.models.resnet import BisslModel
from bissl_jax.tasks.pretext.views import (at_least_f32, l2_normalize, mean_cosine,
                                           split_views, two_view_apply, two_views,
                                           TAIL_KEY, embed_views, with_tail)
from bissl_jax.types import PyTree


def byol_regression_loss(p: jax.Array, z: jax.Array) -> jax.Array:
  """Mean over the batch of ``2 − 2·cos(p, stop_gradient(z))``."""
  p = l2_normalize(at_least_f32(p))
  z = l2_normalize(at_least_f32(jax.lax.stop_gradient(z)))
  return jnp.mean(2.0 - 2.0 * jnp.sum(p * z, axis=-1))


def ema_update(target: PyTree, online: PyTree, decay) -> PyTree:
  """``decay·target + (1 − decay)·online`` leaf by leaf (pure)."""
  return jax.tree_util.tree_map(
      lambda t, o: (decay * t + (1.0 - decay) * o).astype(t.dtype), target, online)


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
    # The target copies the online network up to the projector, including the backbone
    # stages a moved boundary puts in the pretext head.
    keys = ("projector", TAIL_KEY) if TAIL_KEY in params["pretext_head"] else ("projector",)
    return {"params": {"backbone": params["backbone"],
                       **{k: params["pretext_head"][k] for k in keys}},
            "batch_stats": {"backbone": batch_stats["backbone"],
                            **{k: batch_stats["pretext_head"][k] for k in keys}}}

  def _target_projections(self, target, views):
    # Training mode like the reference (target BN on batch statistics, grouped as the
    # online network's); its updated running statistics are dropped, see update_target.
    target = jax.lax.stop_gradient(target)
    tp, ts = target["params"], target["batch_stats"]
    model, g = self.model, self.bn_grouping
    h, _, _ = embed_views(model, tp["backbone"], ts["backbone"], tp, ts, views, g)
    z, _ = two_view_apply(lambda p, st, x: model.project(p, st, x, train=True),
                          tp["projector"], ts["projector"], h, g)
    return jax.lax.stop_gradient(z)

  def _predictions(self, params, batch_stats, views):
    """Online predictor outputs ``(2B, D)`` of both views and the updated statistics."""
    model, g = self.model, self.bn_grouping
    head, head_stats = params["pretext_head"], batch_stats["pretext_head"]
    h, bb_stats, tail_stats = embed_views(model, params["backbone"], batch_stats["backbone"],
                                          head, head_stats, views, g)
    z, proj_stats = two_view_apply(lambda p, st, x: model.project(p, st, x, train=True),
                                   head["projector"], head_stats["projector"], h, g)
    p, pred_stats = two_view_apply(lambda q, st, x: model.predict(q, st, x, train=True),
                                   head["predictor"], head_stats["predictor"], z, g)
    return p, {"backbone": bb_stats, "pretext_head": with_tail(
        {"projector": proj_stats, "predictor": pred_stats}, tail_stats)}

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
    p1, p2 = split_views(p)
    zt1, zt2 = split_views(self._target_projections(target, views))
    loss = byol_regression_loss(p1, zt2) + byol_regression_loss(p2, zt1)
    cosine = 0.5 * (mean_cosine(p1, zt2) + mean_cosine(p2, zt1))
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
    return l2_normalize(at_least_f32(self._predictions(params, batch_stats, views)[0]))

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
    p1, p2 = split_views(outputs)
    zt = l2_normalize(at_least_f32(self._target_projections(target, views)))
    zt1, zt2 = split_views(zt)
    squared = lambda a, b: jnp.mean(jnp.sum(jnp.square(a - b), axis=-1))
    return squared(p1, zt2) + squared(p2, zt1)


# MAE (bissl_jax.tasks.pretext.mae) needs a ViT model with a decoder (bissl_jax.models.vit_bundle).
