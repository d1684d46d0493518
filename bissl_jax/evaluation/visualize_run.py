"""Command line and run-level entry: t-SNE figure and k-NN accuracy (paper C.2).

Any exported backbones (stage outputs of the pipeline: orbax directories with
``{'params', 'batch_stats'}`` and a ``meta`` record), one panel each::

  python -m bissl_jax.evaluation.visualize_run --out figs/ \\
      --backbone pretext=WORKDIR/seed0/pretext/output \\
      --backbone BiSSL=WORKDIR/seed0/bissl/bissl/output --dataset digits

or a finished pipeline run (its pretext and BiSSL backbones of one seed)::

  python -m bissl_jax.evaluation.visualize_run --workdir WORKDIR [--seed 0]

A panel is named ``NAME=`` where given, else by the stage recorded in the export.
Settings come from, in order: the flags; ``--config`` (a file with
``get_config()``) or, with ``--workdir``, the run's ``config.json``; what the export
itself says (architecture, width and stem read off the parameter shapes, image
size and downstream dataset off its meta record); finally 32 px and digits.

Writes ``tsne.png`` and ``knn.json`` (default folder: ``--out``, or
``WORKDIR/plots/seed<s>``) and prints the k-NN accuracies.
"""
import argparse
import importlib.util
import json
import os
import sys
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

from bissl_jax.types import PyTree
from bissl_jax.runtime.errors import USER_ERROR_STATUS


# ----------------------------------------------------------------------------- loading

def load_backbone(directory: str) -> Tuple[PyTree, PyTree, dict]:
  """``(backbone_params, backbone_stats, meta)`` of a stage output directory.

  Reads it with :func:`bissl_jax.convert.stage_output.load_export`; a tree without a
  'backbone' group is taken to be the backbone itself.
  """
  from bissl_jax.convert import stage_output
  variables, meta = stage_output.load_export(directory)
  params, stats = variables["params"], variables.get("batch_stats", {})
  if "backbone" in params:
    params, stats = params["backbone"], stats.get("backbone", {})
  return params, stats, meta


def infer_architecture(backbone_params: PyTree) -> dict:
  """``{'arch', 'width_multiplier', 'cifar_stem'}`` read off a ResNet parameter tree.

  ResNet-50 has a third block in its last stage (``layer4_2``); the stem kernel's
  size gives the stem (3: CIFAR, 7: ImageNet) and its output channels the width.
  """
  try:
    kernel = backbone_params["conv1"]["kernel"]
  except (KeyError, TypeError) as err:
    raise ValueError("The backbone has no 'conv1' kernel, so it is not a bissl_jax ResNet; "
                     "pass --arch, --width-multiplier and --cifar-stem explicitly.") from err
  return {"arch": "resnet50" if "layer4_2" in backbone_params else "resnet18",
          "width_multiplier": kernel.shape[-1] / 64.0,
          "cifar_stem": kernel.shape[0] == 3}


def _section(config, name: str) -> Mapping:
  """``config.<name>`` of a ConfigDict or plain dict, or {} without a config."""
  if config is None:
    return {}
  node = config[name] if isinstance(config, Mapping) else getattr(config, name, None)
  return node if node is not None else {}


def _first(*values, default=None):
  for value in values:
    if value is not None:
      return value
  return default


def _load_all(backbones) -> Tuple[Dict[str, Tuple[PyTree, PyTree]], dict]:
  """Loads ``{name: dir}`` or ``[(name or None, dir), ...]``; unnamed panels take the
  stage recorded in the export (else the folder name). Returns (backbones, first meta)."""
  pairs = list(backbones.items()) if isinstance(backbones, Mapping) else list(backbones)
  loaded, first_meta = {}, None
  for name, directory in pairs:
    params, stats, meta = load_backbone(directory)
    first_meta = meta if first_meta is None else first_meta
    folder = os.path.basename(os.path.normpath(directory))
    name = name or meta.get("stage") or folder
    if name in loaded:
      name = f"{name} ({folder})"
    loaded[name] = (params, stats)
  if not loaded:
    raise ValueError("No backbone given: pass at least one stage output directory.")
  return loaded, first_meta


def visualize_exports(backbones, out_dir: str, *, config=None,
                      overrides: Optional[Mapping[str, Any]] = None,
                      **visualize_kwargs) -> Dict[str, Any]:
  """Loads exported backbones, builds the model and data, runs the visualisation.

  Args:
    backbones: ``{panel name: stage output directory}``, or a list of ``(name or
      None, directory)`` pairs; unnamed panels take the stage in the export's meta.
    out_dir: where ``tsne.png`` and ``knn.json`` go.
    config: optional pipeline config (ConfigDict or the dict of ``config.json``)
      giving ``model.*`` and ``data.*``.
    overrides: explicit settings that win over the config and the exports: any of
      'arch', 'width_multiplier', 'cifar_stem', 'image_size', 'dataset', 'data_dir'.
    **visualize_kwargs: passed to :func:`bissl_jax.evaluation.visualize.visualize_backbones`
      (num_batches, max_points, batch_size, k, seed, max_train_points).

  Returns:
    The record of :func:`bissl_jax.evaluation.visualize.visualize_backbones`.
  """
  from bissl_jax.evaluation import visualize
  from bissl_jax.data import load_splits
  from bissl_jax.models.resnet import build_model

  overrides = dict(overrides or {})
  model_cfg, data_cfg = _section(config, "model"), _section(config, "data")
  loaded, meta = _load_all(backbones)
  inferred = infer_architecture(next(iter(loaded.values()))[0])

  def setting(key, config_value, fallback):
    return _first(overrides.get(key), config_value, fallback)

  size = int(setting("image_size", data_cfg.get("image_size"), meta.get("image_size") or 32))
  dataset = setting("dataset", data_cfg.get("downstream_dataset"),
                    meta.get("downstream_dataset") or "digits")
  splits = load_splits(dataset, data_dir=setting("data_dir", data_cfg.get("data_dir"), None),
                       image_size=size)
  model = build_model(
      setting("arch", model_cfg.get("arch"), inferred["arch"]),
      width_multiplier=float(setting("width_multiplier", model_cfg.get("width_multiplier"),
                                     inferred["width_multiplier"])),
      cifar_stem=bool(setting("cifar_stem", model_cfg.get("cifar_stem"),
                              inferred["cifar_stem"])))
  return visualize.visualize_backbones(model, loaded, splits, out_dir, size=size,
                                       **visualize_kwargs)


def run_backbones(workdir: str, seed: Optional[int] = None, config=None) -> Dict[str, str]:
  """``{'pretext': dir, 'BiSSL': dir}``: the stage outputs of one seed of a run.

  Args:
    workdir: a pipeline run directory.
    seed: the seed (default: the first of ``config.seeds``).
    config: the run's config (default: ``<workdir>/config.json``).
  """
  if config is None:
    config = _read_config_json(workdir)
  seeds = list(_section_value(config, "seeds") or [0])
  seed = seeds[0] if seed is None else int(seed)
  pretext_cfg = _section(config, "pretext")
  pretext_seed = seeds[0] if pretext_cfg.get("share_across_seeds") else seed
  pretext = pretext_cfg.get("checkpoint") or os.path.join(
      workdir, f"seed{pretext_seed}", "pretext", "output")
  return {"pretext": pretext, "BiSSL": os.path.join(workdir, f"seed{seed}", "bissl", "bissl",
                                                    "output")}


def visualize_run(workdir: str, *, seed: Optional[int] = None, config=None,
                  out_dir: Optional[str] = None, **visualize_kwargs) -> Dict[str, Any]:
  """Pretext vs BiSSL backbone of one seed of a finished (or resumed) pipeline run.

  Args:
    workdir: the run directory (holds ``config.json`` and ``seed<s>/...``).
    seed: which seed (default: the first).
    config: the run's config (default: ``<workdir>/config.json``).
    out_dir: output folder (default ``<workdir>/plots/seed<s>``).
    **visualize_kwargs: passed to :func:`bissl_jax.evaluation.visualize.visualize_backbones`.

  Returns:
    The record of :func:`bissl_jax.evaluation.visualize.visualize_backbones`.
  """
  if config is None:
    config = _read_config_json(workdir)
  backbones = run_backbones(workdir, seed, config)
  seed_dir = os.path.basename(os.path.dirname(os.path.dirname(os.path.dirname(
      backbones["BiSSL"]))))
  return visualize_exports(backbones, out_dir or os.path.join(workdir, "plots", seed_dir),
                           config=config, **visualize_kwargs)


def _section_value(config, name: str):
  return config.get(name) if isinstance(config, Mapping) else getattr(config, name, None)


def _read_config_json(workdir: str) -> dict:
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} does not exist: --workdir must be a directory written by "
                            "bissl_jax.pipeline.run (python -m experiments.main).")
  with open(path) as f:
    return json.load(f)


def _load_config(path: Optional[str]):
  if not path:
    return None
  spec = importlib.util.spec_from_file_location("_visualize_config", path)
  if spec is None or spec.loader is None or not os.path.exists(path):
    raise FileNotFoundError(f"--config {path}: not a Python file with get_config().")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


# ----------------------------------------------------------------------------- command line

def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog="python -m bissl_jax.evaluation.visualize_run",
      description="Recalibrate BatchNorm on downstream training data, then draw a t-SNE "
                  "of test features and report cosine k-NN accuracy for each backbone.")
  source = parser.add_mutually_exclusive_group(required=True)
  source.add_argument("--backbone", action="append", metavar="[NAME=]DIR",
                      help="stage output directory (repeat for side-by-side panels)")
  source.add_argument("--workdir", help="a pipeline run: its pretext and BiSSL backbones")
  parser.add_argument("--seed", type=int, default=None,
                      help="with --workdir: which seed's backbones (default: the first); "
                           "with --backbone: the shuffling/t-SNE seed (default 0)")
  parser.add_argument("--out", default=None,
                      help="output folder (required with --backbone; default with "
                           "--workdir: WORKDIR/plots/seed<s>)")
  parser.add_argument("--config", default=None,
                      help="config file with get_config() supplying model/data settings")
  parser.add_argument("--dataset", default=None,
                      help="downstream dataset (default: config or export meta, else digits)")
  parser.add_argument("--data-dir", default=None, help="TFDS data directory")
  parser.add_argument("--arch", default=None, choices=["resnet18", "resnet50"],
                      help="default: read off the parameters")
  parser.add_argument("--width-multiplier", type=float, default=None,
                      help="default: read off the parameters")
  parser.add_argument("--cifar-stem", action="store_true", default=None,
                      help="3x3 stem without max-pool (default: read off the parameters)")
  parser.add_argument("--image-size", type=int, default=None)
  parser.add_argument("--num-batches", type=int, default=100,
                      help="BatchNorm recalibration batches (paper: about 100)")
  parser.add_argument("--batch-size", type=int, default=256)
  parser.add_argument("--max-points", type=int, default=2000, help="test points in the t-SNE")
  parser.add_argument("--max-train-points", type=int, default=None,
                      help="cap on the k-NN memory bank (default: the whole train split)")
  parser.add_argument("--k", type=int, default=20, help="neighbours for k-NN")
  return parser


def _parse_backbone(arg: str) -> Tuple[Optional[str], str]:
  name, sep, directory = arg.partition("=")
  return (name, directory) if sep and name and not os.path.exists(arg) else (None, arg)


def main(argv: Optional[Sequence[str]] = None) -> int:
  """Runs the visualisation; returns the exit status (errors printed, status 2)."""
  parser = _parser()
  args = parser.parse_args(argv)
  if args.backbone and not args.out:
    parser.error("--out is required with --backbone")
  overrides = {"arch": args.arch, "width_multiplier": args.width_multiplier,
               "cifar_stem": args.cifar_stem, "image_size": args.image_size,
               "dataset": args.dataset, "data_dir": args.data_dir}
  kwargs = dict(num_batches=args.num_batches, max_points=args.max_points,
                batch_size=args.batch_size, k=args.k, seed=args.seed or 0,
                max_train_points=args.max_train_points)
  try:
    config = _load_config(args.config)
    if args.workdir:
      kwargs.pop("seed")  # --seed picks the run's seed here; shuffling uses seed 0
      out = visualize_run(args.workdir, seed=args.seed, config=config, out_dir=args.out,
                          overrides=overrides, **kwargs)
    else:
      backbones = [_parse_backbone(arg) for arg in args.backbone]
      out = visualize_exports(backbones, args.out, config=config, overrides=overrides,
                              **kwargs)
  except (ValueError, FileNotFoundError, KeyError, ImportError) as e:
    print(f"error: {e}", file=sys.stderr)
    return USER_ERROR_STATUS
  for name, acc in out["knn_accuracy"].items():
    shown = "n/a (multi-label)" if acc is None else f"{100 * acc:.2f}%"
    print(f"{name}: {args.k}-NN accuracy {shown}")
  print(f"wrote {out['figure']} and {os.path.join(os.path.dirname(out['figure']), 'knn.json')}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
