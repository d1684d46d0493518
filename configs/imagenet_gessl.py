r"""GeSSL's ImageNet setting (paper Table 2 / Table 8, §6.3): SimCLR + GeSSL, ResNet-50.

Run (TFDS ``imagenet2012`` prepared under data_dir; see docs/datasets.md)::

  # SimCLR + GeSSL pretraining (config.seed); the output is a pretext stage export:
  python -m bissl_jax run --config=configs/imagenet_gessl.py --workdir=runs/imagenet_gessl \
      --config.data.data_dir=/data/tfds

  # BYOL + GeSSL, 100 epochs, or the smoke size (numbers meaningless):
  python -m bissl_jax run --config=configs/imagenet_gessl.py:task=byol,epochs=100
  python -m bissl_jax run --config=configs/imagenet_gessl.py:runlocal
  # the smoke size on a STAND-IN, the offline digits in place of ImageNet (no data needed):
  python -m bissl_jax run --config=configs/imagenet_gessl.py:offline

Settings the paper gives: ResNet-50 (§6.2), 200 pretraining epochs for Table 2
(Table 8 also 100, 400 and 1000: ``epochs=<n>``), 224 px crops with SimCLR's
augmentations and 5 views per image (Appendix C), tasks of B = 16 images, n = 8 tasks
per outer update (G.5), K = 1 and λ = 10 (§6.2, §6.3), KL second level, the outer
gradient by AID-FD (G.4; ``gessl.fd_radius = 0.01``, DARTS's value), SGD with
momentum 0.9 and weight decay 1e-4 (Appendix C). Evaluation in the paper: the linear
probe of §6.2 (frozen features, SGD momentum 0.9, batch 128, 500 epochs, LR 5e-2 →
5e-6; ``config.probe``) and semi-supervised fine-tuning on 1% and 10% label subsets
for 50 epochs with classifier/backbone LRs 0.05/0.0001 (1%) and 1.0/0.01 (10%)
(``bissl_jax.evaluation.fewshot.stratified_subset`` draws the subsets).

Choices the paper leaves open (docs/gessl.md): β (``pretext.lr = 0.05``) and its
schedule (10 warm-up epochs, cosine), α (``gessl.inner_lr = 0.1``), how the two losses
combine (their sum). The library's GeSSL comparison runner holds the downstream
features in memory and does not stream ImageNet, so the ImageNet linear probe is not
wired to a command here: score the exported backbone with
``bissl_jax.evaluation.fewshot.extract_features`` and ``linear_probe`` on the probe's splits.

Cost: not measured here (no accelerator on the development machines). At K = 1,
λ = 10 one outer step costs about ten plain SimCLR steps of its batch (128 images,
five views each; ``bench/gessl_cost.py``); 200 epochs of 10,009 outer steps.

Expected result (paper Table 2, ImageNet linear top-1 / top-5 %, 200 epochs):
SimCLR 68.32 ± 0.31 / 89.76 ± 0.23, SimCLR + GeSSL 69.65 ± 0.16 / 90.98 ± 0.19.
Semi-supervised (Table 3, top-1 % with 1% / 10% of the labels, 1000 epochs):
SimCLR 48.3 / 65.6, SimCLR + GeSSL 50.4 / 66.9.

``runlocal`` is ``common.apply_runlocal`` (pretext epochs 0: ImageNet is not local).
"""
from configs import common


def get_config(arg: str = ""):
  """``arg``: ``task=simclr|byol``, ``epochs=<n>``, ``runlocal`` and/or ``offline``."""
  args = common.parse_arg(arg)
  config = common.base_config()
  config.seeds = (0, 1, 2, 3, 4)          # the paper averages five runs
  config.stages = "pretext"
  config.data.pretext_dataset = "imagenet2012"
  config.data.downstream_dataset = "imagenet2012"
  config.data.image_size = 224
  config.model.arch = "resnet50"
  config.pretext.task = args.get("task", "simclr")
  config.pretext.epochs = int(args.get("epochs", 200))
  common.apply_gessl_paper_settings(config,
                                    runlocal="runlocal" in args or common.OFFLINE in args)
  return common.apply_offline_standin(config, args)
