"""Smoke run of BiSSL with the detection upper level, offline, on synthetic digits.

Not the pipeline (no head warm-up, fine-tuning or checkpoints): a tiny ResNet-18
whose shared backbone ends at res4, SimCLR as the lower level (res5 in its pretext
head), :class:`bissl_jax.tasks.downstream.detection.Detection` as the upper level
on scikit-learn's digits pasted on canvases (``bissl_jax.data.synthetic_detection``,
nothing downloaded). It prints the upper-level loss of every alternation and the
test AP50 (VOC2007 11-point) of the upper level's θ_D and φ_D before and after.

Run: ``python -m bench.detection_bissl_smoke --alternations 3``.
"""
import argparse
import sys
import time
from typing import Optional, Sequence

import jax
import numpy as np

from bissl_jax.core import alternation as ts
from bissl_jax.core import state as bilevel
from bissl_jax.core.params import init_params
from bissl_jax.data.synthetic_detection import NUM_CLASSES, make_split
from bissl_jax.detection.faster_rcnn import DetectorConfig
from bissl_jax.detection.voc_eval import voc_ap
from bissl_jax.models import resnet
from bissl_jax.tasks import pretext
from bissl_jax.tasks.downstream.detection import make_detection_task
from configs import common

# A detector sized for 32-px canvases with 8–16 px digits (C4 8×8 with the 3×3 stem).
CONFIG = DetectorConfig(num_classes=NUM_CLASSES, anchor_sizes=(8.0, 16.0),
                        rpn_batch_size_per_image=32, pre_nms_topk_train=64,
                        post_nms_topk_train=16, pre_nms_topk_test=64, post_nms_topk_test=16,
                        roi_output_size=4, roi_sampling_ratio=2, roi_batch_size_per_image=16,
                        detections_per_image=8)
CANVAS, B_PRE, B_DOWN = 32, 8, 4


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--alternations", type=int, default=3)
  parser.add_argument("--lower-steps", type=int, default=2)
  parser.add_argument("--upper-steps", type=int, default=2)
  parser.add_argument("--upper-lr", type=float, default=0.02)
  parser.add_argument("--upper-weight-decay", type=float, default=0.0)
  parser.add_argument("--seed", type=int, default=0)
  return parser.parse_args(list(sys.argv[1:] if argv is None else argv))


def _split(n, name, seed):
  return make_split(n, name, canvas=CANVAS, max_objects=2, min_size=8, max_size=16, seed=seed)


def _setup(args, model, task):
  cfg = common.base_config().bissl.to_dict()
  cfg.update(lower_steps=args.lower_steps, upper_steps=args.upper_steps,
             alternations=args.alternations, solver="layerwise_cg", cg_iters=3,
             upper_lr=args.upper_lr, upper_weight_decay=args.upper_weight_decay)
  return bilevel.BisslSetup.from_config(model, pretext.SimCLR(model, image_size=CANVAS), cfg,
                                        downstream=task)


def _batches(setup, train, rng):
  rows = lambda n: rng.choice(len(train["images"]), n, replace=False)
  down = rows(setup.upper_steps * B_DOWN)
  per_step = lambda x: x[down].reshape((setup.upper_steps, B_DOWN) + x.shape[1:])
  return bilevel.AlternationBatches(
      pretext=train["images"][rows(setup.lower_steps * B_PRE)].reshape(
          (setup.lower_steps, B_PRE, CANVAS, CANVAS, 3)),
      hvp=train["images"][rows(B_PRE)],
      downstream_images=per_step(train["images"]),
      downstream_labels={"boxes": per_step(train["gt_boxes"]),
                         "classes": per_step(train["gt_classes"]),
                         "valid": per_step(train["gt_valid"])})


def ap50(task, params, stats, split) -> float:
  """VOC2007 11-point AP50 of the task's detections on every image of ``split``."""
  detect = jax.jit(task.logits)
  inputs = task.prepare(None, split["images"], train=False)
  out = jax.device_get(detect(params["backbone"], params["downstream_head"],
                              stats["backbone"], inputs))
  detections = [{k: v[i] for k, v in out.items()} for i in range(len(split["images"]))]
  truth = [{"boxes": split["gt_boxes"][i], "classes": split["gt_classes"][i],
            "valid": split["gt_valid"][i]} for i in range(len(split["images"]))]
  return float(voc_ap(detections, truth, use_07_metric=True, num_classes=NUM_CLASSES)["map"])


def main(argv: Optional[Sequence[str]] = None) -> int:
  args = parse_args(argv)
  model = resnet.build_model("resnet18", width_multiplier=0.125, cifar_stem=True,
                             backbone_ends_at="res4")
  task = make_detection_task(model, CANVAS, CONFIG)
  setup = _setup(args, model, task)
  train, test = _split(256, "train", args.seed), _split(64, "test", args.seed)
  params, stats = init_params(model, task, jax.random.PRNGKey(args.seed), CANVAS)
  state = bilevel.init_bilevel_state(setup, params, stats)
  upper = lambda s: (s.upper.params, s.upper.batch_stats)
  print(f"AP50 before: {ap50(task, *upper(state), test):.4f}")
  run, rng = ts.make_alternation_fn(setup), np.random.default_rng(args.seed)
  key = jax.random.PRNGKey(args.seed + 1)
  for a in range(args.alternations):
    key, k = jax.random.split(key)
    start = time.perf_counter()
    state, metrics = run(state, _batches(setup, train, rng), k)
    ts.raise_if_nonfinite(metrics, a)
    print(f"alternation {a}: upper_loss {float(metrics['upper_loss']):.4f} "
          f"v_ig_norm {float(metrics['v_ig_norm']):.4g} ({time.perf_counter() - start:.1f} s)")
  print(f"AP50 after:  {ap50(task, *upper(state), test):.4f}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
