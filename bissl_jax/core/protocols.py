"""The plug-in points of bissl_jax: what a model, a pretext task and a downstream task provide.

These are ``typing.Protocol`` classes: nothing needs to inherit from them, they
document (and let a type checker verify) the methods the training core calls.
``docs/architecture.md`` shows where each is used. ResNet (:mod:`bissl_jax.models.resnet`),
SimCLR and BYOL (:mod:`bissl_jax.tasks.pretext`) and classification
(:mod:`bissl_jax.tasks.downstream.classification`, with its head in
:mod:`bissl_jax.tasks.downstream.heads`) are the first implementations.

Parameter trees always have the top-level groups of :mod:`bissl_jax.core.partition`:
``{'backbone': θ, 'pretext_head': φ_P, 'downstream_head': φ_D}``; a group may be
an empty dict (a GPT has no pretext head). Statistics trees (BatchNorm running
averages) have ``'backbone'`` and ``'pretext_head'``, possibly empty.

Which leaves *train* is data, not code: :meth:`Model.trainable` returns a boolean
tree over the parameters. The optimizers of both levels, the proximal term, the
implicit gradient and the M-FAC blocks act on the trainable leaves only, so frozen
base weights with LoRA adapters need no branch anywhere.

Batches are dicts of host arrays (``{'image', 'label'}``, or ``{'tokens', 'label'}``
for text). A task reads the entry named by its optional ``input_key`` attribute
(:func:`input_key`; ``'image'`` when it has none), so the pipeline hands every task
its own input without knowing the domain.
"""
from typing import Any, Optional, Protocol, Tuple, runtime_checkable

import jax

from bissl_jax.types import PyTree


@runtime_checkable
class Model(Protocol):
  """A backbone with its pretext head, as pure functions of trees.

  Must be hashable (a frozen dataclass): jitted step functions close over it. The
  downstream head is the downstream task's (:meth:`DownstreamTask.init_head`);
  :func:`bissl_jax.core.params.init_params` builds the whole tree.
  """

  def init(self, rng: jax.Array, image_size: int) -> Tuple[PyTree, PyTree]:
    """``(params, batch_stats)``: ``'backbone'``, ``'pretext_head'`` and an empty
    ``'downstream_head'``."""

  def head_rng(self, rng: jax.Array) -> jax.Array:
    """The key of :meth:`init`'s schedule reserved for the downstream head.

    Optional: without it the head's key is a fold of ``rng``.
    """

  def features(self, backbone_params: PyTree, backbone_stats: PyTree, x, *,
               train: bool) -> Tuple[jax.Array, PyTree]:
    """Backbone features of inputs ``x`` and the updated statistics (unchanged if not ``train``)."""

  def trainable(self, params: PyTree) -> PyTree:
    """A boolean tree shaped like ``params``: True where a leaf is trained.

    Optional: the core treats every leaf as trainable when a model lacks it.
    """


@runtime_checkable
class PretextTask(Protocol):
  """The lower-level objective L_P.

  Attributes:
    has_target: whether the task keeps a target network (BYOL's EMA).
  """
  has_target: bool

  def prepare(self, rng: jax.Array, batch) -> Any:
    """Loss inputs from one raw batch (augmented views, masks, tokens), inside jit.

    Every random choice is made here from ``rng``, so that the upper stage's
    Hessian is taken on one fixed set of inputs.
    """

  def loss(self, params: PyTree, batch_stats: PyTree, inputs, target=None
           ) -> Tuple[jax.Array, dict]:
    """``(loss, {'batch_stats': new statistics, 'metrics': {...}})``.

    ``params`` holds ``'backbone'`` and ``'pretext_head'``; other keys are ignored.
    Must be twice differentiable (the upper level takes its Hessian).
    """


@runtime_checkable
class DownstreamTask(Protocol):
  """The upper-level objective L_D and the fine-tuning/evaluation loss.

  The task owns its head φ_D: it initialises it (from the backbone's outputs) and
  applies it inside ``loss`` and ``logits``.

  Optional, and so not a member here (``isinstance`` stays true for tasks without
  it): ``head_from_pretext(head_params, pretext_head) -> head_params``, φ_D with the
  parts the pretext head φ_P already holds taken from it (a detector's res5 box head
  from the pretext ResNet's tail); the stages call it through :func:`head_from_pretext`
  wherever they make a fresh head. A task without it keeps its fresh head.
  """

  def init_head(self, rng: jax.Array, params: PyTree, batch_stats: PyTree) -> PyTree:
    """φ_D from ``rng``, given the model's freshly initialised ``(params, batch_stats)``
    (for the shapes of the backbone's outputs). Optional: a task without it has no
    head (``{}``)."""

  def prepare(self, rng, images, *, train: bool) -> Any:
    """Model inputs from one raw batch (training augmentation or evaluation view)."""

  def loss(self, backbone_params: PyTree, head_params: PyTree, backbone_stats: PyTree,
           inputs, labels, *, train: bool = True) -> Tuple[jax.Array, PyTree]:
    """``(loss, new backbone statistics)``. ``labels`` is an array (class ids,
    multi-hot rows) or a tree of arrays (a detector's boxes, classes and masks)."""

  def logits(self, backbone_params: PyTree, head_params: PyTree, backbone_stats: PyTree,
             inputs) -> jax.Array:
    """Evaluation-mode outputs (an array, or a tree such as padded detections), scored
    by :mod:`bissl_jax.evaluation.metrics` (detections by :func:`bissl_jax.detection.voc_ap`)."""


def input_key(task: Any) -> str:
  """The batch entry ``task.prepare`` reads: ``task.input_key``, or ``'image'``."""
  return getattr(task, "input_key", "image")


def head_from_pretext(task: Any, head_params: PyTree, pretext_head: Optional[PyTree]
                      ) -> PyTree:
  """``task.head_from_pretext(head_params, pretext_head)``, or ``head_params`` itself
  when the task does not define it (then ``pretext_head`` is not read)."""
  fn = getattr(task, "head_from_pretext", None)
  return head_params if fn is None else fn(head_params, pretext_head)


def takes_head_from_pretext(task: Any) -> bool:
  """Whether ``task`` defines ``head_from_pretext`` (its fresh heads depend on φ_P)."""
  return getattr(task, "head_from_pretext", None) is not None


def trainable_mask(model: Any, params: PyTree) -> PyTree:
  """``model.trainable(params)``, or all True when the model does not define it."""
  fn = getattr(model, "trainable", None)
  if fn is None:
    return jax.tree_util.tree_map(lambda _: True, params)
  return fn(params)
