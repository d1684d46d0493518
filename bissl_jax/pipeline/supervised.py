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
* **Evaluation**: the evaluation view (resize to ``size/0.875`` + centre crop),
  BatchNorm in evaluation mode; metrics over the whole split at once
  (``bissl_jax.evaluation.metrics``).

A fresh head (warm-up, fine-tuning) is drawn from the seed and then given what
the task takes from the pretext head φ_P of the model the stage starts from
(``DownstreamTask.head_from_pretext``: detection's res5 box head from the pretext
ResNet's tail, as detectron2's R50-C4; classification takes nothing), so the stages
receive that φ_P as ``pretext_head``.

Both stages respect ``Model.trainable`` (parameter-efficient fine-tuning of a LoRA
ViT): the optimizer is :func:`bissl_jax.core.partition.level_optimizer` over the mask,
gradients are formed for trainable leaves only, and frozen leaves (the base weights
under the adapters) get no optimizer state and are carried over unchanged, bit for
bit. Without a mask every leaf trains, as before.

Inputs, losses and logits come from the run's downstream task (``ctx.downstream``,
a :class:`bissl_jax.core.protocols.DownstreamTask`), the same one BiSSL's upper level
differentiates; each reads the batch entry its ``input_key`` names (images, or
tokens for a GPT's :class:`bissl_jax.tasks.downstream.text.TextTask`), and a text run scores
with ``ctx.scorer`` (the GLUE metrics). The optimizer is ``head_warmup.optimizer`` /
``finetune.optimizer`` (SGD as above, or Adam for GPT with a linear warm-up over
``finetune.warmup_fraction`` of the steps). The loops are
:func:`bissl_jax.pipeline.stage_loop.run_stage`.

The learning rate and weight decay enter the compiled step as arguments
(``optax.inject_hyperparams``), so the random search's trials, both pipelines and
all seeds share one executable.
"""
import functools
import math
import os
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from bissl_jax.tasks.downstream import classification as downstream_lib
from bissl_jax.evaluation import metrics as metrics_lib
from bissl_jax.core import optim
from bissl_jax.runtime import mesh as parallel
from bissl_jax.core import partition
from bissl_jax.core import protocols
from bissl_jax.pipeline import provenance
from bissl_jax.pipeline import stage_loop
from bissl_jax.pipeline.context import StageContext, check_size
from bissl_jax.core.state import LevelState
from bissl_jax.data import process_shard
from bissl_jax.runtime.errors import NonFiniteError
from bissl_jax.runtime.seeds import derive_seed
from bissl_jax.types import PyTree



class FinetuneResult(NamedTuple):
  """A fine-tuned model (best validation epoch) and its scores."""
  params: PyTree          # {'backbone', 'downstream_head'}
  batch_stats: PyTree     # {'backbone'}
  val_score: float        # best validation top-1 (or mAP)
  val_loss: float         # validation loss at that epoch
  best_epoch: int


def optimizer_with_hyperparams(name: str, momentum: float, params: Optional[PyTree] = None,
                               trainable: Optional[PyTree] = None
                               ) -> optax.GradientTransformation:
  """The optimizer ``name`` (``optim.by_name``) whose LR and weight decay are set at every step.

  'sgd' (the paper): SGD + coupled weight decay; 'adam' (GPT): Adam with decoupled
  weight decay off biases and norms. With ``params`` (a tree of top-level groups),
  one optimizer per group through :func:`bissl_jax.core.partition.level_optimizer`:
  leaves ``trainable`` marks False get no update, no decay and no state.
  """
  def make(learning_rate, weight_decay):
    tx = optim.by_name(name, learning_rate, weight_decay=weight_decay, momentum=momentum)
    if params is None:
      return tx
    return partition.level_optimizer({g: tx for g in params}, params, trainable)

  return optax.inject_hyperparams(make)(learning_rate=0.0, weight_decay=0.0)


def _with_hyperparams(opt_state, lr, weight_decay):
  hp = dict(opt_state.hyperparams, learning_rate=lr, weight_decay=weight_decay)
  return opt_state._replace(hyperparams=hp)


def _masked_step(tx, mask, state: LevelState, loss_fn, lr, weight_decay):
  """One update of the trainable leaves of ``state.params``; frozen ones stay as they are.

  ``loss_fn(params) -> (loss, batch_stats)`` is differentiated in the trainable
  leaves only (the frozen ones are closed over).
  """
  train, frozen = partition.split(state.params, mask)
  (loss, stats), grads = jax.value_and_grad(
      lambda t: loss_fn(partition.merge(t, frozen)), has_aux=True)(train)
  opt_state = _with_hyperparams(state.opt_state, lr, weight_decay)
  updates, opt_state = tx.update(partition.zeros_for_frozen(grads, frozen), opt_state,
                                 state.params)
  moved, _ = partition.split(optax.apply_updates(state.params, updates), mask)
  new = LevelState(partition.merge(moved, frozen), stats, opt_state, state.step + 1)
  return new, loss, optax.tree.norm(grads)


def _finetune_step(task, tx, mask, state: LevelState, images, labels, rng, lr, weight_decay):
  x = task.prepare(rng, images, train=True)

  def loss_fn(params):
    return task.loss(params["backbone"], params["downstream_head"], state.batch_stats, x,
                     labels, train=True)

  state, loss, grad_norm = _masked_step(tx, mask, state, loss_fn, lr, weight_decay)
  return state, {"loss": loss, "grad_norm": grad_norm}


def _head_step(task, tx, mask, state: LevelState, backbone, images, labels, rng, lr,
               weight_decay):
  """Warm-up step: frozen backbone in evaluation mode, only the head moves."""
  x = task.prepare(rng, images, train=True)

  def loss_fn(params):  # differentiated in the head only: the backbone is a constant here
    loss = task.loss(backbone["params"], params["downstream_head"], backbone["batch_stats"],
                     x, labels, train=False)[0]
    return loss, state.batch_stats

  state, loss, _ = _masked_step(tx, mask, state, loss_fn, lr, weight_decay)
  return state, {"loss": loss}


def level_optimizer(ctx: StageContext, name: str, momentum: float, params: PyTree):
  """``(tx, trainable mask)`` of a warm-up or fine-tuning tree under ``ctx.model``."""
  mask = protocols.trainable_mask(ctx.model, params)
  return optimizer_with_hyperparams(name, momentum, params, mask), mask


def _eval_logits(task, params, batch_stats, images):
  x = task.prepare(None, images, train=False)
  return task.logits(params["backbone"], params["downstream_head"], batch_stats, x)


def predict(ctx: StageContext, params: PyTree, batch_stats: PyTree, dataset):
  """Logits ``(N, C)`` of the whole ``dataset`` in evaluation mode (float64), or the
  tree of per-example outputs a task's ``logits`` returns (detection: its fixed-size
  detections, each leaf ``(N, ...)`` in its own dtype).

  The last batch is padded to the fixed evaluation batch size (one compiled shape)
  and the padding dropped. Each process feeds its rows of every batch
  (``bissl_jax.data.process_shard``) and receives all the logits.
  """
  fn = ctx.cached(("eval_logits",), lambda: jax.jit(
      functools.partial(_eval_logits, ctx.downstream)))
  bs = ctx.config.evaluate.batch_size
  params, batch_stats = ctx.replicate((params, batch_stats))
  key = protocols.input_key(ctx.downstream)
  first, rows = process_shard(bs)
  out = []
  for start in range(0, len(dataset), bs):
    idx = np.arange(start, min(start + bs, len(dataset)))
    padded = np.concatenate([idx, np.zeros(bs - len(idx), idx.dtype)])[first:first + rows]
    logits = fn(params, batch_stats, ctx.shard(dataset.batch(padded)[key]))
    out.append(jax.tree_util.tree_map(lambda x: parallel.to_host(x)[:len(idx)], logits))
  if isinstance(out[0], np.ndarray):
    return np.concatenate(out).astype(np.float64)
  return jax.tree_util.tree_map(lambda *xs: np.concatenate(xs), *out)


def evaluate(ctx: StageContext, params: PyTree, batch_stats: PyTree, dataset) -> dict:
  """The paper's metrics on ``dataset`` plus the loss.

  Returns:
    ``{'top1', 'top5', 'score', 'loss', 'nonfinite'}``, or ``{'map', 'score', 'loss',
    'nonfinite'}`` for multi-label sets, or what ``ctx.scorer`` gives (text: the GLUE
    metric and accuracy) with 'nonfinite'; 'score' is the model-selection metric and
    'nonfinite' the number of predictions with a NaN or infinite output (counted
    wrong; see :func:`check_evaluation`).
  """
  logits = predict(ctx, params, batch_stats, dataset)
  if ctx.scorer is not None:
    out = ctx.scorer(logits, dataset.labels)
  else:
    out = metrics_lib.classification_metrics(
        logits, dataset.labels, multilabel=ctx.multilabel,
        ignore=getattr(dataset, "difficult", None))
    out["loss"] = float(downstream_lib.classification_loss(
        jnp.asarray(logits), jnp.asarray(dataset.labels), ctx.multilabel))
  if "nonfinite" not in out:  # a scorer of tree outputs (detection) counts its own
    out["nonfinite"] = metrics_lib.nonfinite_rows(logits)
  return out


def nonfinite_evaluation(scores: dict) -> Optional[str]:
  """What is non-finite in an evaluation of :func:`evaluate` (None: all finite)."""
  bad = [k for k in ("score", "loss") if k in scores and not math.isfinite(float(scores[k]))]
  parts = ([f"{scores['nonfinite']} non-finite predictions"] if scores.get("nonfinite")
           else []) + [f"{k} {float(scores[k])}" for k in bad]
  return ", ".join(parts) or None


def check_evaluation(scores: dict, where: str, fix: str = "", field: Optional[str] = None
                     ) -> None:
  """Raises NonFiniteError when an evaluation holds a non-finite prediction, score or loss.

  A diverged model's scores are never reported (its NaN outputs would be counted
  wrong, but a table of them is no result).
  """
  found = nonfinite_evaluation(scores)
  if found:
    raise NonFiniteError(f"The model diverged: {where} has {found}; nothing of it was "
                         f"recorded. {fix}".rstrip(), field=field)


def fresh_head(ctx: StageContext, seed: int, pretext_head: Optional[PyTree] = None
               ) -> PyTree:
  """A newly initialised head (the same initialisation for both pipelines of one seed).

  A task that takes part of its head from the pretext head φ_P (detection: res5 from
  ``pretext_head['backbone_tail']``) does so here (:func:`protocols.head_from_pretext`);
  classification ignores ``pretext_head``.
  """
  head = ctx.init_variables(jax.random.key(derive_seed(seed, "fresh_head")))[0][
      "downstream_head"]
  return protocols.head_from_pretext(ctx.downstream, head, pretext_head)


def stage_provenance(ctx, section: str, exclude=(), inputs=None, **values
                     ) -> provenance.Provenance:
  """What a warm-up or fine-tuning result depends on: its section, model, data, inputs.

  Args:
    ctx: the run context.
    section: ``'head_warmup'`` or ``'finetune'``.
    exclude: fields of ``section`` given as ``values`` instead (arguments such as
      the search's learning rate).
    inputs: ``{name: digest}`` of the backbone it starts from.
    **values: further values (``seed``, ``lr``, ...).
  """
  fields = provenance.config_fields(
      ctx.config, (section, "model", "data"),
      exclude=[f"{section}.{k}" for k in tuple(exclude) + ("init_checkpoint",)]
      + list(provenance.FEED_FIELDS))
  if protocols.takes_head_from_pretext(ctx.downstream):  # absent for classification
    fields["downstream_head_init"] = "from_pretext_head"
  fields.update(values)
  return provenance.Provenance(fields, dict(inputs or {}))


def finetune_provenance(ctx, *, lr: float, weight_decay: float, epochs: int, seed: int,
                        inputs=None) -> provenance.Provenance:
  """:func:`stage_provenance` of fine-tuning: the LR and weight decay actually used."""
  # lr/weight_decay are arguments (search trials, Table 3 vs Table 5): record those.
  return stage_provenance(
      ctx, "finetune", exclude=("lr", "weight_decay", "bissl_lr", "bissl_weight_decay",
                                "epochs"), inputs=inputs,
      lr=float(lr), weight_decay=float(weight_decay), epochs=int(epochs), seed=int(seed))


def warmup_head(ctx: StageContext, backbone: dict, train_set, *, seed: int, name: str,
                directory: Optional[str] = None,
                prov: Optional[provenance.Provenance] = None,
                pretext_head: Optional[PyTree] = None) -> PyTree:
  """Fits the linear head on the frozen backbone (stage 2).

  Args:
    ctx: the run context.
    backbone: ``{'params': θ, 'batch_stats': backbone statistics}``.
    train_set: the downstream training ``ArrayDataset``.
    seed: seed of the head initialisation, data order and augmentation.
    name: label for logs.
    directory: if given, resumable checkpoints go to ``<directory>/ckpt`` every
      ``config.checkpoint_every`` epochs and on interrupt.
    prov: the stage's provenance (default: config fields and seed, no inputs).
    pretext_head: φ_P of the pretext model, for :func:`fresh_head`.

  Returns:
    The warmed-up head parameters.
  """
  cfg = ctx.config.head_warmup
  spe = check_size(len(train_set), cfg.batch_size, "head_warmup.batch_size",
                   "the downstream training split")
  head = {"downstream_head": fresh_head(ctx, seed, pretext_head)}
  tx, mask = level_optimizer(ctx, cfg.optimizer, cfg.momentum, head)
  step_fn = ctx.cached(("head_step", cfg.optimizer, cfg.momentum), lambda: jax.jit(
      functools.partial(_head_step, ctx.downstream, tx, mask)))
  frozen = ctx.replicate(backbone)
  base_key = jax.random.key(derive_seed(seed, "warmup_aug"))
  lr, wd = jnp.float32(cfg.lr), jnp.float32(cfg.weight_decay)  # constant LR (paper)
  key = protocols.input_key(ctx.downstream)

  def step(state, i, batch):
    batch = ctx.shard(batch)
    return step_fn(state, frozen, batch[key], batch["label"],
                   jax.random.fold_in(base_key, i), lr, wd)

  stage = stage_loop.Stage(
      # A fraction of an epoch is allowed (the thesis's GLUE warm-up: 10% or 50%).
      name=name, total_steps=max(1, int(round(cfg.epochs * spe))), step=step,
      data=stage_loop.epoch_data(train_set, cfg.batch_size, seed=derive_seed(seed, "warmup_data"),
                                 steps_per_epoch=spe,
                                 total_steps=max(1, int(round(cfg.epochs * spe))),
                                 **ctx.device_feed()),
      logger=ctx.logger, log_every=ctx.config.log_every, steps_per_epoch=spe,
      checkpoint_dir=os.path.join(directory, "ckpt") if directory else None,
      checkpoint_every=ctx.config.checkpoint_every,
      fingerprint=(prov or stage_provenance(ctx, "head_warmup", seed=seed)).fingerprint(),
      reuse=ctx.config.get("reuse", "recompute"),
      place=ctx.replicate,
      params_to_check=lambda s: {"head warm-up parameters": (
          s.params, "Lower config.head_warmup.lr.")},
      loss_fix="Lower config.head_warmup.lr.", items_per_step=cfg.batch_size)
  fresh = LevelState(head, {}, tx.init(head), jnp.zeros((), jnp.int32))
  return stage_loop.run_stage(stage, fresh).state.params["downstream_head"]


def _checked_finetune_state(state: dict) -> dict:
  """All of a fine-tuning state that must be finite: the record only once it holds an
  epoch (before, its best score and loss are the -inf/inf of "none yet")."""
  record = state["record"]
  return {"level": state["level"], "best": state["best"],
          "record": dict(record) if int(np.asarray(record["best_epoch"])) >= 0 else {}}


def finetune(ctx: StageContext, backbone: dict, splits: dict, *, lr: float,
             weight_decay: float, epochs: int, seed: int, name: str,
             directory: Optional[str] = None, stop_on_nonfinite: bool = False,
             inputs: Optional[dict] = None,
             pretext_head: Optional[PyTree] = None) -> FinetuneResult:
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
      ``config.checkpoint_every`` epochs and on interrupt; None (search trials)
      saves nothing.
    stop_on_nonfinite: on divergence, stop and return the best epoch so far (its
      score is -inf if no epoch finished) instead of raising; for search trials,
      whose sampled learning rates can be too large.
    inputs: ``{name: digest}`` of the backbone (part of the checkpoints' fingerprint).
    pretext_head: φ_P of the model ``backbone`` comes from, for :func:`fresh_head`.

  Returns:
    A :class:`FinetuneResult`.

  Raises:
    NonFiniteError: the loss or parameters diverged (unless ``stop_on_nonfinite``).
  """
  cfg = ctx.config.finetune
  train_set = splits["train"]
  spe = check_size(len(train_set), cfg.batch_size, "finetune.batch_size",
                   "the downstream training split")
  params = {"backbone": backbone["params"],
            "downstream_head": fresh_head(ctx, seed, pretext_head)}
  tx, mask = level_optimizer(ctx, cfg.optimizer, cfg.momentum, params)
  step_fn = ctx.cached(("finetune_step", cfg.optimizer, cfg.momentum), lambda: jax.jit(
      functools.partial(_finetune_step, ctx.downstream, tx, mask)))
  fresh = {
      "level": LevelState(params, backbone["batch_stats"], tx.init(params),
                          jnp.zeros((), jnp.int32)),
      "best": {"params": params, "batch_stats": backbone["batch_stats"]},
      "record": {"best_score": -math.inf, "best_loss": math.inf, "best_epoch": -1}}
  # Cosine from lr to 0 over all steps (after a linear warm-up over
  # finetune.warmup_fraction of them, GPT's), evaluated on the host (one executable
  # for any lr).
  schedule = optim.warmup_cosine_schedule(
      1.0, warmup_steps=int(round(cfg.warmup_fraction * epochs * spe)),
      total_steps=epochs * spe, final_ratio=0.0)
  base_key = jax.random.key(derive_seed(seed, "finetune_aug"))
  wd = jnp.float32(weight_decay)
  key = protocols.input_key(ctx.downstream)

  def step(state, i, batch):
    batch = ctx.shard(batch)
    level, metrics = step_fn(state["level"], batch[key], batch["label"],
                             jax.random.fold_in(base_key, i),
                             jnp.float32(lr * float(schedule(i))), wd)
    return dict(state, level=level), metrics

  def end_of_epoch(state, epoch):
    level = state["level"]
    val = evaluate(ctx, level.params, level.batch_stats, splits["validation"])
    ctx.logger.write(name + "/val", epoch, val)
    # Finite parameters can still give NaN outputs (infinite BatchNorm statistics).
    check_evaluation(val, f"the validation of epoch {epoch} of {name}", fix, field)
    if val["score"] <= state["record"]["best_score"]:
      return state
    return dict(state, best={"params": level.params, "batch_stats": level.batch_stats},
                record={"best_score": float(val["score"]), "best_loss": float(val["loss"]),
                        "best_epoch": int(epoch)})

  def keep_best(state, err):
    print(f"[{name}] diverged (lr={lr:.3g}): {err} Keeping epoch "
          f"{state['record']['best_epoch']}.", flush=True)

  field = "finetune.bissl_lr" if "bissl" in name else "finetune.lr"  # after BiSSL: its own
  fix = f"Lower the fine-tuning learning rate (lr={lr:.3g}: config.{field})."
  stage = stage_loop.Stage(
      name=name, total_steps=epochs * spe, step=step,
      data=stage_loop.epoch_data(train_set, cfg.batch_size, seed=derive_seed(seed, "finetune_data"),
                                 steps_per_epoch=spe, total_steps=epochs * spe,
                                 **ctx.device_feed()),
      logger=ctx.logger, log_every=ctx.config.log_every, steps_per_epoch=spe,
      end_of_epoch=end_of_epoch,
      checkpoint_dir=os.path.join(directory, "ckpt") if directory else None,
      checkpoint_every=ctx.config.checkpoint_every,
      fingerprint=finetune_provenance(ctx, lr=lr, weight_decay=weight_decay, epochs=epochs,
                                      seed=seed, inputs=inputs).fingerprint(),
      reuse=ctx.config.get("reuse", "recompute"),
      place=lambda s: dict(s, level=ctx.replicate(s["level"])),
      params_to_check=lambda s: {"fine-tuning parameters": (s["level"].params, fix, field)},
      state_to_check=_checked_finetune_state,
      loss_fix=fix, on_divergence=keep_best if stop_on_nonfinite else None,
      show={}, items_per_step=cfg.batch_size)
  state = stage_loop.run_stage(stage, fresh).state
  best, record = state["best"], state["record"]
  return FinetuneResult(best["params"], best["batch_stats"], float(record["best_score"]),
                        float(record["best_loss"]), int(record["best_epoch"]))
