"""A pretext task vs the same task + GeSSL under one pretraining budget, scored by a
linear probe and N-way K-shot episodes on held-out classes (``configs/digits_gessl.py``,
``configs/stl10_gessl.py``).

For every seed and method (``config.pretext.task`` alone, then wrapped in GeSSL):
pretrain a fresh model with :func:`bissl_jax.pipeline.pretrain.pretrain` (the one
stage loop: checkpoints, resume, metrics; same epochs, batch, data order, optimizer
and learning-rate schedule for both methods, GeSSL's step costs more compute), then,
on frozen evaluation-mode backbone features,

* fit a linear probe on the train split (all classes) and score the test split;
* draw N-way K-shot episodes from the test split's *held-out* classes and classify
  them by nearest prototype (:mod:`bissl_jax.evaluation.fewshot`). When the pretext set is the
  downstream train split (the digits), pretraining sees only the images of the other
  classes, so the held-out classes are unseen.

The config is a pipeline config (``configs/common.py``) plus ``config.probe`` and
``config.fewshot`` (:func:`configs.common.add_gessl_evaluation`); ``gessl.enabled``
is set per method here. Results (mean ± std over seeds; each seed's few-shot figure
is its mean over episodes, with its 95% interval kept in ``results.json``) go to
``<workdir>/results.md`` and ``results.json``; each method's runs live in
``<workdir>/<method>/``, so a rerun resumes or reuses them.

Run: ``bissl-jax gessl --config=configs/digits_gessl.py --workdir=runs/digits_gessl``
(the flags of ``bissl-jax run``); ``python -m bissl_jax.pipeline.gessl_comparison
--config configs/digits_gessl.py --workdir runs/digits_gessl`` (``--set FIELD=VALUE``
for overrides) does the same.
"""
import argparse
import ast
import copy
import importlib.util
import json
import os
import time
from typing import Any, Dict, Tuple

from bissl_jax.evaluation import fewshot
from bissl_jax.evaluation import metrics
from bissl_jax.config_validation import ConfigError, validate_config
from bissl_jax.runtime.errors import NonFiniteError
from bissl_jax.pipeline import context as context_lib
from bissl_jax.pipeline import datasets
from bissl_jax.pipeline.pretrain import pretrain
from bissl_jax.runtime import mesh


def methods(cfg) -> Tuple[str, str]:
  """The two rows: the base pretext task and the task + GeSSL, e.g. ``('simclr', 'simclr+gessl')``."""
  return (cfg.pretext.task, f"{cfg.pretext.task}+gessl")


def method_config(cfg, method: str):
  """``cfg`` with ``gessl.enabled`` set for ``method`` (validated and resolved)."""
  out = copy.deepcopy(cfg)
  with out.unlocked():
    out.gessl.enabled = method.endswith("+gessl")
  return validate_config(out)


def pretext_images(cfg, splits, pretext_set, train_classes):
  """The pretext set; the train-class images only when it is the downstream train split."""
  if pretext_set is splits["train"]:
    return pretext_set.subset(fewshot.examples_of(pretext_set.labels, train_classes))
  return pretext_set


def evaluate(cfg, model, params, stats, splits, held_out, *, seed: int,
             device_mesh=None) -> Dict[str, Any]:
  """Linear probe (all classes) and few-shot episodes (held-out classes) on frozen features.

  The features are computed over ``device_mesh`` (each process its rows) and every
  process receives all of them; the probe and the episodes then run on every process
  from the same features and seeds, so every process computes the same scores.
  """
  size = int(cfg.data.image_size)
  feats = {name: fewshot.extract_features(model, params["backbone"], stats["backbone"],
                                          splits[name].images, image_size=size,
                                          mesh=device_mesh)
           for name in ("train", "test")}
  pr = cfg.probe
  probe = fewshot.linear_probe(feats["train"], splits["train"].labels, feats["test"],
                               splits["test"].labels, num_classes=splits["train"].num_classes,
                               epochs=pr.epochs, batch_size=pr.batch_size, lr=pr.lr,
                               final_lr=pr.final_lr, seed=seed)
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
  for block in ("probe", "fewshot"):
    if block not in cfg:
      raise ConfigError(f"config.{block} is missing: the GeSSL comparison needs the "
                        f"evaluation blocks of configs/common.py:add_gessl_evaluation(config).")
  names = methods(cfg)
  first = method_config(cfg, names[0])
  if first.data.pretext_dataset == "imagenet2012":
    raise ConfigError("config.data.pretext_dataset='imagenet2012': the comparison holds the "
                      "downstream splits' features in memory and does not stream ImageNet; "
                      "pretrain with `bissl-jax run` (stages='pretext') and evaluate separately.")
  os.makedirs(workdir, exist_ok=True)
  splits, pretext_set = datasets.load_data(first, need_pretext=True, need_downstream=True)
  num_classes = splits["train"].num_classes
  train_classes, held_out = fewshot.class_split(num_classes, cfg.fewshot.held_out_classes)
  images = pretext_images(first, splits, pretext_set, train_classes)
  per_seed = {m: {} for m in names}
  timing = {}
  for method in names:
    ctx = context_lib.build_context(method_config(cfg, method), os.path.join(workdir, method))
    start = time.perf_counter()
    for seed in cfg.seeds:
      try:
        params, stats = pretrain(ctx, images, seed=seed,
                                 directory=ctx.path(f"pretext_seed{seed}"),
                                 name=f"{method}/pretext/seed{seed}")
      except NonFiniteError as err:  # a result too: the row says how many seeds finished
        per_seed[method][int(seed)] = {"diverged": str(err)}
        say_once(f"{method} seed {seed}: diverged ({err})")
        continue
      scores = evaluate(ctx.config, ctx.model, params, stats, splits, held_out, seed=seed,
                        device_mesh=ctx.mesh)
      per_seed[method][int(seed)] = scores
      say_once(f"{method} seed {seed}: " + ", ".join(f"{k}={v:.4f}" for k, v in scores.items()))
    timing[method] = time.perf_counter() - start
  finished = {m: [s for s in per_seed[m].values() if "diverged" not in s] for m in names}
  keys = next([k for k in s[0] if not k.endswith("ci95")] for s in finished.values() if s)
  summary = {m: {k: (metrics.summarize([s[k] for s in finished[m]]) if finished[m]
                     else {"mean": float("nan"), "std": float("nan"), "n": 0})
                 for k in keys} for m in names}
  results = {"summary": summary, "per_seed": per_seed, "seconds": timing,
             "seeds": [int(s) for s in cfg.seeds],
             "train_classes": [int(c) for c in train_classes],
             "held_out_classes": [int(c) for c in held_out],
             "pretext_images": len(images)}
  if mesh.is_writer():  # every process holds the same results; process 0 writes them
    with open(os.path.join(workdir, "results.json"), "w", encoding="utf-8") as f:
      json.dump(results, f, indent=2)
    with open(os.path.join(workdir, "results.md"), "w", encoding="utf-8") as f:
      f.write(to_markdown(results) + "\n")
  return results


def say_once(line: str) -> None:
  """Prints ``line`` once, from the process that writes (every process computed it)."""
  if mesh.is_writer():
    print(line, flush=True)


def to_markdown(results: Dict[str, Any]) -> str:
  """The results table: one row per method, mean ± std (%) over seeds per metric."""
  summary = results["summary"]
  names = list(next(iter(summary.values())))
  lines = ["| Method | " + " | ".join(names) + " | Seeds | Wall (s) |",
           "|---|" + "---|" * (len(names) + 2)]
  for method, stats in summary.items():
    cells = [f"{100 * s['mean']:.1f} ± {100 * s['std']:.1f}" for s in stats.values()]
    n = next(iter(stats.values()))["n"]
    total = len(results.get("seeds", ())) or n
    seeds = f"{n}" if n == total else f"{n} of {total} (the others diverged)"
    lines.append(f"| {method} | " + " | ".join(cells)
                 + f" | {seeds} | {results['seconds'][method]:.0f} |")
  return "\n".join(lines)


def load_config(path: str, arg: str = ""):
  """``get_config(arg)`` of a config file given by path (run from the repository root)."""
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
  path, _, arg = args.config.partition(":")  # --config=FILE:ARGS, as bissl-jax gessl takes
  cfg = load_config(path, args.config_arg or arg)
  for item in args.set:
    override(cfg, item)
  from bissl_jax import cli  # pylint: disable=import-outside-toplevel
  cli.line_buffered_output()  # redirected results keep their order with stderr's messages
  cli.apply_cpu_kernels(cfg)  # before the backend starts, as bissl-jax run does
  mesh.initialize_multihost()  # one process per host: docs/scale.md, "How to launch"
  results = run(cfg, args.workdir)
  say_once(to_markdown(results))
  return results


if __name__ == "__main__":
  main()
