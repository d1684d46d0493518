"""GeSSL (Generalizable Self-Supervised Learning, ICML 2024) as a pretext task.

GeSSL turns every mini-batch into B-way classification tasks (all augmented views of
image i get pseudo-label i), adapts the model to each task with K SGD steps of
cross-entropy (the first level, paper Eq. 6), builds a *self-motivated target* θ̃ by
λ−1 further steps under stop-gradient, and minimises the divergence between the
target's and the adapted model's predictive distributions, summed over the n tasks
and differentiated through the K inner steps (the second level, Eq. 7).

:class:`GeSSL` wraps a base task (:class:`bissl_jax.tasks.pretext.SimCLR` or ``BYOL``) and
satisfies :class:`bissl_jax.core.protocols.PretextTask`, so pretext pretraining (and
BiSSL's lower level) take it unchanged. Its loss is
``ssl_weight · L_base + gessl_weight · Σ_l D(π_θ̃ˡ ‖ π_θˡ)``. The network is
backbone → projector → ``pretext_head['task_classifier']`` (a B-way linear head,
added by :meth:`GeSSL.init_head`). Every choice the paper leaves open is listed in
``docs/gessl.md``.

The inner steps go through :func:`bissl_jax.implicit.loops.fori`, so on GPU/TPU K and λ do
not multiply compile time; on XLA:CPU they are unrolled (the loop cliff).
"""
import dataclasses
from typing import Any, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from bissl_jax.implicit import loops
from bissl_jax.core import optim
from bissl_jax.core import protocols
from bissl_jax.tasks.pretext import gessl_levels
from bissl_jax.tasks.pretext.gessl_levels import (cross_entropy, make_tasks, multi_views,
                                                  second_level_divergence,
                                                  unrolled_second_level)
from bissl_jax.tasks.pretext.views import embed_views
from bissl_jax.types import PyTree


SECOND_LEVEL_LOSSES = gessl_levels.SECOND_LEVEL_LOSSES
INNER_PARAMS = ("all", "pretext_head", "task_classifier")
HEAD_INITS = ("lecun_normal", "zeros")
TASK_BATCHING = ("vmap", "loop")
BASE_TASKS = ("simclr", "byol")  # the pretext tasks GeSSL wraps (views, projector)
HEAD_KEY = "task_classifier"


def _inner_mask(params: PyTree, which: str) -> PyTree:
  """Python-bool tree over ``{'backbone', 'pretext_head'}``: the leaves ``which`` names."""
  const = lambda tree, value: jax.tree_util.tree_map(lambda _: value, tree)
  if which == "all":
    return const(params, True)
  if which == "pretext_head":
    return {"backbone": const(params["backbone"], False),
            "pretext_head": const(params["pretext_head"], True)}
  head = {k: const(v, k == HEAD_KEY) for k, v in params["pretext_head"].items()}
  return {"backbone": const(params["backbone"], False), "pretext_head": head}


def model_trainable(model: Any, params: PyTree) -> PyTree:
  """``model.trainable`` over ``{'backbone', 'pretext_head'}``; the task classifier trains.

  The mask is taken on the model's own tree (without the classifier, which the
  model does not know), so a model's ``trainable`` need not accept extra leaves.
  """
  head = params["pretext_head"]
  own = {"backbone": params["backbone"],
         "pretext_head": {k: v for k, v in head.items() if k != HEAD_KEY}}
  mask = dict(protocols.trainable_mask(model, own))
  mask["pretext_head"] = dict(mask["pretext_head"])
  if HEAD_KEY in head:
    mask["pretext_head"][HEAD_KEY] = jax.tree_util.tree_map(lambda _: True, head[HEAD_KEY])
  return {"backbone": mask["backbone"],
          "pretext_head": {k: mask["pretext_head"][k] for k in head}}


@dataclasses.dataclass(frozen=True)
class GeSSL:
  """GeSSL around a base pretext task (``SimCLR`` or ``BYOL`` of :mod:`bissl_jax.tasks.pretext`).

  Attributes:
    base: the base task; its ``model`` provides ``features`` and ``project``.
    classes_per_task: B, images per task (the classifier has B outputs). The
      prepared batch must hold ``n_tasks · B`` images.
    n_tasks: n, tasks per outer step (paper: 8).
    num_views: A, views per image (paper: 2 in §3.2, 5 in Appendix C).
    K: first-level SGD steps (paper default 1).
    lam: GeSSL's λ (paper default 10): the target takes λ−1 further steps.
    inner_lr: α of the inner SGD steps (not given in the paper).
    second_level_loss: one of :data:`SECOND_LEVEL_LOSSES` ('kl' in the paper).
    first_order: stop-gradient on the inner gradients (no inner Hessian term).
    fd_radius: > 0: the inner Hessian-vector products of the outer gradient by
      central finite differences of this radius (AID-FD, G.4); 0: exact.
    inner_params: which parameters the inner steps adapt: 'all' (Eq. 6: the whole
      f_θ), 'pretext_head' (projector + classifier) or 'task_classifier'.
    ssl_weight: weight of the base SSL loss (0 gives GeSSL's objective alone).
    gessl_weight: weight of the second-level loss.
    head_init: initialiser of the task classifier, 'lecun_normal' or 'zeros'.
    image_size: side of the views (default: the base task's, else the input side).
    unroll: inner-loop driver, see :func:`bissl_jax.implicit.loops.fori` (None: by backend).
    task_batching: 'vmap' runs the n tasks side by side (per-task weights make the
      convolutions grouped ones), 'loop' one after another with
      :func:`bissl_jax.implicit.loops.scan` (plain convolutions; unrolled on CPU, so n times
      the compile time there).
  """
  base: Any
  classes_per_task: int
  n_tasks: int = 8
  num_views: int = 2
  K: int = 1
  lam: int = 10
  inner_lr: float = 0.1
  second_level_loss: str = "kl"
  first_order: bool = False
  inner_params: str = "all"
  ssl_weight: float = 1.0
  gessl_weight: float = 1.0
  head_init: str = "lecun_normal"
  image_size: Optional[int] = None
  unroll: Optional[bool] = None
  task_batching: str = "vmap"
  fd_radius: float = 0.0

  def __post_init__(self):
    checks = [
        (int(self.classes_per_task) >= 2, f"classes_per_task={self.classes_per_task} must be >= 2"),
        (int(self.n_tasks) >= 1, f"n_tasks={self.n_tasks} must be >= 1"),
        (int(self.num_views) >= 2, f"num_views={self.num_views} must be >= 2 "
                                   "(the base SSL loss uses views 0 and 1)"),
        (int(self.K) >= 1, f"K={self.K} must be >= 1 (first-level steps)"),
        (int(self.lam) >= 1, f"lam={self.lam} must be >= 1 (the target takes lam-1 more steps)"),
        (self.second_level_loss in SECOND_LEVEL_LOSSES,
         f"second_level_loss={self.second_level_loss!r}; valid: {SECOND_LEVEL_LOSSES}"),
        (self.inner_params in INNER_PARAMS,
         f"inner_params={self.inner_params!r}; valid: {INNER_PARAMS}"),
        (self.head_init in HEAD_INITS, f"head_init={self.head_init!r}; valid: {HEAD_INITS}"),
        (self.task_batching in TASK_BATCHING,
         f"task_batching={self.task_batching!r}; valid: {TASK_BATCHING}"),
        (float(self.fd_radius) >= 0, f"fd_radius={self.fd_radius} must be >= 0 (0: exact)"),
    ]
    bad = [msg for ok, msg in checks if not ok]
    if bad:
      raise ValueError("GeSSL: " + "; ".join(bad) + ".")

  # --- protocol -------------------------------------------------------------------

  @property
  def has_target(self) -> bool:
    return bool(self.base.has_target)

  @property
  def model(self):
    return self.base.model

  @property
  def batch_size(self) -> int:
    """Images per prepared batch: ``n_tasks · classes_per_task``."""
    return int(self.n_tasks) * int(self.classes_per_task)

  def init_target(self, params, batch_stats):
    """The base task's target network (BYOL)."""
    return self.base.init_target(params, batch_stats)

  def update_target(self, target, params, batch_stats):
    """The base task's target update (BYOL's EMA)."""
    return self.base.update_target(target, params, batch_stats)

  def init_head(self, rng: jax.Array, params: PyTree) -> PyTree:
    """``params`` with ``pretext_head['task_classifier']`` (a B-way Dense on the projector output).

    Call once after ``model.init``: the head is an ordinary pretext-head leaf
    group (optimised, checkpointed and partitioned with the projector). Existing
    keys are kept; the input tree is not modified.
    """
    head = params["pretext_head"]
    if HEAD_KEY in head:
      raise ValueError(f"params['pretext_head'] already has {HEAD_KEY!r}; call init_head once.")
    width = int(self.model.projector.features[-1])
    init = nn.initializers.zeros if self.head_init == "zeros" else nn.initializers.lecun_normal()
    dense = nn.Dense(int(self.classes_per_task), kernel_init=init)
    new_head = dict(head)
    new_head[HEAD_KEY] = dense.init(rng, jnp.zeros((1, width), jnp.float32))["params"]
    out = dict(params)
    out["pretext_head"] = new_head
    return out

  def trainable(self, params: PyTree) -> PyTree:
    """The stage's trainable mask: ``model.trainable`` on the model's leaves, the task
    classifier trains (:func:`model_trainable`)."""
    return model_trainable(self.model, params)

  def prepare(self, rng: jax.Array, images: jax.Array) -> dict:
    """``{'views': (A, N, S, S, 3)}``: A augmented views of every image (N = n·B)."""
    if images.shape[0] != self.batch_size:
      raise ValueError(f"GeSSL expects batches of n_tasks*classes_per_task = "
                       f"{self.n_tasks}*{self.classes_per_task} = {self.batch_size} images; "
                       f"got {images.shape[0]}. Set the pretext batch size to match.")
    size = self.image_size or getattr(self.base, "image_size", None) or images.shape[1]
    return {"views": multi_views(rng, images, num_views=int(self.num_views), size=size)}

  def inner_mask(self, params: PyTree) -> PyTree:
    """Python bools over ``{'backbone', 'pretext_head'}``: the leaves the inner steps adapt.

    The leaves ``inner_params`` names that ``model.trainable`` also marks trainable:
    a frozen leaf (e.g. a LoRA base weight) is never adapted, and the stage's
    optimizer (:func:`bissl_jax.core.partition.level_optimizer`) gives it no outer update.
    """
    which = _inner_mask(params, self.inner_params)
    trainable = model_trainable(self.model, params)
    return jax.tree_util.tree_map(lambda w, t: bool(w) and bool(t), which, trainable)

  # --- the network f_θ = c ∘ h ∘ g ---------------------------------------------------

  def task_logits(self, params: PyTree, batch_stats: PyTree, x: jax.Array) -> jax.Array:
    """B-way logits of the classifier on the projector, training-mode BatchNorm.

    The batch statistics of these forwards are discarded: running statistics follow
    the base loss's forward only (docs/sources.md: no update from auxiliary passes).
    """
    model = self.model
    head = params["pretext_head"]
    h, _, _ = embed_views(model, params["backbone"], batch_stats["backbone"], head,
                          batch_stats["pretext_head"], x, "joint")
    z, _ = model.project(head["projector"], batch_stats["pretext_head"]["projector"], h,
                         train=True)
    return nn.Dense(int(self.classes_per_task)).apply({"params": head[HEAD_KEY]}, z)

  def task_objective(self, params: PyTree, batch_stats: PyTree, x: jax.Array,
                     y: jax.Array, target: Optional[PyTree] = None
                     ) -> Tuple[jax.Array, dict, PyTree]:
    """Second-level loss of one task, diagnostics and θ̃ (see :func:`unrolled_second_level`)."""
    inner = lambda p: cross_entropy(self.task_logits(p, batch_stats, x), y)
    sg = jax.lax.stop_gradient

    def divergence(t, a):
      target_logits = self.task_logits(t, batch_stats, x)
      logits = self.task_logits(a, batch_stats, x)
      diag = {"inner_ce_adapted": sg(cross_entropy(logits, y)),
              "inner_ce_target": sg(cross_entropy(target_logits, y))}
      return second_level_divergence(self.second_level_loss, target_logits, logits), diag

    value, (_, target), diag = unrolled_second_level(
        inner, divergence, params, steps=int(self.K), extra_steps=int(self.lam) - 1,
        inner_lr=self.inner_lr, first_order=self.first_order, mask=self.inner_mask(params),
        unroll=self.unroll, target=target, has_aux=True, fd_radius=self.fd_radius)
    # The same forward as the first inner step's, which XLA merges with it.
    diag["inner_ce_before"] = sg(inner(params))
    return value, diag, target

  def second_level(self, params: PyTree, batch_stats: PyTree, inputs: dict,
                   targets: Optional[PyTree] = None) -> Tuple[jax.Array, dict, PyTree]:
    """``Σ_l D(π_θ̃ˡ ‖ π_θˡ)`` over the n tasks (Eq. 7), per-task means of the
    diagnostics, and the targets θ̃ˡ (stacked over tasks; pass them back as
    ``targets`` to hold them fixed)."""
    lower = {"backbone": params["backbone"], "pretext_head": params["pretext_head"]}
    x, y = make_tasks(inputs["views"], int(self.n_tasks))
    objective = lambda xi, yi, ti: self.task_objective(lower, batch_stats, xi, yi, ti)
    if self.task_batching == "vmap":
      per_task, diag, targets = jax.vmap(objective)(x, y, targets)
    else:
      body = lambda carry, xs: (carry, objective(*xs))
      _, (per_task, diag, targets) = loops.scan(body, None, (x, y, targets),
                                                unroll=self.unroll)
    return jnp.sum(per_task), {k: jnp.mean(v) for k, v in diag.items()}, targets

  def loss(self, params: PyTree, batch_stats: PyTree, inputs: dict, target=None
           ) -> Tuple[jax.Array, dict]:
    """``ssl_weight · L_base(views 0, 1) + gessl_weight · Σ_l D(π_θ̃ˡ ‖ π_θˡ)``.

    Args:
      params: ``{'backbone', 'pretext_head': {..., 'task_classifier'}}``; extra keys ignored.
      batch_stats: the base task's statistics tree.
      inputs: from :meth:`prepare`.
      target: the base task's target network (BYOL), else None.

    Returns:
      ``(loss, {'batch_stats': from the base loss's forward, 'metrics': {...}})``.
    """
    if HEAD_KEY not in params["pretext_head"]:
      raise ValueError("params['pretext_head'] has no 'task_classifier'; add it with "
                       "GeSSL.init_head(rng, params) after model.init.")
    views = inputs["views"]
    if views.shape[1] != self.batch_size:
      raise ValueError(f"GeSSL.loss got {views.shape[1]} images per view; expected "
                       f"n_tasks*classes_per_task = {self.batch_size}.")
    lower = {"backbone": params["backbone"], "pretext_head": params["pretext_head"]}
    base_loss, aux = self.base.loss(lower, batch_stats, (views[0], views[1]), target)
    second, diag, _ = self.second_level(lower, batch_stats, inputs)
    loss = self.ssl_weight * base_loss + self.gessl_weight * second
    sg = jax.lax.stop_gradient
    metrics = dict(aux["metrics"])
    metrics.update({"loss": loss, "ssl_loss": sg(base_loss), "second_level_loss": sg(second)})
    metrics.update(diag)
    return loss, {"batch_stats": aux["batch_stats"], "metrics": metrics}


# ----------------------------------------------------------------------------- builders

def gessl_optimizer(learning_rate=0.05, *, momentum: float = 0.9,
                    weight_decay: float = 1e-4) -> optax.GradientTransformation:
  """The outer (second-level) optimizer of Appendix C: SGD, momentum 0.9, weight decay 1e-4.

  ``learning_rate`` is β (a float or an optax schedule; the paper gives no value).
  Weight decay is coupled (added to the gradient before momentum), as PyTorch's SGD.
  """
  return optim.sgd(learning_rate, momentum=momentum, weight_decay=weight_decay)


def default_config():
  """The ``config.gessl`` block with the paper's defaults (an ``ml_collections.ConfigDict``).

  The outer optimizer is not part of it: the pretext stage's ``config.pretext``
  (``optimizer='sgd'``, ``lr`` = β, ``momentum``, ``weight_decay``) sets it.
  """
  import ml_collections  # pylint: disable=import-outside-toplevel
  return ml_collections.ConfigDict(dict(
      K=1, lam=10, n_tasks=8, classes_per_task=16, num_views=2, inner_lr=0.1,
      second_level_loss="kl", first_order=False, inner_params="all", ssl_weight=1.0,
      gessl_weight=1.0, head_init="lecun_normal", task_batching="vmap", fd_radius=0.0))


def from_config(base: Any, cfg, *, image_size: Optional[int] = None) -> GeSSL:
  """A :class:`GeSSL` around ``base`` from a ``config.gessl`` block (see :func:`default_config`).

  Other keys of the block (the pipeline's ``enabled``) are ignored.
  """
  fields = ("K", "lam", "n_tasks", "classes_per_task", "num_views", "inner_lr",
            "second_level_loss", "first_order", "inner_params", "ssl_weight",
            "gessl_weight", "head_init")
  optional = ("task_batching", "fd_radius")
  missing = [f for f in fields if f not in cfg]
  if missing:
    raise ValueError(f"config.gessl lacks {missing}; start from gessl.default_config().")
  kwargs = {f: cfg[f] for f in fields}
  kwargs.update({f: cfg[f] for f in optional if f in cfg})
  for f in ("K", "lam", "n_tasks", "classes_per_task", "num_views"):
    kwargs[f] = int(kwargs[f])
  for f in ("inner_lr", "ssl_weight", "gessl_weight", "fd_radius"):
    if f in kwargs:
      kwargs[f] = float(kwargs[f])
  kwargs["first_order"] = bool(kwargs["first_order"])
  return GeSSL(base=base, image_size=image_size, **kwargs)
