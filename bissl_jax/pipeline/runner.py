"""Stage orchestration and the baseline-vs-BiSSL comparison (SPEC §1, §6).

``run(config, workdir)`` validates the config, opens the data (a missing dataset
fails here, before any compute), builds the model and runs ``config.stages``:

* ``'all'``: the comparison. For every seed in ``config.seeds``:
  pretext pretraining → baseline fine-tuning → test evaluation, and
  head warm-up → BiSSL → fine-tuning from θ_P → test evaluation.
  Both pipelines of a seed start from the same pretext model and fine-tune with
  the same budget, fresh-head initialisation and data order. With
  ``search.enabled`` the fine-tuning LR and weight decay of each pipeline are
  first chosen by random search on validation (on the first seed's models).
* a single stage, reading the previous stage's exported output from the path
  fields named in ``bissl_jax.config_validation.STAGE_INPUTS``.

Directory layout (every stage resumes from, or skips to, what is already there)::

  workdir/config.json, metrics.jsonl, tensorboard/, results.{json,md}
  workdir/seed<s>/pretext/{ckpt,output}
  workdir/seed<s>/pretext_baseline/{ckpt,output}   (only with pretext.baseline_epochs)
  workdir/seed<s>/baseline/finetune/{ckpt,output,evaluation.json}
  workdir/seed<s>/bissl/head_warmup/output
  workdir/seed<s>/bissl/bissl/{ckpt,output}
  workdir/seed<s>/bissl/finetune/{ckpt,output,evaluation.json}
  workdir/search/{baseline,bissl}.json
  workdir/<stage>/...        (single-stage runs)
"""
import json
import os
import time
from typing import Callable, Optional

import jax
import numpy as np

from bissl_jax import data as data_lib
from bissl_jax import models
from bissl_jax import parallel
from bissl_jax import pretext as pretext_lib
from bissl_jax.config_validation import validate_config
from bissl_jax.pipeline import bissl_stage
from bissl_jax.pipeline import checkpoint
from bissl_jax.pipeline import logging as plog
from bissl_jax.pipeline import results as results_lib
from bissl_jax.pipeline import search as search_lib
from bissl_jax.pipeline import supervised
from bissl_jax.pipeline.context import StageContext
from bissl_jax.pipeline.pretrain import pretrain


# ----------------------------------------------------------------------------- setup

def _load_data(config, need_pretext: bool, need_downstream: bool):
  """Opens the datasets a run needs; raises DatasetNotFoundError before any compute.

  When pretext and downstream data are the same set (the digits default), the
  pretext data is the downstream *training* split, never validation or test.
  """
  d = config.data
  pretext_spec = data_lib.get_spec(d.pretext_dataset)
  same = (data_lib.get_spec(d.downstream_dataset).name == pretext_spec.name
          and pretext_spec.pretext_split == pretext_spec.train_split)
  splits = pretext_set = None
  if need_downstream or (need_pretext and same):
    splits = data_lib.load_splits(d.downstream_dataset, data_dir=d.data_dir,
                                  image_size=d.image_size, val_fraction=d.val_fraction,
                                  seed=d.split_seed)
    if d.max_train_examples and d.max_train_examples < len(splits["train"]):
      keep = np.random.default_rng(d.split_seed).permutation(len(splits["train"]))
      splits["train"] = splits["train"].subset(np.sort(keep[:d.max_train_examples]))
  if need_pretext:
    if same:
      pretext_set = splits["train"]
    elif pretext_spec.name == "imagenet2012":
      # Too large for host memory: decode each batch on demand.
      pretext_set = data_lib.open_tfds_split(pretext_spec, pretext_spec.pretext_split,
                                             data_dir=d.data_dir, image_size=d.image_size)
    else:
      pretext_set = data_lib.load_pretext_split(d.pretext_dataset, data_dir=d.data_dir,
                                                image_size=d.image_size)
  return splits, pretext_set


def build_context(config, workdir: str) -> StageContext:
  """Model, pretext task, mesh and logger of a run."""
  spec = data_lib.get_spec(config.data.downstream_dataset)
  m, p = config.model, config.pretext
  predictor = m.predictor or (m.projector if p.task == "byol" else None)
  model = models.build_model(m.arch, num_classes=spec.num_classes,
                             width_multiplier=m.width_multiplier, cifar_stem=m.cifar_stem,
                             projector=m.projector, predictor=predictor)
  kwargs = {"temperature": p.temperature} if p.task == "simclr" else {"ema_decay": p.ema_decay}
  task = pretext_lib.make_pretext_task(p.task, model, **kwargs)
  return StageContext(config=config, workdir=workdir, model=model, task=task,
                      mesh=parallel.make_mesh(), logger=plog.MetricLogger(workdir),
                      image_size=config.data.image_size, multilabel=spec.multilabel,
                      num_classes=spec.num_classes)


def _write_json(path: str, record: dict) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(record, f, indent=2, sort_keys=True)
  os.replace(tmp, path)


def _read_json(path: str) -> Optional[dict]:
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


# ----------------------------------------------------------------------------- stage helpers

def load_pretext_model(ctx: StageContext, path: str):
  """``(params, batch_stats)`` ({'backbone', 'pretext_head'}) from an export or torch weights.

  A stage output of this library is read directly; anything else goes through
  ``bissl_jax.convert.load_pretrained`` (``.pth`` files or converted directories).
  Pretext heads the weights lack are freshly initialised.
  """
  if checkpoint.is_export(path):
    variables, _ = checkpoint.load_export(path)
    params, stats = variables["params"], variables["batch_stats"]
  else:
    from bissl_jax import convert
    m = ctx.config.model
    params, stats = convert.load_pretrained(path, arch=m.arch, cifar_stem=m.cifar_stem,
                                            width_multiplier=m.width_multiplier)
  init_params, init_stats = supervised.init_variables(ctx, jax.random.key(0))
  loaded_heads = params.get("pretext_head", {})
  shapes = lambda tree: jax.tree_util.tree_map(np.shape, tree)
  for name, head in loaded_heads.items():
    if shapes(head) != shapes(init_params["pretext_head"].get(name)):
      raise ValueError(
          f"The {name} in pretext.checkpoint={path!r} does not match "
          f"config.model.{name}={getattr(ctx.config.model, name)!r}; set that field to the "
          f"checkpoint's layer widths.")
  missing = sorted(set(init_params["pretext_head"]) - set(loaded_heads))
  if missing:
    print(f"pretext.checkpoint has no {', '.join(missing)}: initialising it afresh.",
          flush=True)
  head = dict(init_params["pretext_head"], **loaded_heads)
  head_stats = dict(init_stats["pretext_head"], **stats.get("pretext_head", {}))
  return ({"backbone": params["backbone"], "pretext_head": head},
          {"backbone": stats["backbone"], "pretext_head": head_stats})


def pretext_model(ctx: StageContext, pretext_set, seed: int):
  """The pretext model of ``seed``: loaded from ``pretext.checkpoint`` or pretrained."""
  if ctx.config.pretext.checkpoint:
    return load_pretext_model(ctx, ctx.config.pretext.checkpoint)
  return pretrain(ctx, pretext_set, seed=seed, directory=ctx.path(f"seed{seed}", "pretext"))


def warmed_up_model(ctx: StageContext, pretext_vars, train_set, *, seed: int,
                    directory: str) -> dict:
  """Stage 2 with its exported output: the full 3-group model BiSSL starts from."""
  out_dir = os.path.join(directory, "output")
  if checkpoint.is_export(out_dir):
    return checkpoint.load_export(out_dir)[0]
  params, stats = pretext_vars
  head = supervised.warmup_head(
      ctx, {"params": params["backbone"], "batch_stats": stats["backbone"]}, train_set,
      seed=seed, name=f"head_warmup/seed{seed}")
  warm = {"params": dict(params, downstream_head=head), "batch_stats": stats}
  checkpoint.export(out_dir, warm, {"stage": "head_warmup", "seed": seed,
                                    "arch": ctx.config.model.arch})
  return warm


def finetune_and_evaluate(ctx: StageContext, backbone: dict, splits: dict, *, pipeline: str,
                          lr: float, weight_decay: float, seed: int, directory: str) -> dict:
  """Stages 4 and 5: fine-tune (best validation epoch kept), export, score on test.

  Returns:
    The evaluation record: test metrics, validation score and the hyperparameters.
  """
  record_path = os.path.join(directory, "evaluation.json")
  out_dir = os.path.join(directory, "output")
  record = _read_json(record_path)
  if record is not None and checkpoint.is_export(out_dir):
    return record
  name = f"finetune/{pipeline}/seed{seed}"
  if checkpoint.is_export(out_dir):  # fine-tuned, but stopped before the test scores
    variables, meta = checkpoint.load_export(out_dir)
    params, stats = variables["params"], variables["batch_stats"]
  else:
    result = supervised.finetune(ctx, backbone, splits, lr=lr, weight_decay=weight_decay,
                                 epochs=ctx.config.finetune.epochs, seed=seed, name=name,
                                 directory=directory)
    meta = {"stage": "finetune", "pipeline": pipeline, "seed": seed, "lr": lr,
            "weight_decay": weight_decay, "val_score": result.val_score,
            "val_loss": result.val_loss, "best_epoch": result.best_epoch,
            "arch": ctx.config.model.arch}
    params, stats = result.params, result.batch_stats
    checkpoint.export(out_dir, {"params": params, "batch_stats": stats}, meta)
  test = supervised.evaluate(ctx, params, stats, splits["test"])
  ctx.logger.write(name + "/test", meta["best_epoch"], test)
  record = dict(meta, test=test)
  record.pop("format", None)
  _write_json(record_path, record)
  return record


def search_hyperparams(ctx: StageContext, backbone: dict, splits: dict, *, pipeline: str,
                       seed: int) -> search_lib.SearchResult:
  """Random search of the fine-tuning LR / weight decay on validation (resumable)."""
  s = ctx.config.search
  counter = iter(range(s.num_configs))

  def trial(lr, wd):
    i = next(counter, -1)
    result = supervised.finetune(ctx, backbone, splits, lr=lr, weight_decay=wd,
                                 epochs=s.epochs, seed=seed,
                                 name=f"search/{pipeline}/trial{i}", stop_on_nonfinite=True)
    return result.val_score, result.val_loss

  return search_lib.random_search(
      trial, num_configs=s.num_configs, lr_range=tuple(s.lr_range),
      wd_range=tuple(s.wd_range), seed=search_lib.derive_seed(ctx.config.seed, "search"),
      record_path=ctx.path("search", f"{pipeline}.json"))


def _backbone_of(params, stats) -> dict:
  return {"params": params["backbone"], "batch_stats": stats["backbone"]}


# ----------------------------------------------------------------------------- comparison

def run_comparison(ctx: StageContext, splits: dict, pretext_set, *,
                   bissl_callback: Optional[Callable] = None) -> dict:
  """Baseline and BiSSL pipelines over ``config.seeds``; returns the results record."""
  config = ctx.config
  seeds = list(config.seeds)
  hyper = {"baseline": {"lr": config.finetune.lr, "weight_decay": config.finetune.weight_decay},
           "bissl": {"lr": config.finetune.bissl_lr,
                     "weight_decay": config.finetune.bissl_weight_decay}}
  per_seed = {"baseline": {}, "bissl": {}}
  for i, seed in enumerate(seeds):
    pretext_seed = seeds[0] if config.pretext.share_across_seeds else seed
    pre_params, pre_stats = pretext_model(ctx, pretext_set, pretext_seed)
    pretext_backbone = _backbone_of(pre_params, pre_stats)
    if config.pretext.baseline_epochs is not None:
      # The baseline's own, longer pretext run (matches BiSSL's extra pretext steps).
      pretext_backbone = _backbone_of(*pretrain(
          ctx, pretext_set, seed=pretext_seed, epochs=config.pretext.baseline_epochs,
          directory=ctx.path(f"seed{pretext_seed}", "pretext_baseline")))

    # Baseline: pretext backbone → fine-tuning → test.
    if config.search.enabled and i == 0:
      found = search_hyperparams(ctx, pretext_backbone, splits, pipeline="baseline", seed=seed)
      hyper["baseline"] = {"lr": found.lr, "weight_decay": found.weight_decay}
    rec = finetune_and_evaluate(ctx, pretext_backbone, splits, pipeline="baseline",
                                seed=seed, directory=ctx.path(f"seed{seed}", "baseline",
                                                              "finetune"),
                                **hyper["baseline"])
    per_seed["baseline"][seed] = dict(rec["test"], val=rec["val_score"])

    # BiSSL: head warm-up → BiSSL → fine-tuning from θ_P → test.
    bissl_dir = ctx.path(f"seed{seed}", "bissl")
    warm = warmed_up_model(ctx, (pre_params, pre_stats), splits["train"], seed=seed,
                           directory=os.path.join(bissl_dir, "head_warmup"))
    out = bissl_stage.run_bissl(ctx, warm, pretext_set, splits["train"], seed=seed,
                                directory=os.path.join(bissl_dir, "bissl"),
                                name=f"bissl/seed{seed}", callback=bissl_callback)
    theta_p = _backbone_of(out.params, out.batch_stats)
    if config.search.enabled and i == 0:
      found = search_hyperparams(ctx, theta_p, splits, pipeline="bissl", seed=seed)
      hyper["bissl"] = {"lr": found.lr, "weight_decay": found.weight_decay}
    rec = finetune_and_evaluate(ctx, theta_p, splits, pipeline="bissl", seed=seed,
                                directory=os.path.join(bissl_dir, "finetune"),
                                **hyper["bissl"])
    per_seed["bissl"][seed] = dict(rec["test"], val=rec["val_score"])
    print(f"[seed {seed}] test {results_lib.metric_names(ctx.multilabel)[0]}: "
          f"baseline {per_seed['baseline'][seed]['score']:.4f}, "
          f"BiSSL {per_seed['bissl'][seed]['score']:.4f}", flush=True)

  info = {"downstream_dataset": config.data.downstream_dataset,
          "pretext_dataset": config.data.pretext_dataset, "pretext_task": config.pretext.task,
          "arch": config.model.arch, "seeds": seeds,
          "pretext_shared_across_seeds": bool(config.pretext.share_across_seeds
                                              or config.pretext.checkpoint)}
  return results_lib.build_results(per_seed, multilabel=ctx.multilabel, hyperparams=hyper,
                                   info=info)


# ----------------------------------------------------------------------------- single stages

def run_single_stage(ctx: StageContext, stage: str, splits, pretext_set) -> dict:
  """Runs one stage for ``config.seed``; returns a small JSON record of what it wrote."""
  config, seed = ctx.config, ctx.config.seed
  if stage == "pretext":
    directory = ctx.path("pretext")
    pretrain(ctx, pretext_set, seed=seed, directory=directory)
    return {"stage": stage, "output": os.path.join(directory, "output")}
  if stage == "head_warmup":
    pre = load_pretext_model(ctx, config.pretext.checkpoint)
    directory = ctx.path("head_warmup")
    warmed_up_model(ctx, pre, splits["train"], seed=seed, directory=directory)
    return {"stage": stage, "output": os.path.join(directory, "output")}
  if stage == "bissl":
    warm, _ = checkpoint.load_export(config.bissl.init_checkpoint)
    directory = ctx.path("bissl")
    bissl_stage.run_bissl(ctx, warm, pretext_set, splits["train"], seed=seed,
                          directory=directory, name=f"bissl/seed{seed}")
    return {"stage": stage, "output": os.path.join(directory, "output")}
  if stage == "finetune":
    variables, meta = checkpoint.load_export(config.finetune.init_checkpoint)
    after_bissl = meta.get("stage") == "bissl"
    lr = config.finetune.bissl_lr if after_bissl else config.finetune.lr
    wd = config.finetune.bissl_weight_decay if after_bissl else config.finetune.weight_decay
    directory = ctx.path("finetune")
    record = finetune_and_evaluate(
        ctx, _backbone_of(variables["params"], variables["batch_stats"]), splits,
        pipeline="bissl" if after_bissl else "baseline", lr=lr, weight_decay=wd, seed=seed,
        directory=directory)
    return dict(record, output=os.path.join(directory, "output"))
  if stage == "evaluate":
    variables, meta = checkpoint.load_export(config.evaluate.checkpoint)
    params, stats = variables["params"], variables["batch_stats"]
    record = {"stage": stage, "checkpoint": config.evaluate.checkpoint,
              "validation": supervised.evaluate(ctx, params, stats, splits["validation"]),
              "test": supervised.evaluate(ctx, params, stats, splits["test"])}
    _write_json(ctx.path("evaluate", "evaluation.json"), record)
    return record
  raise ValueError(f"Unknown stage {stage!r}.")


# ----------------------------------------------------------------------------- entry point

_NEEDS = {  # stage -> (pretext data, downstream data)
    "all": (True, True), "pretext": (True, False), "head_warmup": (False, True),
    "bissl": (True, True), "finetune": (False, True), "evaluate": (False, True)}


def run(config, workdir: str, *, bissl_callback: Optional[Callable] = None) -> dict:
  """Runs ``config.stages`` in ``workdir`` (resuming whatever is already there).

  Args:
    config: a pipeline ``ConfigDict`` (see ``configs/``).
    workdir: the run directory.
    bissl_callback: optional ``callback(alternations_done, state, metrics)`` called
      after every BiSSL alternation (tests use it to interrupt a run).

  Returns:
    For ``'all'`` the results record (also written to ``results.json`` and
    ``results.md``); for a single stage a record of its outputs.

  Raises:
    ConfigError: an invalid config field (before any compute).
    DatasetNotFoundError: a dataset is not prepared locally (before any compute).
    NonFiniteError: training diverged; the last good checkpoint is kept.
  """
  start = time.time()
  validate_config(config)
  workdir = os.path.abspath(workdir)
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, "config.json"), "w") as f:
    f.write(config.to_json_best_effort(indent=2) if hasattr(config, "to_json_best_effort")
            else json.dumps(dict(config), indent=2, default=str))
  need_pretext, need_downstream = _NEEDS[config.stages]
  splits, pretext_set = _load_data(config, need_pretext, need_downstream)
  ctx = build_context(config, workdir)
  try:
    if config.stages != "all":
      record = run_single_stage(ctx, config.stages, splits, pretext_set)
      print(json.dumps(record, indent=2, default=str), flush=True)
      return record
    results = run_comparison(ctx, splits, pretext_set, bissl_callback=bissl_callback)
    results["wall_time_s"] = time.time() - start
    results["devices"] = f"{jax.device_count()} x {jax.devices()[0].platform}"
    if jax.process_index() == 0:
      print(results_lib.write_results(workdir, results), flush=True)
      ctx.logger.flush()
      results["plots"] = _plot_curves(workdir)
    return results
  finally:
    ctx.logger.close()


def _plot_curves(workdir: str) -> list:
  """Training-curve PNGs in ``<workdir>/plots``; a plotting failure never loses results."""
  from bissl_jax import plots  # matplotlib is only needed here
  try:
    paths = plots.plot_run(workdir)
  except Exception as e:  # pylint: disable=broad-except
    print(f"Could not draw the training curves ({e!r}); the results are saved.", flush=True)
    return []
  if paths:
    print(f"Training curves: {os.path.join(workdir, 'plots')}", flush=True)
  return paths
