r"""GeSSL's STL-10 setting (paper Table 1, Fig. 2, G.3–G.5): SimCLR + GeSSL, ResNet-18.

Run (TFDS ``stl10`` prepared under data_dir; see docs/datasets.md)::

  # SimCLR vs SimCLR + GeSSL, linear probe and 5-way few-shot on held-out classes:
  python -m bissl_jax.pipeline.gessl_comparison --config configs/stl10_gessl.py \
      --workdir runs/stl10_gessl --set data.data_dir=/data/tfds

  # SimCLR + GeSSL pretraining alone (config.seed), through the pipeline's CLI:
  python -m bissl_jax run --config=configs/stl10_gessl.py --workdir=runs/stl10_gessl_pretext \
      --config.data.data_dir=/data/tfds

  # BYOL + GeSSL, or the smoke size (numbers meaningless):
  python -m bissl_jax run --config=configs/stl10_gessl.py:task=byol
  python -m bissl_jax run --config=configs/stl10_gessl.py:runlocal

Settings the paper gives: ResNet-18 feature extractor (§6.2); tasks of B = 16 images
(Appendix C, G.5), n = 8 tasks per outer update (G.5), every image augmented 5 times
with SimCLR's augmentations (Appendix C: A = 5 views), K = 1 first-level step and
λ = 10 (§6.2, G.4), the KL divergence in the second level (Eq. 7), the outer gradient
by AID-FD (G.4: DARTS's finite-difference Hessian-vector products, ``gessl.fd_radius``;
the paper gives no ε, 0.01 is DARTS's), SGD with momentum
0.9 and weight decay 1e-4 (Appendix C: ``pretext.optimizer='sgd'``); the linear probe
of §6.2 (frozen features, SGD momentum 0.9, batch 128, 500 epochs, LR 5e-2 → 5e-6).

Choices the paper leaves open (docs/gessl.md lists them all): the outer learning
rate β (``pretext.lr = 0.05``) and its schedule (the library's 10-epoch warm-up and
cosine), the inner learning rate α (``gessl.inner_lr = 0.1``), the pretraining epochs
(500, as configs/stl10_simclr.py), the image size (STL-10's native 96 px rather than
Appendix C's 224 px crops), how SimCLR's loss and GeSSL's combine (their sum), and
the few-shot protocol on STL-10 (5-way 1/5-shot, 15 queries, 600 episodes, nearest
prototype on 5 held-out test classes; the unlabelled pretraining set is not filtered
by class, so these classes are not strictly unseen). One outer step takes
n·B = 128 images (``pretext.batch_size``).

Cost: not measured here (no accelerator on the development machines). One outer
step costs about ten plain SimCLR steps at K = 1, λ = 10 (``bench/gessl_cost.py``,
docs/gessl.md), with five views instead of two on top; 500 epochs of 781 outer
steps each.

Expected result (paper Table 1, STL-10 linear top-1 %, ± 95% CI over 5 runs):
SimCLR 90.51 ± 0.14, SimCLR + GeSSL 93.15 ± 0.28; BYOL 91.99 ± 0.13, BYOL + GeSSL
94.45 ± 0.18. The paper reports no STL-10 few-shot numbers.

``runlocal`` is ``common.apply_runlocal`` (pretext epochs 0: the unlabelled set is
not subsampled) with a 2-epoch probe and 5 episodes.
"""
from configs import common


def get_config(arg: str = ""):
  """``arg``: ``task=simclr|byol`` and/or ``runlocal``, comma-separated."""
  args = common.parse_arg(arg)
  config = common.base_config()
  config.seeds = (0, 1, 2, 3, 4)          # the paper averages five runs
  config.stages = "pretext"
  config.data.pretext_dataset = "stl10"
  config.data.downstream_dataset = "stl10"
  config.data.image_size = 96
  config.model.arch = "resnet18"
  config.pretext.task = args.get("task", "simclr")
  config.pretext.epochs = 500
  common.apply_gessl_paper_settings(config, runlocal="runlocal" in args)
  return config
