"""Downstream tasks L_D: image classification, single- and multi-label (BiSSL paper §3.2, §4.1).

One implementation serves the upper level of BiSSL, the head warm-up, fine-tuning
and evaluation, so the loss the upper level differentiates is the loss the
fine-tuning stage minimises. It follows :class:`bissl_jax.core.protocols.DownstreamTask`
and owns its head: a linear layer on the model's pooled features
(:class:`bissl_jax.tasks.downstream.heads.LinearHead`).
"""
import dataclasses
from typing import Any, Tuple

import jax
import jax.numpy as jnp
import optax

from bissl_jax.tasks import augment
from bissl_jax.tasks.downstream.heads import LinearHead, pool_features
from bissl_jax.types import PyTree


def classification_loss(logits, labels, multilabel: bool):
  """Softmax cross-entropy, or mean sigmoid BCE for multi-hot targets."""
  if multilabel:
    return optax.sigmoid_binary_cross_entropy(logits, labels.astype(logits.dtype)).mean()
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


@dataclasses.dataclass(frozen=True)
class Classification:
  """Linear-head classification on backbone features.

  Attributes:
    model: the model bundle (its ``features``).
    image_size: side of the model inputs.
    multilabel: sigmoid BCE on multi-hot labels instead of softmax cross-entropy.
    num_classes: outputs of the linear head.
    head_init: its initialisation, a key of ``heads.HEAD_INITS`` (``'torch_linear'``
      for ResNets, ``'trunc_normal'`` for ViTs, as their reference code).
  """
  model: Any
  image_size: int
  multilabel: bool = False
  num_classes: int = 10
  head_init: str = "torch_linear"

  @property
  def head(self) -> LinearHead:
    return LinearHead(int(self.num_classes), self.head_init)

  def init_head(self, rng, params: PyTree, batch_stats: PyTree) -> PyTree:
    """φ_D from ``rng``, shaped by the model's features on ``image_size``² inputs."""
    x = jnp.zeros((1, self.image_size, self.image_size, 3), jnp.float32)
    feats = jax.eval_shape(lambda p, s: self.model.features(p, s, x, train=False)[0],
                           params["backbone"], batch_stats["backbone"])
    return self.head.init(rng, jnp.zeros((1, feats.shape[-1]), jnp.float32))["params"]

  def head_outputs(self, head_params: PyTree, feats: jax.Array) -> jax.Array:
    """Logits of the linear head on pooled features (a feature map is pooled first)."""
    return self.head.apply({"params": head_params}, pool_features(feats))

  def prepare(self, rng, images, *, train: bool):
    """RandomResizedCrop + flip for training; resize + centre crop for evaluation."""
    if train:
      return augment.downstream_train_view(rng, images, size=self.image_size)
    return augment.eval_view(None, images, size=self.image_size)

  def loss(self, backbone_params: PyTree, head_params: PyTree, backbone_stats: PyTree,
           inputs, labels, *, train: bool = True) -> Tuple[jax.Array, PyTree]:
    """``(loss, new backbone statistics)``; BatchNorm on batch statistics when ``train``."""
    feats, stats = self.model.features(backbone_params, backbone_stats, inputs, train=train)
    logits = self.head_outputs(head_params, feats)
    return classification_loss(logits, labels, self.multilabel), stats

  def logits(self, backbone_params: PyTree, head_params: PyTree, backbone_stats: PyTree,
             inputs) -> jax.Array:
    """Evaluation-mode logits (running statistics)."""
    feats, _ = self.model.features(backbone_params, backbone_stats, inputs, train=False)
    return self.head_outputs(head_params, feats)
