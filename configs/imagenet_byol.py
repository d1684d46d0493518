r"""The paper's BYOL setup: BYOL on ImageNet, ResNet-50, one downstream dataset.

Run (ImageNet and the downstream set prepared under /data/tfds; docs/reproduce_paper.md)::

  # From the authors' BYOL weights, converted to pretrained/byol_r50 (docs/pretrained.md):
  bissl-jax run --workdir=runs/byol_birds \
      --config=configs/imagenet_byol.py:downstream=caltech_birds2011 \
      --config.data.data_dir=/data/tfds --config.pretext.checkpoint=pretrained/byol_r50

  # Smoke test of the code path on the real data (tiny model, numbers meaningless):
  bissl-jax run --workdir=runs/smoke --config=configs/imagenet_byol.py:downstream=dtd,runlocal \
      --config.data.data_dir=/data/tfds

  # Before downloading anything: the same smoke test on a STAND-IN, the offline digits
  # in place of ImageNet and the downstream set (checks the install; numbers meaningless):
  bissl-jax run --workdir=runs/check_byol --config=configs/imagenet_byol.py:offline

Same as configs/imagenet_simclr.py except the pretext task: BYOL with EMA decay
0.9995, a 256-256-256 predictor on the 256-256-256 projector, the ``2 − 2·cos`` loss
in both directions; at BiSSL start the target is re-copied from the online network.
Learning rates and weight decays are the BYOL columns of Tables 3–5.

Cost: as configs/imagenet_simclr.py plus the target network's forward passes (not
measured here).

Expected result (paper Table 1, BYOL rows), e.g. birds (caltech_birds2011):
Only FT 52.7 ± 0.4, BiSSL+FT 60.1 ± 0.1; all twelve are in
``configs/common.TABLE1_RESULTS``.
"""
from configs import common


def get_config(arg: str = ""):
  """``arg``: ``downstream=<name>``, ``runlocal`` and/or ``offline``, comma-separated."""
  return common.paper_scale_config("byol", arg)
