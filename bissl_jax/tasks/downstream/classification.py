"""Downstream tasks L_D: image classification, single- and multi-label (BiSSL paper §3.2, §4.1).

One implementation serves the upper level of BiSSL, the head warm-up, fine-tuning
and evaluation, so the loss the upper level differentiates is the loss the
fine-tuning stage minimises. It follows :class:`bissl_jax.core.protocols.DownstreamTask`.
"""
import dataclasses
from typing import Any, Tuple

import jax
import optax

from bissl_jax.tasks import augment
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
    model: the model bundle (its ``features`` and ``classify``).
    image_size: side of the model inputs.
    multilabel: sigmoid BCE on multi-hot labels instead of softmax cross-entropy.
  """
  model: Any
  image_size: int
  multilabel: bool = False

  def prepare(self, rng, images, *, train: bool):
    """RandomResizedCrop + flip for training; resize + centre crop for evaluation."""
    if train:
      return augment.downstream_train_view(rng, images, size=self.image_size)
    return augment.eval_view(None, images, size=self.image_size)

  def loss(self, backbone_params: PyTree, head_params: PyTree, backbone_stats: PyTree,
           inputs, labels, *, train: bool = True) -> Tuple[jax.Array, PyTree]:
    """``(loss, new backbone statistics)``; BatchNorm on batch statistics when ``train``."""
    feats, stats = self.model.features(backbone_params, backbone_stats, inputs, train=train)
    logits = self.model.classify(head_params, feats)
    return classification_loss(logits, labels, self.multilabel), stats

  def logits(self, backbone_params: PyTree, head_params: PyTree, backbone_stats: PyTree,
             inputs) -> jax.Array:
    """Evaluation-mode logits (running statistics)."""
    feats, _ = self.model.features(backbone_params, backbone_stats, inputs, train=False)
    return self.model.classify(head_params, feats)
