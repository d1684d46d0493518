r"""Offline GeSSL comparison on scikit-learn's digits: SimCLR vs SimCLR + GeSSL.

Run (no download, no GPU)::

  python -m bissl_jax.pipeline.gessl_comparison --config configs/digits_gessl.py \
      --workdir runs/digits_gessl

  # SimCLR + GeSSL pretraining alone (config.seed), through the pipeline's CLI:
  python -m bissl_jax run --config=configs/digits_gessl.py --workdir=runs/digits_gessl_pretext

Data: the 1,797 bundled 8×8 digits upscaled to 16×16 RGB, the library's fixed
stratified splits (1,150 train / 288 validation / 359 test). Digits 0–4 are the
training classes: pretraining sees only their train-split images (no labels).
Digits 5–9 are held out for few-shot evaluation.

Model: ResNet-18 with a CIFAR stem at width 1/8, projector 64-64-64, SimCLR τ = 0.5
(BatchNorm over both views jointly). Pretraining, identical for both methods, through
the pipeline's pretext stage: 10 epochs, batch 64, SGD with momentum 0.9 and weight
decay 1e-4 (GeSSL's Appendix C; ``pretext.optimizer='sgd'``), cosine LR from 0.05, no
warm-up (at 0.1, SimCLR + GeSSL diverged on seed 0: its second-level loss grew from
1.4 to inf within 50 steps). GeSSL: n = 4 tasks of B = 16 images, A = 2 views, K = 1, λ = 10, α = 0.1, KL
second level, second order, loss = SimCLR + GeSSL (see docs/gessl.md). The inner
steps adapt the pretext head only (projector + task classifier; the outer gradient
still reaches the backbone through the features): adapting all parameters as in the
paper's Eq. 6 (``--set gessl.inner_params=all``) makes one outer step cost 10–26 plain
SimCLR steps on this CPU at K = 1 (``bench/gessl_cost.py``), which does not fit the
offline budget.

Evaluation on frozen features: a linear probe on the train split (all 10 classes;
SGD momentum 0.9, batch 128, LR 5e-2 → 5e-6 cosine, 100 epochs) scored on test;
5-way 1-shot and 5-shot episodes (15 queries per class, 600 episodes, nearest
prototype) drawn from the test split's held-out digits. 3 seeds, mean ± std.

Result and cost: the table in docs/gessl.md ("Offline comparison"), measured on the
shared 2-core development CPU. GeSSL's few-shot accuracy is higher on every seed, its
linear probe is not; three seeds, nothing tuned: the config exercises and times the
protocol.

``get_config("runlocal")`` is the seconds-long smoke size the tests use
(``common.apply_runlocal``, 96 training images so that the training classes fill a
batch of 32).
"""
from configs import common


def get_config(arg: str = ""):
  """The offline GeSSL comparison; ``arg='runlocal'`` gives the smoke-test size."""
  config = common.base_config()
  config.seeds = (0, 1, 2)
  config.stages = "pretext"          # `bissl-jax run`: GeSSL pretraining of config.seed
  config.log_every = 5
  config.checkpoint_every = 5
  config.data.pretext_dataset = "digits"
  config.data.downstream_dataset = "digits"
  config.data.image_size = 16

  config.model.arch = "resnet18"
  config.model.width_multiplier = 0.125
  config.model.cifar_stem = True
  config.model.projector = "64-64-64"

  config.pretext.task = "simclr"
  config.pretext.bn_grouping = "joint"
  config.pretext.epochs = 10
  config.pretext.batch_size = 64
  config.pretext.optimizer = "sgd"
  config.pretext.lr = 0.05
  config.pretext.momentum = 0.9
  config.pretext.weight_decay = 1e-4
  config.pretext.warmup_epochs = 0

  config.gessl.enabled = True
  config.gessl.update(dict(K=1, lam=10, n_tasks=4, classes_per_task=16, num_views=2,
                           inner_lr=0.1, second_level_loss="kl", first_order=False,
                           inner_params="pretext_head"))
  common.add_gessl_evaluation(config, probe_epochs=100)
  args = common.parse_arg(arg)
  if "runlocal" in args:
    common.apply_runlocal(config, pretext_epochs=1)
    config.seeds = (0,)
    config.data.max_train_examples = 96
    config.probe.epochs = 2
    config.fewshot.episodes = 5
  elif args:
    raise ValueError(f"Unknown config argument {arg!r}; use '' or 'runlocal'.")
  return config
