"""Stages 2, 4 and 5: head warm-up, fine-tuning and evaluation (paper §4.2).

* **Head warm-up**: only the linear head φ_D is trained, on the frozen backbone
  with BatchNorm in evaluation mode (running statistics), for
  ``head_warmup.epochs`` epochs at a constant LR (SGD, momentum 0.9, coupled
  weight decay), with the downstream training augmentation.
* **Fine-tuning**: backbone + a *fresh* linear head, BatchNorm in training mode,
  SGD with momentum 0.9 and coupled weight decay, cosine LR from the base LR to 0
  over all steps, training augmentation. Validation is scored after every epoch;
  the parameters of the best epoch (top-1, or 11-point mAP for multi-label sets)
  are kept.
* **Evaluation**: resize to ``size/0.875`` + centre crop, BatchNorm in evaluation
  mode; metrics over the whole split at once (``bissl_jax.metrics``).

The learning rate and weight decay enter the compiled step as arguments
(``optax.inject_hyperparams``), so the random search's trials, both pipelines and
all seeds share one executable.
"""
import functools
import math
import os
from typing import Any, NamedTuple, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from bissl_jax import augment
from bissl_jax import metrics as metrics_lib
from bissl_jax import optim
from bissl_jax import train_state as ts
from bissl_jax.pipeline import checkpoint
from bissl_jax.pipeline import logging as plog
from bissl_jax.pipeline.context import (StageContext, check_size, new_stack, nonfinite,
                                        stack_to_json)
from bissl_jax.pipeline.search import derive_seed

PyTree = Any


class TrainState(NamedTuple):
  """Trainable parameters, BatchNorm statistics and optimizer state."""
  params: PyTree
  batch_stats: PyTree
  opt_state: PyTree


class FinetuneResult(NamedTuple):
  """A fine-tuned model (best validation epoch) and its scores."""
  params: PyTree          # {'backbone', 'downstream_head'}
  batch_stats: PyTree     # {'backbone'}
  val_score: float        # best validation top-1 (or mAP)
  val_loss: float         # validation loss at that epoch
  best_epoch: int


def sgd_with_hyperparams(momentum: float) -> optax.GradientTransformation:
  """SGD + coupled weight decay whose LR and weight decay are set at every step."""
  return optax.inject_hyperparams(optim.sgd)(learning_rate=0.0, weight_decay=0.0,
                                             momentum=momentum)


def _with_hyperparams(opt_state, lr, weight_decay):
  hp = dict(opt_state.hyperparams, learning_rate=lr, weight_decay=weight_decay)
  return opt_state._replace(hyperparams=hp)


def classification_loss(logits, labels, multilabel: bool):
  """Softmax cross-entropy, or mean sigmoid BCE for multi-hot targets."""
  if multilabel:
    return optax.sigmoid_binary_cross_entropy(logits, labels.astype(logits.dtype)).mean()
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def _finetune_step(model, tx, image_size, multilabel, state: TrainState, images, labels,
                   rng, lr, weight_decay):
  x = augment.downstream_train_view(rng, images, size=image_size)

  def loss_fn(params):
    feats, stats = model.features(params["backbone"], state.batch_stats, x, train=True)
    logits = model.classify(params["downstream_head"], feats)
    return classification_loss(logits, labels, multilabel), stats

  (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  opt_state = _with_hyperparams(state.opt_state, lr, weight_decay)
  updates, opt_state = tx.update(grads, opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  return TrainState(params, stats, opt_state), {"loss": loss,
                                                "grad_norm": optax.tree.norm(grads)}


def _head_step(model, tx, image_size, multilabel, state: TrainState, backbone, images,
               labels, rng, lr, weight_decay):
  """Warm-up step: frozen backbone in evaluation mode, only the head moves."""
  x = augment.downstream_train_view(rng, images, size=image_size)
  feats, _ = model.features(backbone["params"], backbone["batch_stats"], x, train=False)
  feats = jax.lax.stop_gradient(feats)

  def loss_fn(head):
    return classification_loss(model.classify(head, feats), labels, multilabel)

  loss, grads = jax.value_and_grad(loss_fn)(state.params)
  opt_state = _with_hyperparams(state.opt_state, lr, weight_decay)
  updates, opt_state = tx.update(grads, opt_state, state.params)
  return TrainState(optax.apply_updates(state.params, updates), state.batch_stats,
                    opt_state), {"loss": loss}


def _eval_logits(model, image_size, params, batch_stats, images):
  x = augment.eval_view(None, images, size=image_size)
  feats, _ = model.features(params["backbone"], batch_stats, x, train=False)
  return model.classify(params["downstream_head"], feats)


def predict(ctx: StageContext, params: PyTree, batch_stats: PyTree, dataset) -> np.ndarray:
  """Logits ``(N, C)`` of the whole ``dataset`` in evaluation mode.

  The last batch is padded to the fixed evaluation batch size (one compiled shape)
  and the padding dropped.
  """
  fn = ctx.cached(("eval_logits",), lambda: jax.jit(
      functools.partial(_eval_logits, ctx.model, ctx.image_size)))
  bs = ctx.config.evaluate.batch_size
  params, batch_stats = ctx.replicate((params, batch_stats))
  out = []
  for start in range(0, len(dataset), bs):
    idx = np.arange(start, min(start + bs, len(dataset)))
    padded = np.concatenate([idx, np.zeros(bs - len(idx), idx.dtype)])
    logits = fn(params, batch_stats, ctx.shard(dataset.batch(padded)["image"]))
    out.append(np.asarray(jax.device_get(logits))[:len(idx)])
  return np.concatenate(out).astype(np.float64)


def evaluate(ctx: StageContext, params: PyTree, batch_stats: PyTree, dataset) -> dict:
  """The paper's metrics on ``dataset`` plus the loss.

  Returns:
    ``{'top1', 'top5', 'score', 'loss'}``, or ``{'map', 'score', 'loss'}`` for
    multi-label sets; 'score' is the model-selection metric.
  """
  logits = predict(ctx, params, batch_stats, dataset)
  out = metrics_lib.classification_metrics(
      logits, dataset.labels, multilabel=ctx.multilabel,
      ignore=getattr(dataset, "difficult", None))
  out["loss"] = float(classification_loss(jnp.asarray(logits), jnp.asarray(dataset.labels),
                                          ctx.multilabel))
  return out


def init_variables(ctx: StageContext, key) -> Tuple[PyTree, PyTree]:
  """``model.init`` under jit (compiled once per run)."""
  fn = ctx.cached(("model_init",), lambda: jax.jit(lambda k: ctx.model.init(k, ctx.image_size)))
  return fn(key)


def fresh_head(ctx: StageContext, seed: int) -> PyTree:
  """A newly initialised linear head (the same for both pipelines of one seed)."""
  return init_variables(ctx, jax.random.key(derive_seed(seed, "fresh_head")))[0][
      "downstream_head"]


def warmup_head(ctx: StageContext, backbone: dict, train_set, *, seed: int,
                name: str) -> PyTree:
  """Fits the linear head on the frozen backbone (stage 2).

  Args:
    ctx: the run context.
    backbone: ``{'params': θ, 'batch_stats': backbone statistics}``.
    train_set: the downstream training ``ArrayDataset``.
    seed: seed of the head initialisation, data order and augmentation.
    name: label for logs.

  Returns:
    The warmed-up head parameters.
  """
  cfg = ctx.config.head_warmup
  spe = check_size(len(train_set), cfg.batch_size, "head_warmup.batch_size",
                   "the downstream training split")
  tx = sgd_with_hyperparams(cfg.momentum)
  step_fn = ctx.cached(("head_step", cfg.momentum), lambda: jax.jit(functools.partial(
      _head_step, ctx.model, tx, ctx.image_size, ctx.multilabel)))
  head = fresh_head(ctx, seed)
  state = ctx.replicate(TrainState(head, None, tx.init(head)))
  backbone = ctx.replicate(backbone)
  stack = new_stack(len(train_set), cfg.batch_size, seed=derive_seed(seed, "warmup_data"))
  base_key = jax.random.key(derive_seed(seed, "warmup_aug"))
  lr, wd = jnp.float32(cfg.lr), jnp.float32(cfg.weight_decay)  # constant LR (paper)
  total = cfg.epochs * spe
  with plog.Progress(total, name, items_per_step=cfg.batch_size) as progress:
    for step in range(total):
      if step % spe == 0:
        rows = stack.take(spe)
      batch = ctx.shard(train_set.batch(rows[step % spe]))
      state, m = step_fn(state, backbone, batch["image"], batch["label"],
                         jax.random.fold_in(base_key, step), lr, wd)
      if (step + 1) % ctx.config.log_every == 0 or step + 1 == total:
        m = jax.device_get(m)
        if nonfinite(m["loss"]):
          raise ts.NonFiniteError(f"Non-finite head warm-up loss at step {step} of {name}; "
                                  f"lower config.head_warmup.lr.")
        ctx.logger.write(name, step + 1, m)
        progress.update(1, loss=m["loss"])
      else:
        progress.update(1)
  return state.params


def finetune(ctx: StageContext, backbone: dict, splits: dict, *, lr: float,
             weight_decay: float, epochs: int, seed: int, name: str,
             directory: Optional[str] = None, stop_on_nonfinite: bool = False
             ) -> FinetuneResult:
  """Fine-tunes backbone + fresh head; keeps the best-validation epoch (stage 4).

  Args:
    ctx: the run context.
    backbone: ``{'params': θ, 'batch_stats': backbone statistics}`` to start from.
    splits: ``{'train', 'validation', ...}`` datasets.
    lr: base learning rate of the cosine schedule.
    weight_decay: coupled weight decay.
    epochs: training epochs.
    seed: seed of the head initialisation, data order and augmentation (equal for
      both pipelines of one comparison seed).
    name: label for logs.
    directory: if given, resumable checkpoints go to ``<directory>/ckpt`` every
      ``config.checkpoint_every`` epochs; None (search trials) saves nothing.
    stop_on_nonfinite: on divergence, stop and return the best epoch so far (its
      score is -inf if no epoch finished) instead of raising; for search trials,
      whose sampled learning rates can be too large.

  Returns:
    A :class:`FinetuneResult`.

  Raises:
    NonFiniteError: the parameters diverged (unless ``stop_on_nonfinite``).
  """
  cfg = ctx.config.finetune
  train_set = splits["train"]
  spe = check_size(len(train_set), cfg.batch_size, "finetune.batch_size",
                   "the downstream training split")
  tx = sgd_with_hyperparams(cfg.momentum)
  step_fn = ctx.cached(("finetune_step", cfg.momentum), lambda: jax.jit(functools.partial(
      _finetune_step, ctx.model, tx, ctx.image_size, ctx.multilabel)))
  params = {"backbone": backbone["params"], "downstream_head": fresh_head(ctx, seed)}
  state = TrainState(params, backbone["batch_stats"], tx.init(params))
  best = {"params": params, "batch_stats": backbone["batch_stats"]}
  record = {"epoch": 0, "best_score": -math.inf, "best_loss": math.inf, "best_epoch": -1}
  data_seed = derive_seed(seed, "finetune_data")
  stack = new_stack(len(train_set), cfg.batch_size, seed=data_seed)
  ckpt = checkpoint.RunCheckpointer(os.path.join(directory, "ckpt")) if directory else None
  if ckpt is not None and ckpt.latest_step() is not None:
    (state, best), extra = ckpt.restore((state, best))
    record = extra["record"]
    stack = new_stack(len(train_set), cfg.batch_size, seed=data_seed, state=extra["stack"])
  state = ctx.replicate(state)
  # Cosine from lr to 0 over all steps, evaluated on the host (one executable for any lr).
  schedule = optim.cosine_schedule(1.0, total_steps=epochs * spe, final_ratio=0.0)
  base_key = jax.random.key(derive_seed(seed, "finetune_aug"))
  wd = jnp.float32(weight_decay)
  progress = plog.Progress(epochs * spe, name, initial=record["epoch"] * spe,
                           items_per_step=cfg.batch_size)
  try:
    for epoch in range(record["epoch"], epochs):
      rows = stack.take(spe)
      for i in range(spe):
        step = epoch * spe + i
        batch = ctx.shard(train_set.batch(rows[i]))
        state, m = step_fn(state, batch["image"], batch["label"],
                           jax.random.fold_in(base_key, step),
                           jnp.float32(lr * float(schedule(step))), wd)
        if (step + 1) % ctx.config.log_every == 0:
          ctx.logger.write(name, step + 1, m)
        progress.update(1)
      if nonfinite(optax.tree.norm(state.params)):
        if stop_on_nonfinite:
          print(f"[{name}] diverged in epoch {epoch} (lr={lr:.3g}); keeping epoch "
                f"{record['best_epoch']}", flush=True)
          break
        raise ts.NonFiniteError(
            f"Non-finite parameters after fine-tuning epoch {epoch} of {name} (lr={lr:.3g}); "
            f"nothing was saved. Lower the fine-tuning learning rate.")
      val = evaluate(ctx, state.params, state.batch_stats, splits["validation"])
      ctx.logger.write(name + "/val", epoch + 1, val)
      record["epoch"] = epoch + 1
      if val["score"] > record["best_score"]:
        record.update(best_score=val["score"], best_loss=val["loss"], best_epoch=epoch + 1)
        best = {"params": state.params, "batch_stats": state.batch_stats}
      if ckpt is not None and (epoch + 1) % ctx.config.checkpoint_every == 0 \
          and epoch + 1 < epochs:
        ckpt.save(epoch + 1, (state, best), {"record": record, "stack": stack_to_json(stack)})
  finally:
    progress.close()
    if ckpt is not None:
      ckpt.close()
  return FinetuneResult(best["params"], best["batch_stats"], float(record["best_score"]),
                        float(record["best_loss"]), int(record["best_epoch"]))
