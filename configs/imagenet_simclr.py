r"""The paper's main setup: SimCLR on ImageNet, ResNet-50, one downstream dataset.

Run (ImageNet and the downstream set prepared under /data/tfds; step by step, from an
empty GPU or TPU machine: docs/reproduce_paper.md)::

  # From the authors' ImageNet-pretrained SimCLR weights, converted once with
  # `bissl-jax convert --from-torch <backbone>.pth <head>.pth
  # --config=configs/imagenet_simclr.py:downstream=oxford_iiit_pet
  # --workdir=runs/simclr_pets` (docs/pretrained.md); stage 1 is skipped:
  bissl-jax run --workdir=runs/simclr_pets \
      --config=configs/imagenet_simclr.py:downstream=oxford_iiit_pet \
      --config.data.data_dir=/data/tfds \
      --config.pretext.checkpoint=runs/simclr_pets/pretrained

  # Everything, pretraining included (500 ImageNet epochs first):
  bissl-jax run --workdir=runs/simclr_pets_full \
      --config=configs/imagenet_simclr.py:downstream=oxford_iiit_pet \
      --config.data.data_dir=/data/tfds

  # Smoke test of the code path on the real data (tiny model, numbers meaningless):
  bissl-jax run --workdir=runs/smoke \
      --config=configs/imagenet_simclr.py:downstream=dtd,runlocal \
      --config.data.data_dir=/data/tfds

  # Before downloading anything: the same smoke test on a STAND-IN, the offline digits
  # in place of ImageNet and the downstream set (checks the install; numbers meaningless):
  bissl-jax run --workdir=runs/check_simclr --config=configs/imagenet_simclr.py:offline

``downstream`` is one of food101, cifar10, cifar100, caltech_birds2011, sun397,
cars196, fgvc_aircraft, voc2007, dtd, oxford_iiit_pet, caltech101, oxford_flowers102
(default oxford_flowers102). Its fine-tuning, head warm-up and upper-level learning
rates and weight decays come from Tables 3–5 of the paper (configs/common.py).

Settings (paper §4.2, Appendix B): ResNet-50, 96 px, projector 256-256-256, τ=0.5;
pretext LARS, 500 epochs, batch 1024, peak LR 4.8, 10 warm-up epochs; head warm-up
20 epochs at constant LR; BiSSL λ=0.001, δ=10, 5 layer-wise CG iterations, N_L=20,
N_U=8, T=500, lower LR 1.0; fine-tuning 400 epochs, batch 256, 10 seeds; validation
is a stratified 20% of train where the dataset has none; test is reported.

Cost: not measured here (no accelerator on the development machines). Pretext
pretraining dominates: 500 ImageNet epochs of ResNet-50 at 96 px; BiSSL adds
T·N_L = 10,000 lower steps (≈8 epochs) plus T·N_U = 4,000 upper steps of about
2 + 1.6·5 gradient-equivalents each; every seed then fine-tunes 400 epochs twice.

Expected result (paper Table 1, test top-1 %, mAP for voc2007), e.g. pets:
Only FT 73.2 ± 0.3, BiSSL+FT 79.6 ± 0.3; flowers: 82.6 ± 0.3 vs 85.6 ± 0.2; all
twelve are in ``configs/common.TABLE1_RESULTS``.
"""
from configs import common


def get_config(arg: str = ""):
  """``arg``: ``downstream=<name>``, ``runlocal`` and/or ``offline``, comma-separated."""
  return common.paper_scale_config("simclr", arg)
