"""The baseline-vs-BiSSL comparison (BiSSL paper Fig. 1, §4.2) and the stage chains it is made of.

For every seed in ``config.seeds``: pretext pretraining → baseline fine-tuning →
test evaluation, and head warm-up → BiSSL → fine-tuning from θ_P → test evaluation.
Both pipelines of a seed start from the same pretext model and fine-tune with the
same budget, fresh-head initialisation and data order. With ``search.enabled`` the
fine-tuning LR and weight decay of each pipeline are first chosen by random search
on validation (on the first seed's models).

Each helper here resumes from, or skips to, what its directory already holds.
"""
import dataclasses
import os
from typing import Callable, Optional

import jax

from bissl_jax import config_validation
from bissl_jax import convert
from bissl_jax.convert import stage_output
from bissl_jax.pipeline import bissl_stage
from bissl_jax.pipeline import provenance
from bissl_jax.pipeline import results as results_lib
from bissl_jax.pipeline import search as search_lib
from bissl_jax.pipeline import supervised
from bissl_jax.pipeline import context as context_lib
from bissl_jax.pipeline.context import StageContext
from bissl_jax.pipeline.pretrain import load_vit_pretext_model, pretrain
from bissl_jax.runtime.seeds import derive_seed


def load_pretext_model(ctx: StageContext, path: str, seed: int = 0):
  """``(params, batch_stats)`` ({'backbone', 'pretext_head'}) from ``path``.

  A stage output, a converted directory or PyTorch ``.pth`` files
  (:func:`bissl_jax.convert.load_pretext_model`); missing pretext heads are freshly
  initialised. For a ViT: a stage output or an official MAE ``.pth``
  (:func:`bissl_jax.pipeline.pretrain.load_vit_pretext_model`), with fresh LoRA
  adapters from ``seed``.
  """
  if context_lib.is_vit(ctx.config):
    return load_vit_pretext_model(ctx, path, seed)
  if context_lib.is_text(ctx.config):
    return load_gpt_pretext_model(ctx, path)
  m = ctx.config.model
  fresh_params, fresh_stats = ctx.init_variables(jax.random.key(0))
  return convert.load_pretext_model(
      path, arch=m.arch, cifar_stem=m.cifar_stem, width_multiplier=m.width_multiplier,
      fresh_params=fresh_params, fresh_stats=fresh_stats,
      head_specs={"projector": m.projector, "predictor": m.predictor})


def load_gpt_pretext_model(ctx: StageContext, path: str):
  """A GPT's pretext weights from a stage output or a Hugging Face ``openai-gpt`` file.

  The file (``.bin``/``.pth``/``.safetensors``) goes through
  :func:`bissl_jax.convert.gpt.load_hf_gpt`, which checks every key and shape.
  """
  from bissl_jax.convert import gpt as convert_gpt  # pylint: disable=g-import-not-at-top
  if stage_output.is_export(path):
    variables, _ = stage_output.load_export(path)
    params, stats = variables["params"], variables["batch_stats"]
  elif os.path.isfile(path):
    params, stats = convert_gpt.load_hf_gpt(path, ctx.model, ctx.downstream)
  else:
    raise FileNotFoundError(
        f"config.pretext.checkpoint={path!r} is neither a stage output directory nor a "
        f"Hugging Face openai-gpt weights file (pytorch_model.bin or model.safetensors).")
  groups = ("backbone", "pretext_head")
  return {g: params[g] for g in groups}, {g: stats.get(g, {}) for g in groups}


def pretext_model(ctx: StageContext, pretext_set, seed: int):
  """The pretext model of ``seed``: loaded from ``pretext.checkpoint`` or pretrained.

  Returns:
    ``((params, batch_stats), digest)``: the model and its provenance digest.
  """
  if ctx.config.pretext.checkpoint:
    path = ctx.config.pretext.checkpoint
    return load_pretext_model(ctx, path, seed), provenance.digest_of(path)
  directory = ctx.path(f"seed{seed}", "pretext")
  model = pretrain(ctx, pretext_set, seed=seed, directory=directory)
  return model, provenance.digest_of(os.path.join(directory, "output"))


def _reuse(ctx: StageContext) -> str:
  return ctx.config.get("reuse", "recompute")


def warmed_up_model(ctx: StageContext, pretext_vars, train_set, *, seed: int,
                    directory: str, inputs: Optional[dict] = None) -> dict:
  """Stage 2 with its exported output: the full 3-group model BiSSL starts from.

  ``inputs`` (``{'pretext': digest}``) enters its provenance.
  """
  out_dir = os.path.join(directory, "output")
  name = f"head_warmup/seed{seed}"
  prov = supervised.stage_provenance(ctx, "head_warmup", inputs=inputs, seed=seed)
  if provenance.reusable(out_dir, prov, mode=_reuse(ctx), name=name):
    return stage_output.load_export(out_dir)[0]
  params, stats = pretext_vars
  head = supervised.warmup_head(
      ctx, {"params": params["backbone"], "batch_stats": stats["backbone"]}, train_set,
      seed=seed, name=name, directory=directory, prov=prov,
      pretext_head=params["pretext_head"])
  warm = {"params": dict(params, downstream_head=head), "batch_stats": stats}
  stage_output.export(out_dir, warm, {"stage": "head_warmup", "seed": seed,
                                      "arch": ctx.config.model.arch,
                                      provenance.RECORD_KEY:
                                          provenance.with_lineage(prov, directory).record()})
  return warm


def finetune_and_evaluate(ctx: StageContext, backbone: dict, splits: dict, *, pipeline: str,
                          lr: float, weight_decay: float, seed: int, directory: str,
                          inputs: Optional[dict] = None,
                          pretext_head: Optional[dict] = None) -> dict:
  """Stages 4 and 5: fine-tune (best validation epoch kept), export, score on test.

  ``inputs`` (``{'backbone': digest}``, the digest of the whole model ``backbone``
  and ``pretext_head`` come from) enters the provenance; an output or record of
  other values is recomputed (or refused with ``config.reuse='strict'``).
  ``pretext_head`` is that model's φ_P (:func:`supervised.fresh_head`).

  Returns:
    The evaluation record: test metrics, validation score, the hyperparameters that
    produced them and their provenance.
  """
  record_path = os.path.join(directory, "evaluation.json")
  out_dir = os.path.join(directory, "output")
  name = f"finetune/{pipeline}/seed{seed}"
  prov = supervised.finetune_provenance(ctx, lr=lr, weight_decay=weight_decay,
                                        epochs=ctx.config.finetune.epochs, seed=seed,
                                        inputs=inputs)
  reuse_output = provenance.reusable(out_dir, prov, mode=_reuse(ctx), name=name,
                                     also=[record_path])
  record = results_lib.read_record(record_path, name) if reuse_output else None
  if (reuse_output and record is not None
      and (record.get(provenance.RECORD_KEY) or {}).get("digest")
      == provenance.with_lineage(prov, directory).digest):
    return record
  if reuse_output:  # fine-tuned, but stopped before the test scores
    variables, meta = stage_output.load_export(out_dir)
    params, stats = variables["params"], variables["batch_stats"]
  else:
    result = supervised.finetune(ctx, backbone, splits, lr=lr, weight_decay=weight_decay,
                                 epochs=ctx.config.finetune.epochs, seed=seed, name=name,
                                 directory=directory, inputs=inputs,
                                 pretext_head=pretext_head)
    meta = {"stage": "finetune", "pipeline": pipeline, "seed": seed, "lr": lr,
            "weight_decay": weight_decay, "val_score": result.val_score,
            "val_loss": result.val_loss, "best_epoch": result.best_epoch,
            "arch": ctx.config.model.arch,
            provenance.RECORD_KEY: provenance.with_lineage(prov, directory).record()}
    params, stats = result.params, result.batch_stats
    stage_output.export(out_dir, {"params": params, "batch_stats": stats}, meta)
  test = supervised.evaluate(ctx, params, stats, splits["test"])
  ctx.logger.write(name + "/test", meta["best_epoch"], test)
  field = "finetune.lr" if pipeline == "baseline" else "finetune.bissl_lr"
  supervised.check_evaluation(
      test, f"the test evaluation of {name} (its output is in {out_dir})",
      f"Lower the fine-tuning learning rate (lr={lr:.3g}: config.{field}).", field)
  record = dict(meta, test=test)
  record.pop("format", None)
  results_lib.write_json(record_path, record)
  return record


def search_hyperparams(ctx: StageContext, backbone: dict, splits: dict, *, pipeline: str,
                       seed: int, inputs: Optional[dict] = None,
                       pretext_head: Optional[dict] = None) -> search_lib.SearchResult:
  """Random search of the fine-tuning LR / weight decay on validation (resumable).

  Its record is resumed only when its provenance (search and fine-tuning fields,
  the backbone's digest) matches.
  """
  s = ctx.config.search
  record_path = ctx.path("search", f"{pipeline}.json")
  prov_path = ctx.path("search", f"{pipeline}.provenance.json")
  prov = supervised.stage_provenance(
      ctx, "finetune", exclude=("lr", "weight_decay", "bissl_lr", "bissl_weight_decay"),
      inputs=inputs, seed=seed, **{f"search.{k}": v for k, v in s.items()})
  if os.path.exists(record_path) and not provenance.reusable_record(
      prov_path, prov, mode=_reuse(ctx), name=f"search/{pipeline}"):
    provenance.set_aside(ctx.path("search"), [record_path])
  results_lib.write_json(prov_path, {provenance.RECORD_KEY: prov.record()})
  # A grid (search.lr_grid × search.wd_grid, the thesis's GPT search) or log-uniform samples.
  pairs = (search_lib.grid_configs(s.lr_grid, s.wd_grid) if s.lr_grid and s.wd_grid
           else None)
  counter = iter(range(len(pairs) if pairs else s.num_configs))

  def trial(lr, wd):
    i = next(counter, -1)
    result = supervised.finetune(ctx, backbone, splits, lr=lr, weight_decay=wd,
                                 epochs=s.epochs, seed=seed,
                                 name=f"search/{pipeline}/trial{i}", stop_on_nonfinite=True,
                                 pretext_head=pretext_head)
    return result.val_score, result.val_loss

  return search_lib.random_search(
      trial, num_configs=s.num_configs, lr_range=tuple(s.lr_range),
      wd_range=tuple(s.wd_range), seed=derive_seed(ctx.config.seed, "search"),
      record_path=record_path, pairs=pairs)


def backbone_of(params, stats) -> dict:
  """``{'params', 'batch_stats'}`` of the backbone group."""
  return {"params": params["backbone"], "batch_stats": stats["backbone"]}


def variant_contexts(ctx: StageContext):
  """``(name, context)`` for every entry of ``config.bissl_variants``, in order."""
  variants = ctx.config.get("bissl_variants") or {}
  return [(name, dataclasses.replace(ctx, config=config_validation.with_bissl_overrides(
      ctx.config, overrides, variants=False))) for name, overrides in variants.items()]


def run_comparison(ctx: StageContext, splits: dict, pretext_set, *,
                   bissl_callback: Optional[Callable] = None) -> dict:
  """Baseline and BiSSL pipelines over ``config.seeds``; returns the results record."""
  config = ctx.config
  seeds = list(config.seeds)
  hyper = {"baseline": {"lr": config.finetune.lr, "weight_decay": config.finetune.weight_decay},
           "bissl": {"lr": config.finetune.bissl_lr,
                     "weight_decay": config.finetune.bissl_weight_decay}}
  per_seed = {"baseline": {}, "bissl": {}}
  shown = {}  # the hyperparameters the reported numbers were produced with (their records)
  for i, seed in enumerate(seeds):
    pretext_seed = seeds[0] if config.pretext.share_across_seeds else seed
    (pre_params, pre_stats), pre_digest = pretext_model(ctx, pretext_set, pretext_seed)
    base_params, base_stats, base_digest = pre_params, pre_stats, pre_digest
    if config.pretext.baseline_epochs is not None:
      # The baseline's own, longer pretext run (matches BiSSL's extra pretext steps).
      base_dir = ctx.path(f"seed{pretext_seed}", "pretext_baseline")
      base_params, base_stats = pretrain(
          ctx, pretext_set, seed=pretext_seed, epochs=config.pretext.baseline_epochs,
          directory=base_dir, name=f"pretext_baseline/seed{pretext_seed}")
      base_digest = provenance.digest_of(os.path.join(base_dir, "output"))
    pretext_backbone = backbone_of(base_params, base_stats)
    # A fresh head may start partly from φ_P (detection's res5): each pipeline's own.
    base_head = base_params["pretext_head"]

    # Baseline: pretext backbone → fine-tuning → test.
    if config.search.enabled and i == 0:
      found = search_hyperparams(ctx, pretext_backbone, splits, pipeline="baseline", seed=seed,
                                 inputs={"backbone": base_digest}, pretext_head=base_head)
      hyper["baseline"] = {"lr": found.lr, "weight_decay": found.weight_decay}
    rec = finetune_and_evaluate(ctx, pretext_backbone, splits, pipeline="baseline",
                                seed=seed, directory=ctx.path(f"seed{seed}", "baseline",
                                                              "finetune"),
                                inputs={"backbone": base_digest}, pretext_head=base_head,
                                **hyper["baseline"])
    per_seed["baseline"][seed] = _seed_row(rec)
    shown["baseline"] = _used_hyperparams(rec)

    # BiSSL: head warm-up → BiSSL → fine-tuning from θ_P → test.
    bissl_dir = ctx.path(f"seed{seed}", "bissl")
    warm_dir = os.path.join(bissl_dir, "head_warmup")
    warm = warmed_up_model(ctx, (pre_params, pre_stats), splits["train"], seed=seed,
                           directory=warm_dir, inputs={"pretext": pre_digest})
    warm_digest = provenance.digest_of(os.path.join(warm_dir, "output"))
    out = bissl_stage.run_bissl(ctx, warm, pretext_set, splits["train"], seed=seed,
                                directory=os.path.join(bissl_dir, "bissl"),
                                name=f"bissl/seed{seed}", callback=bissl_callback,
                                inputs={"head_warmup": warm_digest})
    theta_p = backbone_of(out.params, out.batch_stats)
    theta_digest = provenance.digest_of(os.path.join(bissl_dir, "bissl", "output"))
    if config.search.enabled and i == 0:
      found = search_hyperparams(ctx, theta_p, splits, pipeline="bissl", seed=seed,
                                 inputs={"backbone": theta_digest},
                                 pretext_head=out.params["pretext_head"])
      hyper["bissl"] = {"lr": found.lr, "weight_decay": found.weight_decay}
    rec = finetune_and_evaluate(ctx, theta_p, splits, pipeline="bissl", seed=seed,
                                directory=os.path.join(bissl_dir, "finetune"),
                                inputs={"backbone": theta_digest},
                                pretext_head=out.params["pretext_head"], **hyper["bissl"])
    per_seed["bissl"][seed] = _seed_row(rec)
    shown["bissl"] = _used_hyperparams(rec)

    # BiSSL variants (other solvers, ...): the same warm-up, seed and fine-tuning.
    for variant, vctx in variant_contexts(ctx):
      pipeline = results_lib.VARIANT_PREFIX + variant
      vdir = ctx.path(f"seed{seed}", pipeline)
      out = bissl_stage.run_bissl(vctx, warm, pretext_set, splits["train"], seed=seed,
                                  directory=os.path.join(vdir, "bissl"),
                                  name=f"{pipeline}/seed{seed}", callback=bissl_callback,
                                  inputs={"head_warmup": warm_digest})
      rec = finetune_and_evaluate(
          vctx, backbone_of(out.params, out.batch_stats), splits, pipeline=pipeline,
          seed=seed, directory=os.path.join(vdir, "finetune"), inputs={
              "backbone": provenance.digest_of(os.path.join(vdir, "bissl", "output"))},
          pretext_head=out.params["pretext_head"], **hyper["bissl"])
      per_seed.setdefault(pipeline, {})[seed] = _seed_row(rec)
      shown[pipeline] = _used_hyperparams(rec)
    print(f"[seed {seed}] test {reported_metrics(ctx)[0]}: "
          f"baseline {per_seed['baseline'][seed]['score']:.4f}, "
          f"BiSSL {per_seed['bissl'][seed]['score']:.4f}", flush=True)

  info = {"downstream_dataset": config.data.downstream_dataset,
          "pretext_dataset": config.data.pretext_dataset, "pretext_task": config.pretext.task,
          "arch": config.model.arch, "seeds": seeds,
          "pretext_shared_across_seeds": bool(config.pretext.share_across_seeds
                                              or config.pretext.checkpoint)}
  if context_lib.is_text(config):  # the offline corpus changes between Python versions
    from bissl_jax.data import text_sets  # pylint: disable=g-import-not-at-top
    info["corpus_fingerprint"] = text_sets.corpus_fingerprint(config.data)
  return results_lib.build_results(per_seed, multilabel=ctx.multilabel, hyperparams=shown,
                                   info=info, names=ctx.metric_names)


def _seed_row(record: dict) -> dict:
  """A seed's row of the results: its test metrics and validation score."""
  test = {k: v for k, v in record["test"].items() if k != "nonfinite"}  # 0: checked
  return dict(test, val=record["val_score"])


def _used_hyperparams(record: dict) -> dict:
  """The fine-tuning LR and weight decay an evaluation record was produced with."""
  return {"lr": float(record["lr"]), "weight_decay": float(record["weight_decay"])}


def reported_metrics(ctx: StageContext) -> tuple:
  """The test metrics of the results table, headline first."""
  return ctx.metric_names or results_lib.metric_names(ctx.multilabel)
