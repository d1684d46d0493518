"""Stage 1: pretext pretraining of the backbone and pretext head (paper §4.2.1).

LARS (trust coefficient 0.001, momentum 0.9, weight decay on matrices only) with a
linear warm-up over ``pretext.warmup_epochs`` epochs to ``pretext.lr``, then a cosine
to 0.001·LR at the last step; BYOL's EMA target follows every step. The LR is the
peak value itself (no batch-size scaling). Each epoch is one pass over a fresh
permutation (the remainder batch is dropped).

Outputs ``<directory>/output``: ``{'params': {'backbone', 'pretext_head'},
'batch_stats': {'backbone', 'pretext_head'}}``. Resumable from
``<directory>/ckpt`` (saved every ``config.checkpoint_every`` epochs).
"""
import functools
import os
from typing import Any, NamedTuple, Optional, Tuple

import jax
import optax

from bissl_jax import augment
from bissl_jax import optim
from bissl_jax import train_state as ts
from bissl_jax.pipeline import checkpoint
from bissl_jax.pipeline import logging as plog
from bissl_jax.pipeline.context import (StageContext, check_size, new_stack, nonfinite,
                                        stack_to_json)
from bissl_jax.pipeline.search import derive_seed
from bissl_jax.pipeline.supervised import init_variables

PyTree = Any


class PretextState(NamedTuple):
  """Everything pretext pretraining updates."""
  params: PyTree        # {'backbone', 'pretext_head'}
  batch_stats: PyTree   # {'backbone', 'pretext_head'}
  opt_state: PyTree
  target: PyTree        # BYOL's EMA target, or None
  step: jax.Array


def pretext_optimizer(cfg, steps_per_epoch: int, epochs: int) -> optax.GradientTransformation:
  """LARS on a warm-up + cosine schedule from ``config.pretext`` over ``epochs``."""
  schedule = optim.warmup_cosine_schedule(
      cfg.lr, warmup_steps=cfg.warmup_epochs * steps_per_epoch,
      total_steps=epochs * steps_per_epoch)
  return optim.lars(schedule, weight_decay=cfg.weight_decay, momentum=cfg.momentum)


def _train_step(task, tx, image_size: int, state: PretextState, images, rng
                ) -> Tuple[PretextState, dict]:
  views = augment.pretext_views(rng, images, size=image_size)
  grad_fn = jax.value_and_grad(task.loss, has_aux=True)
  (loss, aux), grads = grad_fn(state.params, state.batch_stats, views, state.target)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  target = state.target
  if task.has_target:
    target = task.update_target(target, params, aux["batch_stats"])
  metrics = dict(aux["metrics"], loss=loss, grad_norm=optax.tree.norm(grads))
  return PretextState(params, aux["batch_stats"], opt_state, target, state.step + 1), metrics


def init_pretext_state(ctx: StageContext, tx, seed: int) -> PretextState:
  """A fresh model (random init from ``seed``) and optimizer state."""
  params, batch_stats = init_variables(ctx, jax.random.key(derive_seed(seed, "pretext_init")))
  params = {"backbone": params["backbone"], "pretext_head": params["pretext_head"]}
  target = ctx.task.init_target(params, batch_stats) if ctx.task.has_target else None
  return PretextState(params, batch_stats, tx.init(params), target,
                      jax.numpy.zeros((), jax.numpy.int32))


def pretrain(ctx: StageContext, dataset, *, seed: int, directory: str,
             epochs: Optional[int] = None) -> Tuple[PyTree, PyTree]:
  """Runs (or resumes, or loads the finished output of) pretext pretraining.

  Args:
    ctx: the run context.
    dataset: the pretext ``ArrayDataset`` (labels unused).
    seed: seed of the initialisation, data order and augmentation.
    directory: stage directory (``output`` and ``ckpt`` live inside).
    epochs: training epochs (default ``config.pretext.epochs``).

  Returns:
    ``(params, batch_stats)``, each ``{'backbone', 'pretext_head'}``.

  Raises:
    NonFiniteError: the loss became NaN/Inf (nothing is saved for that epoch).
  """
  out_dir = os.path.join(directory, "output")
  if checkpoint.is_export(out_dir):
    variables, _ = checkpoint.load_export(out_dir)
    return variables["params"], variables["batch_stats"]

  cfg = ctx.config.pretext
  epochs = cfg.epochs if epochs is None else int(epochs)
  spe = check_size(len(dataset), cfg.batch_size, "pretext.batch_size",
                   f"the pretext set {ctx.config.data.pretext_dataset}")
  tx = pretext_optimizer(cfg, spe, epochs)
  state = init_pretext_state(ctx, tx, seed)
  schedule_key = (cfg.lr, cfg.weight_decay, cfg.momentum, cfg.warmup_epochs, epochs, spe)
  step_fn = ctx.cached(("pretext_step", schedule_key), lambda: jax.jit(
      functools.partial(_train_step, ctx.task, tx, ctx.image_size), donate_argnums=0))

  data_seed = derive_seed(seed, "pretext_data")
  stack = new_stack(len(dataset), cfg.batch_size, seed=data_seed)
  ckpt = checkpoint.RunCheckpointer(os.path.join(directory, "ckpt"))
  epoch = 0
  if ckpt.latest_step() is not None:
    state, extra = ckpt.restore(state)
    epoch = int(extra["epoch"])
    stack = new_stack(len(dataset), cfg.batch_size, seed=data_seed, state=extra["stack"])
  state = ctx.replicate(state)
  base_key = jax.random.key(derive_seed(seed, "pretext_aug"))
  name = f"pretext/seed{seed}"
  progress = plog.Progress(epochs * spe, name, initial=epoch * spe,
                           items_per_step=cfg.batch_size)
  try:
    for epoch in range(epoch, epochs):
      indices = stack.take(spe)
      for i, row in enumerate(indices):
        step = epoch * spe + i
        images = ctx.shard(dataset.batch(row)["image"])
        state, metrics = step_fn(state, images, jax.random.fold_in(base_key, step))
        if (step + 1) % ctx.config.log_every == 0 or step + 1 == epochs * spe:
          metrics = jax.device_get(metrics)
          if nonfinite(metrics["loss"]):
            raise ts.NonFiniteError(
                f"Non-finite pretext loss at step {step} (epoch {epoch}) of {name}. Nothing "
                f"was saved for this epoch. Check the data, or lower config.pretext.lr.")
          ctx.logger.write(name, step + 1, metrics)
          progress.update(1, loss=metrics["loss"])
        else:
          progress.update(1)
      if nonfinite(optax.tree.norm(state.params)):
        raise ts.NonFiniteError(f"Non-finite pretext parameters after epoch {epoch} of {name}; "
                                f"nothing was saved. Lower config.pretext.lr.")
      if (epoch + 1) % ctx.config.checkpoint_every == 0 and epoch + 1 < epochs:
        ckpt.save(epoch + 1, state, {"epoch": epoch + 1, "stack": stack_to_json(stack)})
  finally:
    progress.close()
    ckpt.close()
  variables = {"params": state.params, "batch_stats": state.batch_stats}
  checkpoint.export(out_dir, variables, {
      "stage": "pretext", "seed": seed, "task": cfg.task, "arch": ctx.config.model.arch,
      "dataset": ctx.config.data.pretext_dataset, "epochs": epochs,
      "image_size": ctx.image_size})
  return state.params, state.batch_stats
