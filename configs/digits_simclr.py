r"""Offline default: BiSSL vs. the baseline on scikit-learn's digits, on a CPU.

Run (no download, no GPU)::

  python -m experiments.main                       # this config is the default
  python -m experiments.main --config=configs/digits_simclr.py --workdir=runs/digits

Data: the 1,797 real 8×8 digits bundled with scikit-learn, upscaled to 16×16 RGB.
Stratified splits (fixed split seed 0): 1,150 train / 288 validation / 359 test.
Pretext pretraining and BiSSL's lower level use the *train* split's images
without labels; the downstream task is 10-way classification. Model selection
(best fine-tuning epoch, random search) uses validation only; the test split is
only ever scored for the reported numbers.

Model: ResNet-18 with a CIFAR stem at width 1/8 (8-16-32-64 channels), SimCLR
(τ=0.5) with a 64-64-64 projector; batch 64 everywhere. Pretext: 10 epochs (LARS,
peak LR 1.0, 1 warm-up epoch). Head warm-up: 5 epochs at constant LR 0.05. BiSSL:
T=12 alternations of N_L=4 lower and N_U=2 upper steps, 3 layer-wise CG iterations,
λ=0.001, δ=10, lower LR 0.5. Fine-tuning: 10 epochs, LR 0.05, weight decay 5e-4
for both pipelines (``--config.search.enabled=True`` instead picks them per pipeline
by a 3-configuration, 3-epoch random search on validation).

Protocol: the full comparison, baseline (pretext → fine-tune → test) and BiSSL
(pretext → head warm-up → BiSSL → fine-tune → test), with 3 seeds each. Every seed
pretrains its own pretext model, which both pipelines of that seed start from; both
fine-tune with the same budget, head initialisation and data order. Results:
``<workdir>/results.md`` and ``results.json`` (test top-1/top-5, mean ± std).

It also runs two BiSSL variants on the same seeds and budget
(``config.bissl_variants``): M-FAC (BiSSLight's solver, damping 0, m = N_L stored
gradients) and MINRES.

Cost (measured on the 2-core development CPU, Intel Xeon, 2026-12-06, beside other jobs):
520 s wall time, much of it XLA compilation (every step function compiles once, on the
first seed).

Expected result (3 seeds, the library's 'fast' CPU kernels; reproducible to the digit on
one machine, not across CPU models or kernels)::

  | Pipeline          | Test top-1 (%) | Test top-5 (%) | Seeds | FT lr | FT wd  |
  | Only FT           | 96.7 ± 0.7     | 100.0 ± 0.0    | 3     | 0.05  | 0.0005 |
  | BiSSL+FT          | 96.8 ± 0.7     | 100.0 ± 0.0    | 3     | 0.05  | 0.0005 |
  | BiSSL+FT (mfac)   | 97.5 ± 0.3     | 100.0 ± 0.0    | 3     | 0.05  | 0.0005 |
  | BiSSL+FT (minres) | 96.8 ± 1.0     | 100.0 ± 0.0    | 3     | 0.05  | 0.0005 |

At this scale the pipelines are within noise of each other: the config exercises and
times the complete protocol; it does not reproduce the paper's gains.

``get_config("runlocal")`` is the seconds-long smoke size the tests use.
"""
from configs import common


def get_config(arg: str = ""):
  """The offline digits config; ``arg`` may be ``runlocal`` for the tiny smoke-test size."""
  config = common.base_config()
  config.seeds = (0, 1, 2)
  config.log_every = 5
  config.checkpoint_every = 5

  config.data.pretext_dataset = "digits"
  config.data.downstream_dataset = "digits"
  config.data.image_size = 16

  config.model.arch = "resnet18"
  config.model.width_multiplier = 0.125
  config.model.cifar_stem = True
  config.model.projector = "64-64-64"

  config.pretext.epochs = 10
  config.pretext.batch_size = 64
  config.pretext.lr = 1.0
  config.pretext.warmup_epochs = 1
  config.pretext.bn_grouping = "joint"   # the numbers below were measured with it

  config.head_warmup.epochs = 5
  config.head_warmup.batch_size = 64
  config.head_warmup.lr = 0.05
  config.head_warmup.weight_decay = 5e-4

  config.bissl.alternations = 12
  config.bissl.lower_steps = 4
  config.bissl.upper_steps = 2
  config.bissl.cg_iters = 3
  config.bissl.lower_lr = 0.5
  config.bissl.pretext_batch_size = 64
  config.bissl.downstream_batch_size = 64
  config.bissl.checkpoint_every = 4

  config.finetune.epochs = 10
  config.finetune.batch_size = 64
  config.finetune.lr = 0.05
  config.finetune.weight_decay = 5e-4
  config.finetune.bissl_lr = 0.05
  config.finetune.bissl_weight_decay = 5e-4
  config.evaluate.batch_size = 256

  config.search.num_configs = 3
  config.search.epochs = 3

  # Two more BiSSL rows, other implicit-gradient solvers on the same seeds and budget:
  # BiSSLight's M-FAC with its own damping (none; m = N_L stored pretext gradients),
  # and MINRES, whose residual never grows on the indefinite damped operator.
  config.bissl_variants = {"mfac": {"solver": "mfac", "damping": 0.0},
                           "minres": {"solver": "minres"}}

  if "runlocal" in common.parse_arg(arg):
    # The tests' size: the digits are local, so the shrink pretrains for 2 epochs.
    common.apply_runlocal(config, pretext_epochs=2)
  return config
