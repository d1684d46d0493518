"""SimCLR vs SimCLR + GeSSL under one pretraining budget, scored by a linear probe and
N-way K-shot episodes on held-out classes (``configs/digits_gessl.py``).

For every seed and method: pretrain a fresh model on the images of the *training
classes* only (same epochs, batch, data order, optimizer and learning-rate
schedule for both methods; GeSSL's step costs more compute), then on frozen
evaluation-mode backbone features

* fit a linear probe on the train split (all classes) and score the test split;
* draw N-way K-shot episodes from the test split's *held-out* classes (unseen in
  pretraining) and classify them by nearest prototype (:mod:`bissl_jax.fewshot`).

Results (mean ± std over seeds; each seed's few-shot figure is its mean over
episodes, with its 95% interval kept in ``results.json``) go to
``<workdir>/results.md`` and ``results.json``.

This runner has its own small pretraining loop: it relies only on
:func:`bissl_jax.data.load_digits_splits`, :func:`bissl_jax.models.build_model`,
:func:`bissl_jax.pretext.make_pretext_task`, :mod:`bissl_jax.gessl`,
:mod:`bissl_jax.fewshot` and :func:`bissl_jax.metrics.summarize`, not on the pipeline
stages, which do not yet call ``task.prepare`` or ``GeSSL.init_head``.

Run: ``python -m bissl_jax.pipeline.gessl_comparison --config configs/digits_gessl.py
--workdir runs/digits_gessl``.
"""
import argparse
import ast
import dataclasses
import importlib.util
import json
import os
import time
from typing import Any, Dict, Tuple

import jax
import numpy as np
import optax

from bissl_jax import fewshot
from bissl_jax import gessl
from bissl_jax import metrics
from bissl_jax import models
from bissl_jax import optim
from bissl_jax import pretext

PyTree = Any
METHODS = ("simclr", "simclr+gessl")


def build_model(cfg) -> models.BisslModel:
  """The config's model; ``model.arch='mini_resnet'`` is a one-block ResNet for smoke tests."""
  arch = cfg.model.arch
  model = models.build_model("resnet18" if arch == "mini_resnet" else arch, num_classes=10,
                             width_multiplier=cfg.model.width_multiplier,
                             cifar_stem=cfg.model.cifar_stem, projector=cfg.model.projector)
  if arch == "mini_resnet":
    model = dataclasses.replace(model, backbone=models.ResNet(
        stage_sizes=(1,), block="basic", width=max(1, int(64 * cfg.model.width_multiplier)),
        cifar_stem=cfg.model.cifar_stem))
  return model


def build_task(cfg, method: str, model):
  """The base SimCLR task, wrapped in GeSSL for ``'simclr+gessl'``."""
  base = pretext.make_pretext_task("simclr", model, image_size=cfg.image_size)
  if method == "simclr":
    return base
  if method != "simclr+gessl":
    raise ValueError(f"method={method!r}; valid choices: {METHODS}.")
  task = gessl.from_config(base, cfg.gessl, image_size=cfg.image_size)
  if task.batch_size != cfg.pretext.batch_size:
    raise ValueError(f"gessl.n_tasks*gessl.classes_per_task = {task.batch_size} must equal "
                     f"pretext.batch_size = {cfg.pretext.batch_size}.")
  return task


def _make_step(task, tx):
  def step(params, stats, opt_state, target, images, rng):
    inputs = task.prepare(rng, images)
    (loss, aux), grads = jax.value_and_grad(task.loss, has_aux=True)(
        params, stats, inputs, target)
    updates, opt_state = tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    if task.has_target:
      target = task.update_target(target, params, aux["batch_stats"])
    return params, aux["batch_stats"], opt_state, target, loss
  return jax.jit(step)


def pretrain(cfg, task, model, images: np.ndarray, *, seed: int, step_cache: Dict
             ) -> Tuple[PyTree, PyTree, list]:
  """Pretrains ``task`` on ``images`` (uint8) from a fresh init; returns ``(params, stats, losses)``.

  Both methods use :func:`bissl_jax.gessl.gessl_optimizer` (SGD, momentum 0.9, weight
  decay 1e-4, the paper's Appendix C) with a cosine schedule from ``pretext.lr``.
  """
  pc = cfg.pretext
  steps_per_epoch = len(images) // pc.batch_size
  if steps_per_epoch < 1:
    raise ValueError(f"{len(images)} pretraining images are fewer than pretext.batch_size "
                     f"= {pc.batch_size}.")
  total = steps_per_epoch * pc.epochs
  key = jax.random.PRNGKey(seed)
  k_init, k_head, k_aug = jax.random.split(key, 3)
  params, stats = model.init(k_init, cfg.image_size)
  params = {"backbone": params["backbone"], "pretext_head": params["pretext_head"]}
  if isinstance(task, gessl.GeSSL):
    params = task.init_head(k_head, params)
  target = task.init_target(params, stats) if task.has_target else None
  tx = gessl.gessl_optimizer(optim.cosine_schedule(pc.lr, total_steps=total),
                             momentum=pc.momentum, weight_decay=pc.weight_decay)
  cache_key = (task, pc.lr, total, pc.momentum, pc.weight_decay)
  if cache_key not in step_cache:  # one compilation per method, shared by the seeds
    step_cache[cache_key] = _make_step(task, tx)
  step = step_cache[cache_key]
  opt_state = tx.init(params)
  order_rng = np.random.default_rng(seed)
  losses = []
  for epoch in range(pc.epochs):
    perm = order_rng.permutation(len(images))
    for i in range(steps_per_epoch):
      batch = images[perm[i * pc.batch_size:(i + 1) * pc.batch_size]]
      params, stats, opt_state, target, loss = step(
          params, stats, opt_state, target, batch, jax.random.fold_in(k_aug, epoch * 10**6 + i))
    losses.append(float(loss))
    if not np.isfinite(losses[-1]):
      raise FloatingPointError(f"Non-finite pretraining loss in epoch {epoch}; lower pretext.lr "
                               "or gessl.inner_lr.")
  return params, stats, losses


def evaluate(cfg, model, params, stats, splits, held_out, *, seed: int) -> Dict[str, Any]:
  """Linear probe (all classes) and few-shot episodes (held-out classes) on frozen features."""
  feats = {name: fewshot.extract_features(model, params["backbone"], stats["backbone"],
                                          splits[name].images, image_size=cfg.image_size)
           for name in ("train", "test")}
  pr = cfg.probe
  probe = fewshot.linear_probe(feats["train"], splits["train"].labels, feats["test"],
                               splits["test"].labels, num_classes=10, epochs=pr.epochs,
                               batch_size=pr.batch_size, lr=pr.lr, final_lr=pr.final_lr,
                               seed=seed)
  out = {"linear_probe": probe.accuracy}
  fs = cfg.fewshot
  for shots in fs.shots:
    res = fewshot.few_shot_accuracy(feats["test"], splits["test"].labels, held_out,
                                    n_way=fs.n_way, k_shot=shots, n_query=fs.n_query,
                                    episodes=fs.episodes, seed=seed,
                                    classifier=fs.classifier)
    out[f"{fs.n_way}way_{shots}shot"] = res["mean"]
    out[f"{fs.n_way}way_{shots}shot_ci95"] = res["ci95"]
  return out


def run(cfg, workdir: str) -> Dict[str, Any]:
  """Runs the whole comparison; writes and returns the results."""
  from bissl_jax.data import load_digits_splits  # pylint: disable=import-outside-toplevel
  os.makedirs(workdir, exist_ok=True)
  splits = load_digits_splits(image_size=cfg.image_size)
  train_classes, held_out = fewshot.class_split(10, cfg.fewshot.held_out_classes)
  pretext_images = splits["train"].images[fewshot.examples_of(splits["train"].labels,
                                                              train_classes)]
  model = build_model(cfg)
  per_seed = {m: {} for m in METHODS}
  timing = {}
  step_cache: Dict = {}
  for method in METHODS:
    task = build_task(cfg, method, model)
    start = time.perf_counter()
    for seed in cfg.seeds:
      params, stats, losses = pretrain(cfg, task, model, pretext_images, seed=seed,
                                       step_cache=step_cache)
      scores = evaluate(cfg, model, params, stats, splits, held_out, seed=seed)
      scores["final_pretext_loss"] = losses[-1]
      per_seed[method][int(seed)] = scores
      print(f"{method} seed {seed}: " + ", ".join(f"{k}={v:.4f}" for k, v in scores.items()),
            flush=True)
    timing[method] = time.perf_counter() - start
  names = [k for k in per_seed[METHODS[0]][int(cfg.seeds[0])] if not k.endswith("ci95")
           and k != "final_pretext_loss"]
  summary = {m: {k: metrics.summarize([s[k] for s in per_seed[m].values()]) for k in names}
             for m in METHODS}
  results = {"summary": summary, "per_seed": per_seed, "seconds": timing,
             "train_classes": [int(c) for c in train_classes],
             "held_out_classes": [int(c) for c in held_out]}
  with open(os.path.join(workdir, "results.json"), "w", encoding="utf-8") as f:
    json.dump(results, f, indent=2)
  with open(os.path.join(workdir, "results.md"), "w", encoding="utf-8") as f:
    f.write(to_markdown(results) + "\n")
  return results


def to_markdown(results: Dict[str, Any]) -> str:
  """The results table: one row per method, mean ± std (%) over seeds per metric."""
  summary = results["summary"]
  names = list(next(iter(summary.values())))
  lines = ["| Method | " + " | ".join(names) + " | Seeds | Wall (s) |",
           "|---|" + "---|" * (len(names) + 2)]
  for method, stats in summary.items():
    cells = [f"{100 * s['mean']:.1f} ± {100 * s['std']:.1f}" for s in stats.values()]
    n = next(iter(stats.values()))["n"]
    lines.append(f"| {method} | " + " | ".join(cells)
                 + f" | {n} | {results['seconds'][method]:.0f} |")
  return "\n".join(lines)


def load_config(path: str, arg: str = ""):
  """``get_config(arg)`` of a config file given by path."""
  spec = importlib.util.spec_from_file_location("gessl_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def override(cfg, item: str) -> None:
  """Sets ``cfg.a.b = value`` from ``'a.b=value'`` (a Python literal, else a string)."""
  field, sep, text = item.partition("=")
  if not sep:
    raise ValueError(f"--set {item!r}: use FIELD=VALUE, e.g. gessl.inner_params=all.")
  try:
    value = ast.literal_eval(text)
  except (ValueError, SyntaxError):
    value = text
  *parents, leaf = field.split(".")
  node = cfg
  for name in parents:
    node = node[name]
  if leaf not in node:
    raise ValueError(f"--set {item!r}: the config has no field {field!r}.")
  node[leaf] = value


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--config", default="configs/digits_gessl.py")
  parser.add_argument("--config-arg", default="", help="e.g. 'runlocal' for the smoke size.")
  parser.add_argument("--workdir", default="runs/digits_gessl")
  parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                      help="override a config field, e.g. --set gessl.inner_params=all.")
  args = parser.parse_args(argv)
  cfg = load_config(args.config, args.config_arg)
  for item in args.set:
    override(cfg, item)
  results = run(cfg, args.workdir)
  print(to_markdown(results))
  return results


if __name__ == "__main__":
  main()
