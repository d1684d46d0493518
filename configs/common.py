"""Shared defaults of every experiment config and the paper's hyperparameter tables.

``base_config()`` holds the paper's settings (BiSSL paper §4.2 and
Appendix B): ResNet-50, 96 px, SimCLR τ=0.5, LARS pretraining for 500 epochs at
peak LR 4.8 with batch 1024, a 20-epoch head warm-up at constant LR, BiSSL with
λ=0.001, δ=10, 5 layer-wise CG iterations, N_L=20, N_U=8, T=500, and 400 epochs of
fine-tuning with batch 256. The per-dataset learning rates and weight decays are
Tables 3, 4 and 5 of the paper; ``apply_paper_hyperparams`` copies them into a
config.

This is the one source of defaults: the training core (``BisslSetup``) has none of
its own, and every config file starts from ``base_config()``. ``apply_runlocal`` is
the one smoke-test shrink.

Fields set to ``None`` are resolved by the pipeline
(``bissl_jax.config_validation.resolve_config``):
  * ``bissl.upper_lr`` / ``bissl.upper_weight_decay``: the head warm-up values
    (Table 4: the same numbers serve both).
  * ``bissl.unroll``: unrolled loops on CPU only (the XLA:CPU loop cliff, docs/implicit_grad.md).
  * ``data.data_dir``: the TFDS default directory.
  * ``model.predictor``: the projector spec for BYOL, none for SimCLR.
"""
from ml_collections import config_dict

from configs.field_help import FIELD_HELP  # noqa: F401  (re-exported: the --help text)

# Keys are the dataset names of ``bissl_jax.data`` (TFDS names where they exist).
# Values are (learning rate, weight decay).

# Table 3: fine-tuning after conventional pretext pretraining (the baseline).
TABLE3_BASELINE_FINETUNE = {
    "simclr": {
        "food101": (0.0167, 0.00613), "cifar10": (0.0033, 0.00158),
        "cifar100": (0.0027, 0.00012), "caltech_birds2011": (0.0409, 0.0084),
        "sun397": (0.0069, 0.00003), "cars196": (0.0377, 0.00454),
        "fgvc_aircraft": (0.0269, 0.0038), "voc2007": (0.0054, 0.0089),
        "dtd": (0.0514, 0.0011), "oxford_iiit_pet": (0.0378, 0.00114),
        "caltech101": (0.0131, 0.00005), "oxford_flowers102": (0.2178, 0.00046),
    },
    "byol": {
        "food101": (0.0513, 0.00147), "cifar10": (0.0014, 0.00106),
        "cifar100": (0.0023, 0.00012), "caltech_birds2011": (0.0095, 0.00594),
        "sun397": (0.004, 0.00003), "cars196": (0.115, 0.00257),
        "fgvc_aircraft": (0.0119, 0.00333), "voc2007": (0.0032, 0.00616),
        "dtd": (0.0114, 0.00011), "oxford_iiit_pet": (0.0044, 0.00779),
        "caltech101": (0.0069, 0.00027), "oxford_flowers102": (0.035, 0.00262),
    },
}

# Table 4: downstream head warm-up and the upper level of BiSSL.
TABLE4_HEAD_WARMUP_AND_UPPER = {
    "simclr": {
        "food101": (0.03, 0.001), "cifar10": (0.015, 0.001),
        "cifar100": (0.01, 0.0001), "caltech_birds2011": (0.03, 0.001),
        "sun397": (0.015, 0.00005), "cars196": (0.035, 0.001),
        "fgvc_aircraft": (0.03, 0.005), "voc2007": (0.015, 0.005),
        "dtd": (0.03, 0.001), "oxford_iiit_pet": (0.03, 0.001),
        "caltech101": (0.03, 0.0001), "oxford_flowers102": (0.05, 0.0005),
    },
    "byol": {
        "food101": (0.035, 0.002), "cifar10": (0.01, 0.001),
        "cifar100": (0.01, 0.001), "caltech_birds2011": (0.015, 0.0001),
        "sun397": (0.01, 0.00005), "cars196": (0.04, 0.002),
        "fgvc_aircraft": (0.015, 0.003), "voc2007": (0.005, 0.006),
        "dtd": (0.015, 0.0001), "oxford_iiit_pet": (0.02, 0.002),
        "caltech101": (0.015, 0.0002), "oxford_flowers102": (0.035, 0.002),
    },
}

# Table 5: fine-tuning after BiSSL.
TABLE5_BISSL_FINETUNE = {
    "simclr": {
        "food101": (0.0037, 0.00018), "cifar10": (0.001, 0.00278),
        "cifar100": (0.0019, 0.00002), "caltech_birds2011": (0.0005, 0.00331),
        "sun397": (0.0015, 0.00001), "cars196": (0.0289, 0.0075),
        "fgvc_aircraft": (0.0002, 0.0059), "voc2007": (0.0002, 0.00019),
        "dtd": (0.0003, 0.00002), "oxford_iiit_pet": (0.0014, 0.00005),
        "caltech101": (0.0016, 0.00042), "oxford_flowers102": (0.0189, 0.00143),
    },
    "byol": {
        "food101": (0.0496, 0.00096), "cifar10": (0.0018, 0.00014),
        "cifar100": (0.0008, 0.0013), "caltech_birds2011": (0.0007, 0.00947),
        "sun397": (0.0009, 0.00062), "cars196": (0.0316, 0.00632),
        "fgvc_aircraft": (0.0003, 0.00001), "voc2007": (0.0004, 0.0003),
        "dtd": (0.0013, 0.0021), "oxford_iiit_pet": (0.0002, 0.00039),
        "caltech101": (0.0005, 0.00022), "oxford_flowers102": (0.0057, 0.00207),
    },
}

PAPER_DOWNSTREAM_DATASETS = tuple(TABLE3_BASELINE_FINETUNE["simclr"])

# Table 1: the paper's test results (top-1 %, 11-point mAP % for voc2007), mean ± std
# over 10 seeds, as (Only FT, BiSSL+FT), each (mean, std). The expected results of
# the ImageNet configs.
TABLE1_RESULTS = {
    "simclr": {
        "food101": ((75.0, 0.1), (75.6, 0.1)), "cifar10": ((96.1, 0.2), (96.4, 0.1)),
        "cifar100": ((79.5, 0.2), (80.0, 0.1)),
        "caltech_birds2011": ((49.6, 0.3), (59.2, 0.2)),
        "sun397": ((49.3, 0.2), (51.4, 0.2)), "cars196": ((78.0, 0.3), (78.0, 0.3)),
        "fgvc_aircraft": ((52.0, 1.0), (55.3, 0.5)), "voc2007": ((71.0, 0.1), (71.8, 0.1)),
        "dtd": ((60.3, 0.9), (63.4, 0.3)), "oxford_iiit_pet": ((73.2, 0.3), (79.6, 0.3)),
        "caltech101": ((85.7, 0.5), (88.1, 0.3)),
        "oxford_flowers102": ((82.6, 0.3), (85.6, 0.2)),
    },
    "byol": {
        "food101": ((75.3, 0.2), (75.4, 0.1)), "cifar10": ((96.4, 0.1), (96.4, 0.1)),
        "cifar100": ((80.1, 0.2), (80.6, 0.1)),
        "caltech_birds2011": ((52.7, 0.4), (60.1, 0.1)),
        "sun397": ((47.9, 0.3), (50.2, 0.2)), "cars196": ((76.9, 0.2), (78.1, 0.3)),
        "fgvc_aircraft": ((51.6, 0.7), (57.1, 0.4)), "voc2007": ((69.3, 0.1), (71.1, 0.1)),
        "dtd": ((59.5, 0.4), (62.2, 0.1)), "oxford_iiit_pet": ((77.9, 0.3), (81.9, 0.1)),
        "caltech101": ((86.6, 0.4), (88.3, 0.3)),
        "oxford_flowers102": ((82.2, 0.5), (86.5, 0.1)),
    },
}


def base_config() -> config_dict.ConfigDict:
  """The paper's defaults for every field of the pipeline config (unlocked)."""
  config = config_dict.ConfigDict()
  config.seed = 0                  # seed of single-stage runs and of the random search
  config.seeds = (0, 1, 2, 3, 4, 5, 6, 7, 8, 9)   # comparison seeds (paper: 10)
  config.stages = "all"            # or one of pretext, head_warmup, bissl, finetune, evaluate
  config.log_every = 10            # optimizer steps (alternations in BiSSL) between log lines
  config.checkpoint_every = 10     # epochs between checkpoints inside pretraining/fine-tuning
  config.reuse = "recompute"       # a stale artifact: recompute it (or 'strict': refuse)
  _add_data_and_model(config)
  _add_pretext_and_head_warmup(config)
  _add_bissl(config)
  _add_finetune_evaluate_and_search(config)
  return config


def _add_data_and_model(config: config_dict.ConfigDict) -> None:
  """base_config's config.data, config.model sections."""
  config.data = config_dict.ConfigDict()
  config.data.pretext_dataset = "imagenet2012"
  config.data.downstream_dataset = "oxford_flowers102"
  config.data.data_dir = config_dict.placeholder(str)
  config.data.image_size = 96
  config.data.val_fraction = 0.2   # stratified, only where a dataset has no validation split
  config.data.split_seed = 0       # one split for every seed and both pipelines
  config.data.max_train_examples = config_dict.placeholder(int)  # smoke runs: subsample train
  config.data.loader_workers = 8   # Grain processes decoding streamed (ImageNet) data; 0: in-process
  config.data.device_prefetch = 2  # streamed batches copied to the devices ahead of their step
  # Text (model.arch a GPT, docs/language.md): token length k of every sequence (the
  # model's context), the BPE learnt on the offline corpus when no tokenizer files
  # are given, the corpus cap, the tokenizer files and the GLUE source.
  config.data.context = 64
  config.data.vocab_size = 1024
  config.data.max_chars = 300_000
  config.data.tokenizer_dir = config_dict.placeholder(str)  # vocab.json + merges.txt
  config.data.glue_source = "auto"          # 'auto', 'tfds', 'hf' or 'jsonl'
  # Few-label studies: labelled downstream training images per class (None: all),
  # drawn with config.seed; the pretext set keeps every training image.
  config.data.labels_per_class = config_dict.placeholder(int)

  config.model = config_dict.ConfigDict()
  config.model.arch = "resnet50"
  config.model.width_multiplier = 1.0
  config.model.cifar_stem = False
  # Where the shared backbone θ ends: 'res5' (the whole ResNet) or 'res4'/'res3'/'res2';
  # the later stages join the pretext head (BiSSL paper App. B.6: detection uses 'res4').
  config.model.backbone_ends_at = "res5"
  config.model.projector = "256-256-256"
  config.model.predictor = config_dict.placeholder(str)
  # ViT fields (model.arch one of bissl_jax.models.vit_bundle.ARCHITECTURES, docs/vit.md); a
  # ResNet ignores them. LoRA (lora_rank > 0) freezes the base weights in BiSSL, the
  # head warm-up and fine-tuning; pretext pretraining (stage 1) trains the base model
  # without adapters, and fresh adapters (B = 0: the same function) are added after it.
  config.model.lora_rank = 0               # 0: no adapters, every backbone leaf trains
  config.model.lora_alpha = config_dict.placeholder(float)   # None: alpha = rank
  config.model.lora_targets = ("q", "v")   # of q, k, v, proj, fc1, fc2 (BiSSLight: q, v)
  config.model.train_norms = False         # with LoRA, also train the backbone LayerNorms
  config.model.pool = "token"              # classifier features: 'token' (class) or 'mean'
  config.model.posemb = "sincos"           # 'sincos' (fixed, MAE) or 'learn'
  config.model.decoder_width = 512         # MAE decoder (the pretext head φ_P)
  config.model.decoder_depth = 8
  config.model.decoder_heads = 16
  config.model.drop_path = 0.0             # encoder stochastic depth (MAE's lower level only)
  config.model.remat = False               # jax.checkpoint per transformer block
  config.model.dtype = "float32"           # compute dtype ('bfloat16' on accelerators)
  config.model.lm_weight = 0.5             # GPT: ν of the auxiliary LM loss (thesis §7.1.2)
  config.model.dropout = 0.1               # GPT: dropout before the output layer
  # XLA:CPU kernels (bissl_jax/runtime/cpu_kernels.py): 'fast' = XLA's own convolutions and
  # YNNPACK elementwise/reduce fusions (no dots), ~0.64x the pretext gradient's time on a 2-core
  # CPU but other rounding than 'default' (jaxlib's choice); docs/benchmarks/cpu_conv.md.
  config.model.cpu_kernels = "fast"

def _add_pretext_and_head_warmup(config: config_dict.ConfigDict) -> None:
  """base_config's config.pretext, config.head_warmup sections."""
  config.pretext = config_dict.ConfigDict()
  config.pretext.task = "simclr"
  config.pretext.temperature = 0.5
  config.pretext.ema_decay = 0.9995
  # BatchNorm over the two views: 'per_view' (each view its own batch, as the reference
  # PyTorch code; the paper's setting) or 'joint' (one batch of 2B).
  config.pretext.bn_grouping = "per_view"
  config.pretext.mask_ratio = 0.75         # MAE: fraction of patches masked per sample
  config.pretext.norm_pix_loss = True      # MAE: per-patch normalised pixel targets
  config.pretext.epochs = 500
  config.pretext.batch_size = 1024
  # One of bissl_jax.core.optim.OPTIMIZERS: 'lars' (paper), 'sgd' (GeSSL, Appendix C), 'adam' (GPT).
  config.pretext.optimizer = "lars"
  config.pretext.lr = 4.8          # peak LR (not scaled by batch size)
  config.pretext.weight_decay = 1e-6
  config.pretext.momentum = 0.9
  config.pretext.warmup_epochs = 10
  config.pretext.checkpoint = config_dict.placeholder(str)   # skip pretraining, load this
  config.pretext.share_across_seeds = False   # True: one pretext run serves every seed
  # None: the baseline fine-tunes the same pretext model as BiSSL. An int: the baseline
  # gets its own pretext run of that many epochs (the paper's STL10 study gives the
  # baseline 100 extra epochs to match BiSSL's extra pretext steps).
  config.pretext.baseline_epochs = config_dict.placeholder(int)

  # GeSSL (docs/gessl.md): enabled wraps the pretext task (SimCLR or BYOL) in GeSSL's
  # bilevel objective; the other fields are gessl.default_config(), the paper's defaults.
  from bissl_jax.tasks.pretext import gessl  # pylint: disable=g-import-not-at-top
  config.gessl = gessl.default_config()
  config.gessl.enabled = False

  config.head_warmup = config_dict.ConfigDict()
  config.head_warmup.epochs = 20.0   # a float: may be a fraction (GLUE: 0.1 or 0.5 of an epoch)
  config.head_warmup.optimizer = "sgd"
  config.head_warmup.lr = 0.05     # Table 4 (flowers); see apply_paper_hyperparams
  config.head_warmup.weight_decay = 0.0005
  config.head_warmup.momentum = 0.9
  config.head_warmup.batch_size = 256

def _add_bissl(config: config_dict.ConfigDict) -> None:
  """base_config's config.bissl, config.bissl_variants sections."""
  config.bissl = config_dict.ConfigDict()
  config.bissl.lam = 0.001
  config.bissl.damping = 10.0
  config.bissl.solver = "layerwise_cg"
  config.bissl.cg_iters = 5
  config.bissl.cg_tol = 0.0
  config.bissl.lower_steps = 20
  config.bissl.upper_steps = 8
  config.bissl.alternations = 500
  config.bissl.lower_optimizer_name = "lars"   # 'lars' (the paper) or 'adamw' (BiSSLight, LoRA)
  config.bissl.lower_lr = 1.0
  config.bissl.lower_weight_decay = 1e-6
  config.bissl.lower_momentum = 0.9       # LARS
  config.bissl.trust_coefficient = 1e-3   # LARS η
  config.bissl.upper_optimizer_name = "sgd"    # 'sgd' (the paper) or 'adam' (GPT)
  config.bissl.upper_momentum = 0.9       # SGD
  config.bissl.grad_clip = 10.0           # global-norm clip of each level's gradient
  config.bissl.upper_lr = config_dict.placeholder(float)            # None: head_warmup.lr
  config.bissl.upper_weight_decay = config_dict.placeholder(float)  # None: head_warmup.weight_decay
  config.bissl.pretext_batch_size = 1024
  config.bissl.downstream_batch_size = 256
  config.bissl.hessian_mode = "linearize"
  config.bissl.warm_start = False
  # Loops inside one jit: None unrolls them on CPU (the XLA:CPU loop cliff) only.
  config.bissl.unroll = config_dict.placeholder(bool)
  # 'fused': one jit per alternation; 'per_step': one jit per step, looped from the
  # host; 'auto': per_step on CPU (where the fused jit compiles slowly), fused elsewhere.
  config.bissl.stage_driver = "auto"
  config.bissl.checkpoint_every = 25   # alternations
  config.bissl.lam_schedule = "none"
  config.bissl.lam_min = 1e-8
  config.bissl.lam_exp_alpha = 10.0
  config.bissl.learnable_lam = False
  config.bissl.lam_damping = 0.0
  config.bissl.head_in_implicit = False
  # Off by default (the paper has no guard): replace a solution whose relative
  # residual ‖Ax − v‖/‖v‖ exceeds 1 by v itself (first order), and count it.
  config.bissl.residual_guard = False
  # The relative residual ‖Ax − v‖/‖v‖ costs one more product per solve: k > 1
  # recomputes it on every k-th upper step only (1: every step, 0: never; the guard
  # forces 1). 1 keeps every recorded result's compiled program, and so its rounding.
  config.bissl.residual_every = 4          # one more product per checked step (docs/solvers.md)
  # solver='mfac' (BiSSLight): m stored pretext gradients (None: N_L), block rule
  # ('per_leaf', 'per_layer' or 'global') and storage dtype ('float32', 'bfloat16').
  config.bissl.mfac_history = config_dict.placeholder(int)
  config.bissl.mfac_blocks = "per_leaf"
  config.bissl.mfac_dtype = "float32"
  # Preconditioner of the cg/minres solve: 'none', 'mfac' (M-FAC's (I + F/(λ+δ))⁻¹
  # on the window of the mfac_* fields above, filled by the lower steps), 'kfac'
  # (K-FAC's, built from the HVP batch once per upper stage) or 'ekfac' (EK-FAC's,
  # likewise; docs/solvers.md).
  config.bissl.preconditioner = "none"
  # The upper level's hypergradient: 'implicit' (the paper's solve) or 'penalty', the
  # first-order penalty method (F2SA; docs/solvers.md): penalty weight σ on L_D in the
  # second lower sequence z, z steps per upper step, and z's SGD step size and momentum.
  config.bissl.upper_method = "implicit"
  config.bissl.penalty_sigma = 1.0
  config.bissl.penalty_inner_steps = 5
  config.bissl.penalty_lr = 0.01
  config.bissl.penalty_momentum = 0.9
  config.bissl.init_checkpoint = config_dict.placeholder(str)  # stage-only input

  # Extra BiSSL rows of the comparison, each a name and the config.bissl fields it
  # changes, e.g. {"mfac": {"solver": "mfac", "damping": 0.0}}. Every variant runs on
  # the same pretext model, head warm-up, seeds and fine-tuning budget as BiSSL.
  config.bissl_variants = config_dict.ConfigDict()

def _add_finetune_evaluate_and_search(config: config_dict.ConfigDict) -> None:
  """base_config's config.finetune, config.evaluate, config.search sections."""
  config.finetune = config_dict.ConfigDict()
  config.finetune.epochs = 400
  config.finetune.batch_size = 256
  config.finetune.optimizer = "sgd"
  config.finetune.warmup_fraction = 0.0     # linear LR warm-up share of the steps (GPT: 0.002)
  config.finetune.momentum = 0.9
  config.finetune.lr = 0.2178               # Table 3 (flowers, SimCLR)
  config.finetune.weight_decay = 0.00046
  config.finetune.bissl_lr = 0.0189         # Table 5 (flowers, SimCLR)
  config.finetune.bissl_weight_decay = 0.00143
  config.finetune.init_checkpoint = config_dict.placeholder(str)  # stage-only input

  config.evaluate = config_dict.ConfigDict()
  config.evaluate.batch_size = 256
  config.evaluate.checkpoint = config_dict.placeholder(str)  # stage-only input

  config.search = config_dict.ConfigDict()
  config.search.enabled = False
  config.search.num_configs = 100
  config.search.lr_range = (1e-4, 1.0)
  config.search.wd_range = (1e-5, 1e-2)
  config.search.epochs = 400
  # Both non-empty: try every pair of these lists instead of sampling (thesis §7.1.2).
  config.search.lr_grid = ()
  config.search.wd_grid = ()


def paper_hyperparams(task: str, dataset: str) -> dict:
  """Tables 3, 4 and 5 for one pretext task and downstream dataset.

  Args:
    task: 'simclr' or 'byol'.
    dataset: a downstream dataset name from ``PAPER_DOWNSTREAM_DATASETS``.

  Returns:
    ``{'finetune': (lr, wd), 'head_warmup': (lr, wd), 'bissl_finetune': (lr, wd)}``.
  """
  if dataset not in TABLE3_BASELINE_FINETUNE[task]:
    raise ValueError(
        f"config.data.downstream_dataset={dataset!r} has no paper hyperparameters; "
        f"choose one of {PAPER_DOWNSTREAM_DATASETS} or set config.finetune.lr/weight_decay, "
        f"config.finetune.bissl_lr/bissl_weight_decay and config.head_warmup.lr/weight_decay.")
  return {"finetune": TABLE3_BASELINE_FINETUNE[task][dataset],
          "head_warmup": TABLE4_HEAD_WARMUP_AND_UPPER[task][dataset],
          "bissl_finetune": TABLE5_BISSL_FINETUNE[task][dataset]}


def apply_paper_hyperparams(config: config_dict.ConfigDict) -> config_dict.ConfigDict:
  """Sets the fine-tuning and head warm-up LRs and weight decays from Tables 3–5."""
  hp = paper_hyperparams(config.pretext.task, config.data.downstream_dataset)
  config.finetune.lr, config.finetune.weight_decay = hp["finetune"]
  config.head_warmup.lr, config.head_warmup.weight_decay = hp["head_warmup"]
  config.finetune.bissl_lr, config.finetune.bissl_weight_decay = hp["bissl_finetune"]
  return config


def expected_result(task: str, dataset: str) -> str:
  """Table 1's numbers for a docstring or log line."""
  (base, base_sd), (bissl, bissl_sd) = TABLE1_RESULTS[task][dataset]
  return f"Only FT {base} ± {base_sd}, BiSSL+FT {bissl} ± {bissl_sd}"


def paper_scale_config(task: str, arg: str) -> config_dict.ConfigDict:
  """ImageNet-pretrained ResNet-50 setup of the paper for ``downstream=<name>`` in ``arg``.

  ``runlocal`` in ``arg`` applies :func:`apply_runlocal` with no pretraining (the
  ImageNet pretext set is not local), to smoke-test the code path on real data; its
  numbers mean nothing.
  """
  args = parse_arg(arg)
  config = base_config()
  config.data.downstream_dataset = canonical_dataset(args.get("downstream", "oxford_flowers102"))
  config.pretext.task = task
  apply_paper_hyperparams(config)
  if "runlocal" in args or OFFLINE in args:
    apply_runlocal(config, pretext_epochs=0)
  return apply_offline_standin(config, args)


OFFLINE = "offline"  # the config argument of the stand-in below
OFFLINE_STANDIN = "digits"


def apply_offline_standin(config: config_dict.ConfigDict, args: dict) -> config_dict.ConfigDict:
  """``offline`` in a paper config's argument: check an install with no data at all.

  A STAND-IN, not the experiment: scikit-learn's bundled digits (nothing to download)
  replace ImageNet and the downstream set, at the ``runlocal`` size (which ``offline``
  implies), with one pretext epoch so that every stage of the config runs. The model
  family, pretext task, solver and stages are the config's; the numbers mean nothing.
  Without ``offline`` in ``args`` the config is returned unchanged.
  """
  if OFFLINE not in args:
    return config
  config.data.pretext_dataset = OFFLINE_STANDIN
  config.data.downstream_dataset = OFFLINE_STANDIN
  config.pretext.epochs = 1
  return config


def apply_runlocal(config: config_dict.ConfigDict, *,
                   pretext_epochs: int = 0) -> config_dict.ConfigDict:
  """The smoke-test shrink of every config (big_vision's ``runlocal``): seconds of compute.

  An 8 px ResNet-18 at 1/16 width with a 16-16-16 projector (a ViT config: the
  test ViT ``vit_test_patch4`` with a 16-wide decoder and rank-2 LoRA; a GPT config:
  ``gpt_micro`` on 32-token sequences of a 256-token BPE learnt on 20,000 characters
  of the offline corpus), 64 training examples,
  batch 32 everywhere, two seeds (the smallest count with a sample std), a step or
  two per stage and checkpoints as often as possible, so that every code path of the
  comparison runs. Its numbers mean nothing.

  Args:
    config: a full config; changed in place.
    pretext_epochs: pretext epochs; 0 (a random backbone) unless the pretext data is
      the subsampled training split, as for the digits.

  Returns:
    ``config``.
  """
  config.seeds = (0, 1)
  config.log_every = 1
  config.checkpoint_every = 1
  config.data.image_size = 8
  config.data.max_train_examples = 64
  if str(config.model.arch).startswith("vit_"):
    # The CPU-test ViT (width 16, depth 2, patch 4: 4 patches at 8 px), a 16-wide
    # one-block decoder, rank-2 LoRA if the config has LoRA.
    config.model.arch = "vit_test_patch4"
    config.model.decoder_width = 16
    config.model.decoder_depth = 1
    config.model.decoder_heads = 2
    config.model.lora_rank = 2 if config.model.lora_rank else 0
    config.model.remat = False
    config.model.dtype = "float32"
  elif str(config.model.arch).startswith("gpt"):
    config.model.arch = "gpt_micro"
    config.model.remat = False
    config.model.dtype = "float32"
    config.data.context = 32
    config.data.max_chars = 20_000
    if not config.data.tokenizer_dir:
      config.data.vocab_size = 256
  else:
    config.model.arch = "resnet18"
    config.model.width_multiplier = 0.0625
    config.model.projector = "16-16-16"
  config.pretext.epochs = int(pretext_epochs)
  config.pretext.baseline_epochs = None
  for stage in (config.pretext, config.head_warmup, config.finetune):
    stage.batch_size = 32
  config.evaluate.batch_size = 128
  config.head_warmup.epochs = 1
  config.bissl.alternations = 4
  config.bissl.lower_steps = 2
  config.bissl.upper_steps = 1
  config.bissl.cg_iters = 2
  config.bissl.pretext_batch_size = 32
  config.bissl.downstream_batch_size = 32
  config.bissl.checkpoint_every = 2
  config.finetune.epochs = 2
  config.search.num_configs = 2
  config.search.epochs = 1
  config.bissl_variants = config_dict.ConfigDict()  # the paper's BiSSL row only
  # GeSSL (if enabled): 2 tasks of 16 images fill the batch of 32; λ = 2 (one target step).
  config.gessl.n_tasks = 2
  config.gessl.classes_per_task = 16
  config.gessl.lam = 2
  return config


def add_gessl_evaluation(config: config_dict.ConfigDict, *,
                         probe_epochs: int = 500) -> config_dict.ConfigDict:
  """Adds the evaluation blocks of the GeSSL comparison (``bissl_jax.pipeline.gessl_comparison``).

  ``config.probe``: the linear probe of GeSSL's §6.2 (frozen features, SGD momentum
  0.9, batch 128, LR 5e-2 decaying to 5e-6, 500 epochs). ``config.fewshot``: 5-way
  1- and 5-shot episodes on held-out classes, 15 queries per class, 600 episodes,
  nearest prototype (the paper names no classifier, query count or episode count;
  docs/gessl.md). Only the comparison reads these blocks.

  Args:
    config: a config from :func:`base_config`; changed in place.
    probe_epochs: linear-probe epochs.

  Returns:
    ``config``.
  """
  config.probe = config_dict.ConfigDict(dict(epochs=int(probe_epochs), batch_size=128,
                                             lr=5e-2, final_lr=5e-6))
  config.fewshot = config_dict.ConfigDict(dict(held_out_classes=5, n_way=5, shots=(1, 5),
                                               n_query=15, episodes=600,
                                               classifier="prototype"))
  return config


def apply_gessl_paper_settings(config: config_dict.ConfigDict, *,
                               runlocal: bool) -> config_dict.ConfigDict:
  """GeSSL's ResNet pretraining of Appendix C / G.4, shared by the STL-10 and ImageNet configs.

  SGD (momentum 0.9, weight decay 1e-4, LR 0.05) on n = 8 tasks of B = 16 images with
  A = 5 views, K = 1, λ = 10, the KL second level, all parameters adapted, AID-FD with
  radius 0.01; the evaluation blocks of :func:`add_gessl_evaluation`. ``runlocal``
  shrinks it to a smoke run.
  """
  config.pretext.batch_size = 128          # n_tasks · classes_per_task
  config.pretext.optimizer = "sgd"
  config.pretext.lr = 0.05
  config.pretext.momentum = 0.9
  config.pretext.weight_decay = 1e-4
  config.gessl.enabled = True
  config.gessl.update(dict(K=1, lam=10, n_tasks=8, classes_per_task=16, num_views=5,
                           second_level_loss="kl", first_order=False, inner_params="all",
                           fd_radius=0.01))
  add_gessl_evaluation(config, probe_epochs=500)
  if runlocal:
    apply_runlocal(config, pretext_epochs=0)
    config.probe.epochs = 2
    config.fewshot.episodes = 5
  return config


def apply_gpt_recipe(config: config_dict.ConfigDict, *, batch_size: int
                     ) -> config_dict.ConfigDict:
  """What the thesis fixes for BiSSL on GPT (§7.1), shared by the language configs.

  Next-token pretext; L_task + 0.5·L_GPT with dropout 0.1; Adam (β = (0.9, 0.999))
  with weight decay 0.01 on kernels and embeddings in every stage and at both levels;
  λ = 0.1, δ = 10 and layer-wise CG; one ``batch_size`` everywhere. Learning rates,
  lengths and the solver's iterations stay with each config.
  """
  config.model.lm_weight = 0.5
  config.model.dropout = 0.1
  config.pretext.task = "next_token"
  config.bissl.lam = 0.1
  config.bissl.damping = 10.0
  config.bissl.solver = "layerwise_cg"
  for block, optimizer in (("pretext", "optimizer"), ("head_warmup", "optimizer"),
                           ("finetune", "optimizer"), ("bissl", "lower_optimizer_name"),
                           ("bissl", "upper_optimizer_name")):
    config[block][optimizer] = "adam"
  for block, decay in (("pretext", "weight_decay"), ("head_warmup", "weight_decay"),
                       ("bissl", "lower_weight_decay"), ("finetune", "weight_decay"),
                       ("finetune", "bissl_weight_decay")):
    config[block][decay] = 0.01
  for block, field in (("pretext", "batch_size"), ("head_warmup", "batch_size"),
                       ("bissl", "pretext_batch_size"), ("bissl", "downstream_batch_size"),
                       ("finetune", "batch_size")):
    config[block][field] = int(batch_size)
  return config


def canonical_dataset(name: str) -> str:
  """The catalogue name of a dataset given by catalogue name, TFDS name or alias."""
  from bissl_jax.data.catalogue import get_spec
  return get_spec(name).name


def parse_arg(arg: str) -> dict:
  """Parses the ``key=value,key=value`` string after ``:`` in ``--config=file.py:...``."""
  out = {}
  for item in filter(None, (arg or "").split(",")):
    key, sep, value = item.partition("=")
    out[key.strip()] = value.strip() if sep else True
  return out
