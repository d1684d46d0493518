"""Stage 1: pretext pretraining of the backbone and pretext head (paper §4.2.1).

LARS (trust coefficient 0.001, momentum 0.9, weight decay on matrices only) with a
linear warm-up over ``pretext.warmup_epochs`` epochs to ``pretext.lr``, then a cosine
to 0.001·LR at the last step; BYOL's EMA target follows every step. The LR is the
peak value itself (no batch-size scaling). Each epoch is one pass over a fresh
permutation (the remainder batch is dropped). The inputs of each step come from the
pretext task's own ``prepare`` (SimCLR/BYOL: two augmented views), so any pretext
task plugs in.

Outputs ``<directory>/output``: ``{'params': {'backbone', 'pretext_head'},
'batch_stats': {'backbone', 'pretext_head'}}``.

A ViT with LoRA (``model.lora_rank > 0``) is pretrained *without* its adapters, so
every base weight trains (:func:`bissl_jax.pipeline.context.pretraining_context`);
the output holds the base model (the official MAE layout, no LoRA leaves), and
:func:`pretrain` returns it in the LoRA model's tree with fresh adapters (B = 0: the
same function), whose base the later stages keep frozen. Resumable from ``<directory>/ckpt``
(every ``config.checkpoint_every`` epochs, and on interrupt); the loop is
:func:`bissl_jax.pipeline.stage_loop.run_stage`.
"""
import functools
import os
from typing import Optional, Tuple

import jax
import jax.numpy as jnp
import optax

from bissl_jax.core import optim
from bissl_jax.core import partition
from bissl_jax.core import protocols
from bissl_jax.convert import stage_output
from bissl_jax.pipeline import provenance
from bissl_jax.pipeline import stage_loop
from bissl_jax.pipeline import context as context_lib
from bissl_jax.pipeline.context import StageContext, check_size
from bissl_jax.core.state import LevelState
from bissl_jax.runtime.seeds import derive_seed
from bissl_jax.types import PyTree

# Pretext fields that do not change the computation of this stage.
_FREE_PRETEXT_FIELDS = ("checkpoint", "share_across_seeds", "baseline_epochs", "epochs")


def pretext_optimizer(cfg, steps_per_epoch: int, epochs: int, params: Optional[PyTree] = None,
                      trainable: Optional[PyTree] = None) -> optax.GradientTransformation:
  """``config.pretext.optimizer`` on a warm-up + cosine schedule over ``epochs``.

  'lars' (the default), 'sgd' (GeSSL, Appendix C) or Adam (GPT), from
  :func:`bissl_jax.core.optim.by_name`. With ``params`` (the ``{'backbone',
  'pretext_head'}`` tree) it is one transform per group through
  :func:`bissl_jax.core.partition.level_optimizer`, so leaves that ``trainable`` marks
  False (a ViT's fixed sin-cos position tables, a LoRA base) get no update, no weight
  decay and no state.
  """
  schedule = optim.warmup_cosine_schedule(
      cfg.lr, warmup_steps=cfg.warmup_epochs * steps_per_epoch,
      total_steps=epochs * steps_per_epoch)
  tx = optim.by_name(cfg.optimizer, schedule, weight_decay=cfg.weight_decay,
                     momentum=cfg.momentum)
  if params is None:
    return tx
  return partition.level_optimizer({g: tx for g in params}, params, trainable)


def _train_step(task, tx, state: dict, images, rng) -> Tuple[dict, dict]:
  """One pretext step; ``state`` is ``{'level': LevelState, 'target': EMA target or None}``."""
  level, target = state["level"], state["target"]
  inputs = task.prepare(rng, images)
  grad_fn = jax.value_and_grad(task.loss, has_aux=True)
  (loss, aux), grads = grad_fn(level.params, level.batch_stats, inputs, target)
  updates, opt_state = tx.update(grads, level.opt_state, level.params)
  params = optax.apply_updates(level.params, updates)
  if task.has_target:
    target = task.update_target(target, params, aux["batch_stats"])
  metrics = dict(aux["metrics"], loss=loss, grad_norm=optax.tree.norm(grads))
  return {"level": LevelState(params, aux["batch_stats"], opt_state, level.step + 1),
          "target": target}, metrics


def _pretext_groups(params):
  return {"backbone": params["backbone"], "pretext_head": params["pretext_head"]}


def _with_task_leaves(task, params, seed: int):
  """``params`` plus the leaves the task adds (optional ``task.init_head``: GeSSL's
  task classifier), initialised from their own seed, so the model's leaves are the
  same with or without them."""
  init_head = getattr(task, "init_head", None)
  if init_head is None:
    return params
  return init_head(jax.random.key(derive_seed(seed, "pretext_task_head")), params)


def _trainable(model, task, params):
  # The task's own trainable mask where it has one (GeSSL: the model's mask on the
  # model's leaves, True on the task classifier).
  fn = getattr(task, "trainable", None)
  return fn(params) if fn is not None else protocols.trainable_mask(model, params)


def init_pretext_state(ctx: StageContext, tx, seed: int) -> dict:
  """A fresh model (random init from ``seed``), optimizer state and BYOL target."""
  params, batch_stats = ctx.init_variables(jax.random.key(derive_seed(seed, "pretext_init")))
  params = _with_task_leaves(ctx.task, _pretext_groups(params), seed)
  target = ctx.task.init_target(params, batch_stats) if ctx.task.has_target else None
  return {"level": LevelState(params, batch_stats, tx.init(params), jnp.zeros((), jnp.int32)),
          "target": target}


def stage_provenance(ctx: StageContext, seed: int, epochs: int, num_examples: int
                     ) -> provenance.Provenance:
  """What determines a pretext output: pretext, model and data fields (and GeSSL's,
  when it is on), epochs, seed."""
  groups = ("pretext", "model", "data") + (
      ("gessl",) if context_lib.uses_gessl(ctx.config) else ())
  fields = provenance.config_fields(
      ctx.config, groups,
      exclude=[f"pretext.{k}" for k in _FREE_PRETEXT_FIELDS] + list(provenance.FEED_FIELDS))
  fields.update({"epochs": int(epochs), "seed": int(seed), "data.pretext_examples":
                 int(num_examples)})
  return provenance.Provenance(fields)


def pretrain(ctx: StageContext, dataset, *, seed: int, directory: str,
             epochs: Optional[int] = None, name: Optional[str] = None
             ) -> Tuple[PyTree, PyTree]:
  """Runs (or resumes, or loads the finished output of) pretext pretraining.

  Args:
    ctx: the run context.
    dataset: the pretext ``ArrayDataset`` (labels unused).
    seed: seed of the initialisation, data order and augmentation.
    directory: stage directory (``output`` and ``ckpt`` live inside).
    epochs: training epochs (default ``config.pretext.epochs``).
    name: label for logs (default ``pretext/seed<seed>``); each run of a workdir needs
      its own.

  Returns:
    ``(params, batch_stats)``, each ``{'backbone', 'pretext_head'}``, in the tree of
    ``ctx.model`` (with fresh LoRA adapters from ``seed`` when it has them).

  Raises:
    NonFiniteError: the loss or the parameters became NaN/Inf (nothing of it is saved).
  """
  out_dir = os.path.join(directory, "output")
  epochs = ctx.config.pretext.epochs if epochs is None else int(epochs)
  name = name or f"pretext/seed{seed}"
  prov = stage_provenance(ctx, seed, epochs, len(dataset))
  if provenance.reusable(out_dir, prov, mode=ctx.config.get("reuse", "recompute"), name=name):
    variables, _ = stage_output.load_export(out_dir)
  else:
    variables = _pretrain(context_lib.pretraining_context(ctx), dataset, seed=seed,
                          out_dir=out_dir, directory=directory, epochs=epochs, name=name,
                          prov=prov)
  return context_lib.with_fresh_adapters(ctx, variables["params"], variables["batch_stats"],
                                         seed)


def _pretrain(ctx: StageContext, dataset, *, seed: int, out_dir: str, directory: str,
              epochs: int, name: str, prov: provenance.Provenance) -> dict:
  """Stage 1 on ``ctx.model``; exports and returns ``{'params', 'batch_stats'}``."""
  cfg = ctx.config.pretext
  spe = check_size(len(dataset), cfg.batch_size, "pretext.batch_size",
                   f"the pretext set {ctx.config.data.pretext_dataset}")
  template = jax.eval_shape(lambda: _with_task_leaves(ctx.task, _pretext_groups(
      ctx.model.init(jax.random.key(0), ctx.image_size)[0]), 0))
  tx = pretext_optimizer(cfg, spe, epochs, template,
                         _trainable(ctx.model, ctx.task, template))
  schedule_key = (cfg.optimizer, cfg.lr, cfg.weight_decay, cfg.momentum, cfg.warmup_epochs,
                  epochs, spe)
  step_fn = ctx.cached(("pretext_step", schedule_key), lambda: jax.jit(
      functools.partial(_train_step, ctx.task, tx), donate_argnums=0))
  base_key = jax.random.key(derive_seed(seed, "pretext_aug"))
  key = protocols.input_key(ctx.task)  # 'image', or 'tokens' for text

  def step(state, i, batch):
    return step_fn(state, ctx.shard(batch[key]), jax.random.fold_in(base_key, i))

  stage = stage_loop.Stage(
      name=name, total_steps=epochs * spe, step=step,
      data=stage_loop.epoch_data(dataset, cfg.batch_size, seed=derive_seed(seed, "pretext_data"),
                                 steps_per_epoch=spe, total_steps=epochs * spe,
                                 **ctx.device_feed()),
      logger=ctx.logger, log_every=ctx.config.log_every, steps_per_epoch=spe,
      checkpoint_dir=os.path.join(directory, "ckpt"),
      checkpoint_every=ctx.config.checkpoint_every,
      fingerprint=prov.fingerprint(), reuse=ctx.config.get("reuse", "recompute"),
      place=ctx.replicate,
      params_to_check=lambda s: {"pretext parameters": (
          s["level"].params, "Lower config.pretext.lr (or check the data for NaN/Inf).")},
      loss_fix="Check the data for NaN/Inf, or lower config.pretext.lr.",
      items_per_step=cfg.batch_size)
  state = stage_loop.run_stage(stage, init_pretext_state(ctx, tx, seed)).state["level"]
  stage_output.export(out_dir, {"params": state.params, "batch_stats": state.batch_stats}, {
      "stage": "pretext", "seed": seed, "task": cfg.task,
      "gessl": context_lib.uses_gessl(ctx.config), "arch": ctx.config.model.arch,
      "dataset": ctx.config.data.pretext_dataset, "epochs": epochs,
      "image_size": ctx.image_size,
      provenance.RECORD_KEY: provenance.with_lineage(prov, directory).record()})
  return {"params": state.params, "batch_stats": state.batch_stats}


def load_vit_pretext_model(ctx: StageContext, path: str, seed: int = 0):
  """A ViT's pretext weights from a stage output or an official MAE ``.pth`` file.

  ``.pth`` files go through :func:`bissl_jax.convert.mae.mae_to_flax`, which checks
  the architecture, image size and every tensor before anything is built; a missing
  decoder is freshly initialised. LoRA adapters are fresh (from ``seed``).

  Returns:
    ``(params, batch_stats)``, each ``{'backbone', 'pretext_head'}``, in the tree of
    ``ctx.model``.
  """
  from bissl_jax.convert import mae as convert_mae  # pylint: disable=g-import-not-at-top
  if stage_output.is_export(path):
    variables, _ = stage_output.load_export(path)
    params, stats = variables["params"], variables["batch_stats"]
  elif os.path.isfile(path):
    m = ctx.config.model
    params = convert_mae.mae_to_flax(path, arch=m.arch, image_size=ctx.image_size,
                                     decoder_heads=m.decoder_heads)
    stats = {}
  else:
    raise FileNotFoundError(
        f"config.pretext.checkpoint={path!r} is neither a stage output directory nor an MAE "
        f".pth file; pass mae_pretrain_vit_*_full.pth or a <workdir>/.../pretext/output.")
  return context_lib.with_fresh_adapters(ctx, params, stats, seed)
