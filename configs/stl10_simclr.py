r"""The paper's small-scale study (§4.3.2): SimCLR on STL-10 unlabelled, ResNet-18.

Run (TFDS ``stl10`` and the downstream set prepared under data_dir)::

  python -m experiments.main --workdir=runs/stl10_flowers \
      --config=configs/stl10_simclr.py --config.data.data_dir=/data/tfds

  # another downstream set, or a tiny smoke run on the real data:
  python -m experiments.main --config=configs/stl10_simclr.py:downstream=dtd
  python -m experiments.main --config=configs/stl10_simclr.py:runlocal

Settings: as configs/imagenet_simclr.py (96 px, SimCLR τ=0.5, λ=0.001, δ=10,
5 layer-wise CG iterations, N_L=20, N_U=8, T=500, Tables 3–5 for the learning
rates and weight decays of the downstream set) with a ResNet-18 backbone and the
100,000 unlabelled STL-10 images for pretraining and BiSSL's lower level. With
batch 1024 STL-10 has 97 pretext batches, so BiSSL's T·N_L = 10,000 lower steps
are ≈100 pretext epochs; following the paper the baseline therefore gets its own
pretext run with 100 extra epochs (``pretext.baseline_epochs``), while BiSSL starts
from the ``pretext.epochs`` model. The paper varies ``pretext.epochs`` (Fig. 2);
500 is the default here. Downstream: oxford_flowers102 (the paper's choice).

Cost: not measured here (no accelerator on the development machines): two pretext
runs of 500 and 600 STL-10 epochs with ResNet-18 at 96 px dominate.

Expected result: paper Fig. 2 (flowers, top-1): BiSSL+FT above Only FT once
pretraining is long enough; the figure gives no table of values.
"""
from configs import common


def get_config(arg: str = ""):
  """``arg``: ``downstream=<name>``, ``pretext_epochs=<n>`` and/or ``runlocal``."""
  args = common.parse_arg(arg)
  config = common.base_config()
  config.data.pretext_dataset = "stl10"
  config.data.downstream_dataset = common.canonical_dataset(
      args.get("downstream", "oxford_flowers102"))
  config.model.arch = "resnet18"
  config.pretext.epochs = int(args.get("pretext_epochs", 500))
  config.pretext.baseline_epochs = config.pretext.epochs + 100
  common.apply_paper_hyperparams(config)
  if "runlocal" in args:
    common.apply_runlocal(config, pretext_epochs=0)
  return config
