r"""BiSSLight's setup: MAE ViT-B/16 with frozen base weights and LoRA, one downstream set.

Run (the official MAE checkpoint and the TFDS data local; see docs/vit.md and
docs/datasets.md)::

  python -m experiments.main --workdir=runs/mae_dtd \
      --config=configs/imagenet_mae_lora.py:downstream=dtd \
      --config.pretext.checkpoint=/ckpt/mae_pretrain_vit_base_full.pth \
      --config.data.data_dir=/data/tfds

  # ViT-L/16 or ViT-H/14: --config.model.arch=vit_large_patch16 (or vit_huge_patch14)
  # with the matching mae_pretrain_vit_{large,huge}_full.pth.

  # Smoke test of the code path on the real downstream data (test ViT, random base):
  python -m experiments.main --workdir=runs/smoke \
      --config=configs/imagenet_mae_lora.py:downstream=dtd,runlocal \
      --config.data.data_dir=/data/tfds

  # Before downloading anything: the same smoke test on a STAND-IN, the offline digits
  # in place of ImageNet and the downstream set (checks the install; numbers meaningless):
  bissl-jax run --workdir=runs/check_mae --config=configs/imagenet_mae_lora.py:offline

``downstream`` is one of BiSSLight's dtd, oxford_iiit_pet, oxford_flowers102,
fgvc_aircraft, caltech_birds2011 (CUB-200), voc2007 (default dtd); any catalogue
name works.

Settings (BiSSLight): ViT-B/16 at 224 px, class-token features, MAE decoder 512×8
(16 heads) as the pretext head, LoRA rank 64 (α = r) on q and v, the base frozen;
MAE with 75% masking and the normalised pixel loss, pretext batch 256; 20-epoch
head warm-up; BiSSL T=500 alternations of N_L=20 and N_U=8, λ=0.001, M-FAC implicit
gradients (m = N_L = 20 stored pretext gradients, per-layer blocks: all LoRA leaves
of one transformer block, no damping), downstream batch 64; fine-tuning of LoRA +
a fresh head on the frozen base (BiSSL+FT from the lower level's LoRA set, Only FT
from fresh LoRA), 3 seeds.

Stage 1 is skipped when ``pretext.checkpoint`` is given (the official MAE weights,
read through ``bissl_jax.convert.mae``, strictly validated). Without it the base ViT
is MAE-pretrained here first (800 epochs of ImageNet at batch 256 with the core's
LARS), which is not what BiSSLight does.

Differences from BiSSLight, all in the core: the lower level uses LARS and the
upper level SGD with momentum (BiSSLight: AdamW for both, with its own warm-up
and cosine), and fine-tuning uses SGD with momentum; its LRs are not tuned here
and are starting points (set them per dataset). No drop-path downstream (the
classification task draws none).

Cost (not measured; an accelerator is needed): per alternation 20 lower MAE steps
at batch 256 (encoder on 25% of the patches) + 8 upper steps at batch 64, each
upper step 2 downstream gradients and one M-FAC solve (20×20 Gram per block, no
Hessian-vector product); T=500 alternations ≈ 10,000 MAE steps (≈2 ImageNet epochs)
+ 4,000 upper steps. Fine-tuning then dominates (epochs × 2 pipelines × 3 seeds).
``python -m bench.vit_cost`` times one alternation at full size.
"""
from configs import common

BISSLIGHT_DOWNSTREAM = ("dtd", "oxford_iiit_pet", "oxford_flowers102", "fgvc_aircraft",
                        "caltech_birds2011", "voc2007")


def get_config(arg: str = ""):
  """``arg``: ``downstream=<name>``, ``runlocal`` and/or ``offline``, comma-separated."""
  args = common.parse_arg(arg)
  config = common.base_config()
  config.seeds = (0, 1, 2)
  config.data.pretext_dataset = "imagenet2012"
  config.data.downstream_dataset = common.canonical_dataset(args.get("downstream", "dtd"))
  config.data.image_size = 224

  config.model.arch = "vit_base_patch16"
  config.model.pool = "token"
  config.model.lora_rank = 64
  config.model.lora_alpha = None
  config.model.lora_targets = ("q", "v")
  config.model.train_norms = False
  config.model.decoder_width = 512
  config.model.decoder_depth = 8
  config.model.decoder_heads = 16
  config.model.posemb = "sincos"
  config.model.dtype = "bfloat16"

  config.pretext.task = "mae"
  config.pretext.mask_ratio = 0.75
  config.pretext.norm_pix_loss = True
  config.pretext.batch_size = 256
  config.pretext.epochs = 800              # only without pretext.checkpoint
  config.pretext.lr = 1.0
  config.pretext.warmup_epochs = 40
  config.pretext.share_across_seeds = True

  config.head_warmup.epochs = 20
  config.head_warmup.batch_size = 64
  config.head_warmup.lr = 0.01
  config.head_warmup.weight_decay = 0.0

  config.bissl.alternations = 500
  config.bissl.lower_steps = 20
  config.bissl.upper_steps = 8
  config.bissl.lam = 0.001
  config.bissl.solver = "mfac"
  config.bissl.mfac_blocks = "per_layer"
  config.bissl.mfac_history = 20
  config.bissl.damping = 0.0
  config.bissl.lower_optimizer_name = "adamw"   # BiSSLight's lower optimizer
  config.bissl.lower_lr = 0.01
  config.bissl.lower_weight_decay = 0.0
  config.bissl.pretext_batch_size = 256
  config.bissl.downstream_batch_size = 64

  config.finetune.epochs = 200
  config.finetune.batch_size = 64
  config.finetune.lr = 0.01
  config.finetune.weight_decay = 0.0
  config.finetune.bissl_lr = 0.01
  config.finetune.bissl_weight_decay = 0.0
  config.evaluate.batch_size = 256

  if "runlocal" in args or common.OFFLINE in args:
    common.apply_runlocal(config, pretext_epochs=0)
  return common.apply_offline_standin(config, args)
