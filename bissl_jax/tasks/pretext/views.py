"""What SimCLR and BYOL share: L2 normalisation and the two augmented views.

BatchNorm grouping (``bn_grouping``, :func:`two_view_apply`): ``'joint'`` sends both
views through the network as one batch of 2B, so BatchNorm takes one statistic over
both views; ``'per_view'`` sends each view on its own, as the reference PyTorch code
does (the paper-reproduction configs use it). The same grouping applies in the lower
steps and in the upper stage's Hessian.
"""
from typing import Optional, Tuple

import jax
import jax.numpy as jnp

from bissl_jax.tasks import augment

_NORM_EPS = 1e-12  # as torch.nn.functional.normalize


def l2_normalize(x: jax.Array, axis: int = -1) -> jax.Array:
  """``x / max(‖x‖, 1e-12)``; smooth away from 0 (rsqrt of a clamped square norm)."""
  sq = jnp.sum(jnp.square(x), axis=axis, keepdims=True)
  return x * jax.lax.rsqrt(jnp.maximum(sq, _NORM_EPS**2))


def at_least_f32(x):
  """``x`` in float32 or wider (losses and normalisation are never taken in bfloat16)."""
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def two_views(rng, images, image_size: Optional[int]):
  """SimCLR/BYOL's asymmetric pair of views, cropped to ``image_size`` (default: the input side)."""
  return augment.pretext_views(rng, images, size=image_size or images.shape[1])


def split_views(x: jax.Array) -> Tuple[jax.Array, jax.Array]:
  """The two halves (view 1, view 2) of a joint batch of 2B rows."""
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
  v1, v2 = views if isinstance(views, tuple) else split_views(views)
  y1, stats = apply(params, stats, v1)
  y2, stats = apply(params, stats, v2)
  return jnp.concatenate([y1, y2], axis=0), stats


def mean_cosine(a, b):
  """Mean cosine similarity of the rows of ``a`` and ``b``."""
  return jnp.mean(jnp.sum(l2_normalize(a) * l2_normalize(b), axis=-1))


TAIL_KEY = "backbone_tail"  # models.resnet.TAIL_KEY: the stages after a moved boundary


def embed_views(model, backbone_params, backbone_stats, head_params, head_stats, views,
                grouping: str):
  """The representation h of both views that the projector reads, training mode.

  The shared backbone, then, when the model's backbone boundary moved
  (``model.tail``), the backbone stages the pretext head holds
  (``head_params['backbone_tail']``).

  Returns:
    ``(h (2B, C), new backbone statistics, new tail statistics or None)``.
  """
  h, bb_stats = two_view_apply(lambda p, st, x: model.features(p, st, x, train=True),
                               backbone_params, backbone_stats, views, grouping)
  if getattr(model, "tail", None) is None:
    return h, bb_stats, None
  h, tail_stats = two_view_apply(lambda p, st, x: model.tail_apply(p, st, x, train=True),
                                 head_params[TAIL_KEY], head_stats[TAIL_KEY], h, grouping)
  return h, bb_stats, tail_stats


def with_tail(head_stats: dict, tail_stats) -> dict:
  """``head_stats`` plus the tail's statistics when the model has a tail."""
  return head_stats if tail_stats is None else {**head_stats, TAIL_KEY: tail_stats}

