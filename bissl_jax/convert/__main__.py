"""Command line: PyTorch checkpoint <-> converted directory.

  python -m bissl_jax.convert --from-torch backbone.pth [head.pth] --arch resnet50 --out DIR
  python -m bissl_jax.convert --to-torch DIR --arch resnet50 --out model.pth

DIR for --to-torch may also be a stage output of the pipeline (BiSSL's θ_P).
"""
import argparse
import os
import sys
from typing import Optional, Sequence

from bissl_jax import convert


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
  parser.add_argument("--arch", required=True, choices=["resnet18", "resnet50"])
  parser.add_argument("--out", required=True,
                      help="output directory (--from-torch) or .pth file (--to-torch)")
  parser.add_argument("--cifar-stem", action="store_true",
                      help="3x3 stem without max-pool (--from-torch only)")
  parser.add_argument("--width-multiplier", type=float, default=1.0,
                      help="--from-torch only")
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


def main(argv: Optional[Sequence[str]] = None) -> int:
  """Runs the converter; returns the exit status (errors are printed, status 1)."""
  args = _parser().parse_args(argv)
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
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())
