r"""Offline detection: BiSSL vs. the baseline with Faster R-CNN C4 on synthetic digit canvases.

Run (no download, no GPU)::

  python -m experiments.main --config=configs/digits_detection.py --workdir=runs/digits_det

The downstream task is object detection (BiSSL paper §4.3.1, Table 2, on a CPU-sized
stand-in): ``data.downstream_dataset='synthetic_detection'`` selects it
(``bissl_jax.data.detection_sets``): scikit-learn's bundled digits pasted on black
32×32 canvases, 1–2 digits of 8–16 px per canvas with their tight boxes, 10 classes;
512 training, 128 validation and 128 test canvases drawn from disjoint digit pools.
Pretext pretraining and BiSSL's lower level use the training canvases without
labels (SimCLR, τ=0.5).

Model: ResNet-18 with the 3×3 stem at width 1/8, cut after res4
(``model.backbone_ends_at='res4'``): θ is the stem and res2–res4 (C4, stride 4 with
this stem); res5 joins the SimCLR projector in the pretext head (Appendix B.6). The
detection head φ_D is the RPN (anchors 8 and 16 px) and res5 as the RoI box head
(``bissl_jax.data.detection_sets.detector_config``). The upper-level loss is the
four-term Faster R-CNN loss; the metric is VOC AP50 with VOC2007's 11-point
interpolation (``bissl_jax.evaluation.detection_metrics``).

Schedule: pretext 10 epochs (LARS, peak LR 1.0, batch 64); head warm-up 3 epochs
(Adam, LR 3e-3, batch 16, backbone frozen); BiSSL T=8 alternations of N_L=4 lower and
N_U=2 upper steps (3 layer-wise CG iterations, λ=0.001, δ=10, lower LARS LR 0.5,
upper Adam LR 3e-3, batch 64 below and 16 above); fine-tuning 6 epochs (Adam, cosine
from LR 3e-3, decoupled weight decay 1e-4, batch 16; best validation AP50 epoch kept)
for both pipelines; 3 seeds. (The paper uses SGD for the detector; Adam is the rate
at which this small detector is known to learn from scratch in a few hundred steps.)

Result (3 seeds, 'fast' CPU kernels; docs/detection.md): test AP50 (VOC2007
11-point) Only FT 11.7 ± 1.4 % (10.2, 12.8, 12.2), BiSSL+FT 13.2 ± 2.4 % (10.6, 13.8,
15.2). Cost on the 2-core development CPU, nearly quiet (2026-12-07): 673 s wall,
709 s user + 45 s system CPU time.

``get_config("runlocal")`` is the seconds-of-compute smoke size the tests use
(the detector's compilation takes most of its time).
"""
from configs import common


def get_config(arg: str = ""):
  """The offline detection config; ``arg`` may be ``runlocal`` for the smoke-test size."""
  config = common.base_config()
  config.seeds = (0, 1, 2)
  config.log_every = 5
  config.checkpoint_every = 2

  config.data.pretext_dataset = "synthetic_detection"
  config.data.downstream_dataset = "synthetic_detection"
  config.data.image_size = 32

  config.model.arch = "resnet18"
  config.model.width_multiplier = 0.125
  config.model.cifar_stem = True
  config.model.backbone_ends_at = "res4"
  config.model.projector = "64-64-64"

  config.pretext.epochs = 10
  config.pretext.batch_size = 64
  config.pretext.lr = 1.0
  config.pretext.warmup_epochs = 1
  config.pretext.bn_grouping = "joint"

  # Adam at 3e-3 everywhere above (the rate at which this detector learns from scratch
  # in tests/detection/test_detection_training.py); weight decay decoupled.
  config.head_warmup.epochs = 3
  config.head_warmup.batch_size = 16
  config.head_warmup.optimizer = "adam"
  config.head_warmup.lr = 3e-3
  config.head_warmup.weight_decay = 1e-4

  config.bissl.alternations = 8
  config.bissl.lower_steps = 4
  config.bissl.upper_steps = 2
  config.bissl.cg_iters = 3
  config.bissl.lower_lr = 0.5
  config.bissl.upper_optimizer_name = "adam"   # upper LR: head_warmup.lr
  config.bissl.pretext_batch_size = 64
  config.bissl.downstream_batch_size = 16
  config.bissl.checkpoint_every = 4

  config.finetune.epochs = 6
  config.finetune.batch_size = 16
  config.finetune.optimizer = "adam"
  config.finetune.lr = 3e-3
  config.finetune.weight_decay = 1e-4
  config.finetune.bissl_lr = 3e-3
  config.finetune.bissl_weight_decay = 1e-4
  config.evaluate.batch_size = 64

  config.search.num_configs = 3
  config.search.epochs = 2
  config.bissl_variants = {}

  if "runlocal" in common.parse_arg(arg):
    common.apply_runlocal(config, pretext_epochs=1)
    # The detector needs its canvases (the shrink's 8 px leaves a 2×2 C4 map).
    config.data.image_size = 32
    config.head_warmup.batch_size = 16
    config.bissl.downstream_batch_size = 16
    config.finetune.batch_size = 16
    config.evaluate.batch_size = 64
  return config
