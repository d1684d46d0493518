r"""Offline ViT + MAE + LoRA (BiSSLight-style) on scikit-learn's digits, on a CPU.

Run (no download, no GPU)::

  python -m experiments.main --config=configs/digits_mae_lora.py --workdir=runs/digits_vit

Data: the 1,797 digits bundled with scikit-learn at 16×16 RGB, the splits of
``configs/digits_simclr.py`` (1,150 train / 288 validation / 359 test). Pretext
pretraining and BiSSL's lower level use the train images without labels.

Model: the CPU-test ViT ``vit_test_patch4`` (width 16, depth 2, 2 heads, patch 4:
16 patches), class-token features, an MAE decoder of width 16, depth 1, 2 heads
(the pretext head φ_P), rank-4 LoRA (α = r) on q and v.

Protocol (the ResNet pipeline's, with BiSSLight's parameter-efficient rules):

1. MAE pretraining of the *base* ViT (no adapters, every weight trains; 75% masking,
   normalised pixel loss): 20 epochs, LARS at peak LR 1.0. This stands in for the
   official MAE checkpoint BiSSLight starts from (``pretext.checkpoint``).
2. Fresh LoRA adapters (B = 0, so the model is the base model) are added, and from
   here the base weights are frozen: no optimizer state, no gradient, bit for bit
   unchanged (``tests/pipeline/test_vit_pipeline.py``).
3. Only FT: LoRA + a fresh linear head fine-tuned on the frozen base (30 epochs,
   SGD at LR 0.2, batch 32). BiSSL+FT: head warm-up (5 epochs, LR 0.2) → BiSSL, T=20 alternations of N_L=5 MAE steps
   and N_U=2 classification steps on the two LoRA sets, λ=0.001, implicit gradient by
   BiSSLight's M-FAC (``solver='mfac'``, per-layer blocks: all LoRA leaves of one
   transformer block, m = N_L = 5 stored pretext gradients, no damping) → fine-tuning
   of the lower level's LoRA set + a fresh head. The ``BiSSL[layerwise_cg]`` row is the
   same with the BiSSL paper's solver (3 layer-wise CG iterations, δ = 10).
4. 3 seeds; test top-1/top-5, mean ± std (``<workdir>/results.md``).

The lower level uses AdamW (``bissl.lower_optimizer_name='adamw'``, BiSSLight's
choice; lower LR 1e-3) and the upper level SGD. With the paper's LARS the lower level
hardly moves a zero-initialised LoRA B (its step is scaled by ‖B‖): the largest |B|
entry of θ_P after BiSSL was 4.6e-4 with LARS and is 0.025 with AdamW (seed 0).

Cost (measured 2026-12-06 on the 2-core development CPU, Intel Xeon, beside a test
run): 244 s wall time for the command above (``results.json`` wall time 236 s).

Result it printed (3 seeds, the library's 'fast' CPU kernels)::

  | Pipeline                | Test top-1 (%) | Test top-5 (%) | Seeds | FT lr | FT wd |
  | Only FT                 | 61.0 ± 8.7     | 96.2 ± 2.3     | 3     | 0.2   | 0     |
  | BiSSL+FT                | 63.0 ± 13.4    | 97.9 ± 2.1     | 3     | 0.2   | 0     |
  | BiSSL+FT (layerwise_cg) | 66.4 ± 3.8     | 98.5 ± 0.9     | 3     | 0.2   | 0     |
  | Avg Diff                | +2.0           | +1.7           |       |       |       |

Per seed (top-1 %): Only FT 70.5, 59.1, 53.5; BiSSL+FT (M-FAC) 74.4, 66.6, 48.2;
BiSSL+FT (layer-wise CG) 64.9, 70.8, 63.5. Seed 2 is the weakest seed of both M-FAC
and Only FT. The tiny ViT (width 16, two blocks) with rank-4 adapters on q and v is far
below the ResNet of ``configs/digits_simclr.py`` (≈96%): this config exercises and times
the parameter-efficient protocol end to end; with three seeds and these spreads the rows
are within noise of each other.

``get_config("runlocal")`` is the seconds-long smoke size the tests use.
"""
from configs import common


def get_config(arg: str = ""):
  """The offline digits ViT/MAE/LoRA config; ``arg`` may be ``runlocal``."""
  config = common.base_config()
  config.seeds = (0, 1, 2)
  config.log_every = 10
  config.checkpoint_every = 10

  config.data.pretext_dataset = "digits"
  config.data.downstream_dataset = "digits"
  config.data.image_size = 16

  config.model.arch = "vit_test_patch4"
  config.model.lora_rank = 4
  config.model.lora_targets = ("q", "v")
  config.model.pool = "token"
  config.model.decoder_width = 16
  config.model.decoder_depth = 1
  config.model.decoder_heads = 2

  config.pretext.task = "mae"
  config.pretext.mask_ratio = 0.75
  config.pretext.norm_pix_loss = True
  config.pretext.epochs = 20
  config.pretext.batch_size = 64
  config.pretext.lr = 1.0
  config.pretext.warmup_epochs = 2
  config.pretext.share_across_seeds = False

  config.head_warmup.epochs = 5
  config.head_warmup.batch_size = 64
  config.head_warmup.lr = 0.2
  config.head_warmup.weight_decay = 0.0

  config.bissl.alternations = 20
  config.bissl.lower_steps = 5
  config.bissl.upper_steps = 2
  config.bissl.lam = 0.001
  config.bissl.solver = "mfac"
  config.bissl.mfac_blocks = "per_layer"
  config.bissl.mfac_history = 5
  config.bissl.damping = 0.0
  config.bissl.cg_iters = 3
  config.bissl.lower_optimizer_name = "adamw"   # BiSSLight's; LARS hardly moves LoRA's B = 0
  config.bissl.lower_lr = 1e-3
  config.bissl.pretext_batch_size = 64
  config.bissl.downstream_batch_size = 32
  config.bissl.checkpoint_every = 10

  config.finetune.epochs = 30
  config.finetune.batch_size = 32
  config.finetune.lr = 0.2
  config.finetune.weight_decay = 0.0
  config.finetune.bissl_lr = 0.2
  config.finetune.bissl_weight_decay = 0.0
  config.evaluate.batch_size = 256

  config.search.num_configs = 3
  config.search.epochs = 3

  # The BiSSL paper's solver on the same seeds, warm-up and budget.
  config.bissl_variants = {"layerwise_cg": {"solver": "layerwise_cg", "damping": 10.0}}

  if "runlocal" in common.parse_arg(arg):
    common.apply_runlocal(config, pretext_epochs=2)
  return config
