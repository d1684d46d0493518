"""SimCLR (Chen et al. 2020): NT-Xent over two augmented views (BiSSL paper §4.1)."""
import dataclasses
from typing import ClassVar, Optional, Tuple

import jax
import jax.numpy as jnp

from bissl_jax.models.resnet import BisslModel
from bissl_jax.tasks.pretext.views import (at_least_f32, l2_normalize, mean_cosine,
                                           split_views, two_view_apply, two_views,
                                           embed_views, with_tail)
from bissl_jax.types import PyTree


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
  z = l2_normalize(at_least_f32(jnp.concatenate([z1, z2], axis=0)))
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
  z = l2_normalize(at_least_f32(z))
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
    z1, z2 = split_views(z)
    loss = nt_xent(z1, z2, self.temperature)
    metrics = {"loss": loss, "positive_cosine": jax.lax.stop_gradient(mean_cosine(z1, z2))}
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
    h, bb_stats, tail_stats = embed_views(model, params["backbone"], batch_stats["backbone"],
                                          params["pretext_head"], batch_stats["pretext_head"],
                                          views, g)
    z, proj_stats = two_view_apply(lambda p, st, x: model.project(p, st, x, train=True),
                                   params["pretext_head"]["projector"],
                                   batch_stats["pretext_head"]["projector"], h, g)
    return z, {"backbone": bb_stats,
               "pretext_head": with_tail({"projector": proj_stats}, tail_stats)}

  def output_loss(self, outputs: jax.Array, views=None,
                  target: Optional[PyTree] = None) -> jax.Array:
    """The loss as a function of :meth:`outputs` (NT-Xent of the logits)."""
    del views, target
    return nt_xent_of_logits(outputs)
