"""Pretext tasks L_P of BiSSL, one module each, and their registry.

``simclr`` and ``byol`` (the BiSSL paper's, §4.1), ``mae`` (BiSSLight), ``next_token``
(GPT, BiSSL thesis §2.3.4) and ``gessl`` (a bilevel wrapper of SimCLR/BYOL, GeSSL
paper §3.2); ``views`` holds what SimCLR and BYOL share.

Every task follows :class:`bissl_jax.core.protocols.PretextTask`: ``prepare(rng, images)``
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
from bissl_jax.models.resnet import BisslModel
from bissl_jax.tasks.pretext.byol import BYOL, byol_regression_loss, ema_update
from bissl_jax.tasks.pretext.mae import MAE
from bissl_jax.tasks.pretext.simclr import (SimCLR, nt_xent, nt_xent_of_logits,
                                            similarity_logits)
from bissl_jax.tasks.pretext.views import (BN_GROUPINGS, l2_normalize,
                                           two_view_apply, two_views)


__all__ = ["BN_GROUPINGS", "BYOL", "MAE", "SimCLR", "TASKS", "byol_regression_loss",
           "ema_update", "l2_normalize", "make_pretext_task", "nt_xent", "nt_xent_of_logits",
           "similarity_logits", "two_view_apply", "two_views"]

TASKS = {"simclr": SimCLR, "byol": BYOL, "mae": MAE}


def make_pretext_task(name: str, model: BisslModel, **kwargs):
  """Builds a pretext task by name.

  Args:
    name: ``'simclr'``, ``'byol'`` or ``'mae'`` (case-insensitive).
    model: the network bundle (a ViT with a decoder for ``'mae'``).
    **kwargs: task fields, e.g. ``temperature``, ``ema_decay`` or ``mask_ratio``.

  Returns:
    A :class:`SimCLR`, :class:`BYOL` or :class:`bissl_jax.tasks.pretext.mae.MAE`.
  """
  key = str(name).lower()
  if key not in TASKS:
    raise ValueError(f"Unknown pretext task {name!r}; valid choices: {sorted(TASKS)}.")
  return TASKS[key](model=model, **kwargs)
