"""Command line: PyTorch checkpoint <-> converted directory.

  python -m bissl_jax.convert --from-torch backbone.pth [head.pth] --arch resnet50 --out DIR
  python -m bissl_jax.convert --to-torch DIR --arch resnet50 --out model.pth
  bissl-jax convert --from-torch backbone.pth head.pth \
      --config=configs/imagenet_simclr.py:downstream=oxford_iiit_pet --workdir=runs/pets

DIR for --to-torch may also be a stage output of the pipeline (BiSSL's θ_P).

``--config=FILE[:ARGS]`` takes the model the weights must fit from the run's config
(``model.arch``, ``model.width_multiplier``, ``model.cifar_stem``, and the projector and
predictor widths the run expects), so they need not be repeated; flags given explicitly
win. ``--workdir=DIR`` (with ``--from-torch`` and no ``--out``) writes to
``DIR/pretrained`` and prints the ``bissl-jax run`` command that starts from it.
"""
import argparse
import os
import shlex
import sys
from typing import Optional, Sequence

from bissl_jax import convert
from bissl_jax.runtime.errors import USER_ERROR_STATUS


ARCHS = ("resnet18", "resnet50")
WORKDIR_WEIGHTS = "pretrained"  # --workdir's folder of converted weights


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog="python -m bissl_jax.convert",
      description="Convert ResNet (+ projector/predictor) weights between PyTorch "
                  "state dicts and bissl_jax converted directories.")
  direction = parser.add_mutually_exclusive_group(required=True)
  direction.add_argument("--from-torch", nargs="+", metavar="PTH",
                         help="PyTorch state dict(s); several files are merged "
                              "(e.g. the reference's backbone and head files)")
  direction.add_argument("--to-torch", metavar="DIR",
                         help="a converted directory, or a bissl_jax stage output "
                              "such as the BiSSL stage's output directory, to export")
  parser.add_argument("--config", default=None, metavar="FILE[:ARGS]",
                      help="the run's config file: model fields and head widths from its "
                           "model section (instead of --arch, --width-multiplier, "
                           "--cifar-stem, --projector, --predictor)")
  parser.add_argument("--workdir", default=None,
                      help="the run's directory: --from-torch writes to WORKDIR/"
                           f"{WORKDIR_WEIGHTS} when --out is not given")
  parser.add_argument("--arch", default=None, choices=ARCHS,
                      help="required unless --config gives model.arch")
  parser.add_argument("--out", default=None,
                      help="output directory (--from-torch) or .pth file (--to-torch)")
  parser.add_argument("--cifar-stem", action="store_true", default=None,
                      help="3x3 stem without max-pool (--from-torch only)")
  parser.add_argument("--width-multiplier", type=float, default=None,
                      help="--from-torch only (default 1, or --config's)")
  parser.add_argument("--prefix", default=None,
                      help="keep only keys under this prefix and strip it; default: "
                           "strip module./backbone./head. automatically; '' keeps "
                           "keys as they are")
  parser.add_argument("--projector", default=None,
                      help="expected projector widths, e.g. 8192-8192-8192 "
                           "(default: read from the checkpoint)")
  parser.add_argument("--predictor", default=None,
                      help="expected predictor widths (default: from the checkpoint)")
  parser.add_argument("--backbone-only", action="store_true",
                      help="--to-torch: leave out projector/predictor (for timm's "
                           "num_classes=0 models and detectron2's converter)")
  parser.add_argument("--overwrite", action="store_true",
                      help="replace an existing output")
  return parser


def _from_config(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
  """Fills the model flags not given from ``--config``'s model section; checks them."""
  if args.config:
    from bissl_jax import cli  # pylint: disable=g-import-not-at-top  (its config loader)
    try:
      model = cli.load_config(args.config).model
    except cli.UsageError as e:
      parser.error(str(e))
    if args.arch is None and str(model.arch) not in ARCHS:
      parser.error(f"--config={args.config} has model.arch={model.arch!r}: this command "
                   f"converts ResNet weights ({', '.join(ARCHS)}); give --arch, or start "
                   "the run from the weights directly (docs/pretrained.md).")
    defaults = {"arch": str(model.arch), "width_multiplier": float(model.width_multiplier),
                "cifar_stem": bool(model.cifar_stem),
                "projector": model.get("projector") or None,
                "predictor": model.get("predictor") or None}
    for name, value in defaults.items():
      if getattr(args, name) is None:
        setattr(args, name, value)
  if args.arch is None:
    parser.error("give --arch (resnet18 or resnet50) or --config=FILE, the run's config")
  args.width_multiplier = 1.0 if args.width_multiplier is None else args.width_multiplier
  args.cifar_stem = bool(args.cifar_stem)
  if args.out is None:
    if args.to_torch or not args.workdir:
      parser.error("give --out" + (" (or --workdir)" if not args.to_torch else ""))
    args.out = os.path.join(args.workdir, WORKDIR_WEIGHTS)


def _next_command(args: argparse.Namespace, out: str) -> str:
  parts = ["bissl-jax", "run"]
  parts += [f"--config={args.config}"] if args.config else []
  parts += [f"--workdir={args.workdir}"] if args.workdir else []
  return " ".join(shlex.quote(p) for p in parts + [f"--config.pretext.checkpoint={out}"])


def main(argv: Optional[Sequence[str]] = None) -> int:
  """Runs the converter; returns the exit status (errors are printed, status 2)."""
  parser = _parser()
  args = parser.parse_args(argv)
  _from_config(args, parser)
  try:
    if args.from_torch:
      params, batch_stats = convert.torch_to_flax(
          args.from_torch, arch=args.arch, cifar_stem=args.cifar_stem,
          width_multiplier=args.width_multiplier, prefix=args.prefix,
          projector=args.projector, predictor=args.predictor)
      provenance = {"direction": "from-torch", "prefix": args.prefix,
                    "sources": convert.file_provenance(args.from_torch)}
      out = convert.save_converted(
          args.out, params, batch_stats, arch=args.arch, cifar_stem=args.cifar_stem,
          width_multiplier=args.width_multiplier, provenance=provenance,
          overwrite=args.overwrite)
      groups = ", ".join(["backbone"] + sorted(params.get("pretext_head", {})))
      print(f"wrote {groups} ({args.arch}) to {out}")
      if args.config or args.workdir:
        print(f"start the run from them (pretext pretraining skipped):\n  "
              f"{_next_command(args, out)}")
    else:
      if os.path.exists(args.out) and not args.overwrite:
        raise FileExistsError(f"{args.out} exists; pass --overwrite to replace it")
      params, batch_stats, _ = convert.load_variables(args.to_torch, arch=args.arch)
      if args.backbone_only:
        params = {"backbone": params["backbone"]}
        batch_stats = {"backbone": batch_stats["backbone"]}
      convert.save_torch(params, batch_stats, args.out, arch=args.arch)
      print(f"wrote PyTorch state dict ({args.arch}) to {os.path.abspath(args.out)}")
  except (ValueError, FileNotFoundError, FileExistsError, ImportError) as e:
    print(f"error: {e}", file=sys.stderr)
    return USER_ERROR_STATUS
  return 0


if __name__ == "__main__":
  sys.exit(main())
