r"""BiSSL on the original GPT with a GLUE task: the thesis's settings (§7.1, Table 7.1).

Run (``TASK`` one of cola, sst2, mrpc, qqp, stsb, qnli, rte)::

  bissl-jax run --config=configs/glue_gpt.py:TASK --workdir=runs/glue_TASK \
      --config.data.data_dir=GLUE_DIR --config.data.tokenizer_dir=GPT_DIR \
      --config.pretext.checkpoint=GPT_DIR/pytorch_model.bin

Nothing is downloaded at run time. ``GPT_DIR`` holds Hugging Face's ``openai-gpt``
files (``vocab.json``, ``merges.txt``, ``pytorch_model.bin`` or
``model.safetensors``: ``huggingface-cli download openai-gpt --local-dir GPT_DIR``);
the weights are imported by ``bissl_jax.convert.gpt.load_hf_gpt`` and serve as the
pretext model of every seed, as in the thesis. ``GLUE_DIR`` holds the task from
TFDS, a Hugging Face download or JSONL files (docs/language.md, "GLUE").

Settings (thesis §7.1.2-7.1.3):

- Model: the original GPT (Table B.1: 12 layers, width 768, 12 heads, context 512,
  V = 40,478 + the start/delimiter/end rows of the downstream head), sequences
  padded to 512 tokens (longer inputs dropped), downstream loss L_task + 0.5·L_GPT,
  dropout 0.1, MSE for STS-B.
- Every level: Adam (β = (0.9, 0.999)), batch 64, weight decay 0.01 on every
  parameter except biases and LayerNorm parameters.
- Head warm-up: 10% of an epoch for SST-2, QNLI and QQP, 50% for the others, at
  the constant fine-tuning LR.
- BiSSL: T = 200, N_L = 20, N_U = 4, λ = 0.1, lower peak LR 5e-6 (warm-up over
  10·N_L steps, then cosine), upper LR = the head warm-up's; δ = 10 and 5 layer-wise
  CG iterations (thesis §6.1.3).
- Fine-tuning: Adam, 3 epochs (the original GPT's), cosine LR after a linear warm-up
  over 0.2% of the steps; the LR and weight decay from the thesis's grid
  (``search.lr_grid`` × ``search.wd_grid``: 8 LRs from 1e-6 to 1e-4 × 4 weight decays
  from 1e-5 to 1e-2, 32 trials per pipeline) with ``--config.search.enabled=True``;
  without the search both pipelines use ``finetune.lr`` = 6.25e-5 (the original GPT's)
  and weight decay 0.01.
- 10 seeds, as Table 7.1.

Deviations: the thesis's lower level reads BooksCorpus, which is not available
offline; here it reads the standard-library corpus (``stdlib_docstrings``)
tokenised with the GPT BPE. Validation is scored once per epoch (the thesis: ten
times per epoch).

Expected result (Table 7.1 of the thesis; mean ± std over 10 seeds; Matthews
correlation for CoLA, F1 for MRPC and QQP, Pearson for STS-B, accuracy otherwise)::

  |            | CoLA       | SST2       | RTE        | QNLI       | MRPC       | QQP        | STSB       |
  | Only FT    | 47.0 ± 1.8 | 92.2 ± 0.3 | 60.3 ± 4.1 | 85.7 ± 0.3 | 85.2 ± 1.0 | 87.0 ± 0.2 | 86.3 ± 0.6 |
  | BiSSL + FT | 47.0 ± 1.6 | 93.0 ± 0.3 | 64.4 ± 1.1 | 85.9 ± 0.4 | 85.2 ± 0.3 | 87.1 ± 0.1 | 87.5 ± 0.3 |

Cost (estimated, not measured: it needs an accelerator): one alternation is about
43 next-token gradients of batch 64 × 512 (docs/language.md, "Cost"), so BiSSL's
T = 200 is about 8,600 gradients of the 117 M model, roughly the compute of 0.27
pretraining epochs on the thesis's 32,227 batches, plus 2 × 3 fine-tuning epochs per
seed (and 2 × 32 × 3 epochs for the grid search).

``get_config("TASK,runlocal")`` is the smoke-test size (``gpt_micro``, 32-token
sequences, the offline BPE unless ``data.tokenizer_dir`` is given, pretraining of one
epoch on the offline corpus instead of the weights file).
"""
from configs import common

GLUE_TASKS = ("cola", "sst2", "mrpc", "qqp", "stsb", "qnli", "rte")
# Thesis §7.1.3: the head warm-up lasts 10% of an epoch on the large sets, 50% otherwise.
HEAD_WARMUP_EPOCHS = {"sst2": 0.1, "qnli": 0.1, "qqp": 0.1,
                      "cola": 0.5, "mrpc": 0.5, "stsb": 0.5, "rte": 0.5}
# Thesis §7.1.2: the fine-tuning grid, 8 log-spaced LRs × 4 weight decays.
LR_GRID = (1e-6, 1.93e-6, 3.72e-6, 7.2e-6, 1.39e-5, 2.68e-5, 5.18e-5, 1e-4)
WD_GRID = (1e-5, 1e-4, 1e-3, 1e-2)
# Table 7.1: (Only FT, BiSSL+FT), each (mean, std), in the thesis's metric (× 100).
TABLE7_1 = {
    "cola": ((47.0, 1.8), (47.0, 1.6)), "sst2": ((92.2, 0.3), (93.0, 0.3)),
    "rte": ((60.3, 4.1), (64.4, 1.1)), "qnli": ((85.7, 0.3), (85.9, 0.4)),
    "mrpc": ((85.2, 1.0), (85.2, 0.3)), "qqp": ((87.0, 0.2), (87.1, 0.1)),
    "stsb": ((86.3, 0.6), (87.5, 0.3)),
}


def _task_of(args: dict) -> str:
  named = [k for k in args if k in GLUE_TASKS]
  task = args.get("task") or (named[0] if len(named) == 1 else None)
  if task not in GLUE_TASKS:
    raise ValueError(f"configs/glue_gpt.py needs one GLUE task, e.g. "
                     f"--config=configs/glue_gpt.py:rte; choose one of {GLUE_TASKS}.")
  return task


def get_config(arg: str = ""):
  """The thesis's GPT setup for the GLUE task in ``arg`` (e.g. ``'rte'`` or ``'rte,runlocal'``)."""
  args = common.parse_arg(arg)
  task = _task_of(args)
  config = common.base_config()
  config.seeds = tuple(range(10))
  config.log_every = 20
  config.checkpoint_every = 1

  config.data.pretext_dataset = "stdlib_docstrings"
  config.data.downstream_dataset = f"glue/{task}"
  config.data.context = 512
  config.data.max_chars = 10_000_000   # the whole corpus

  config.model.arch = "gpt"
  common.apply_gpt_recipe(config, batch_size=64)

  config.pretext.lr = 2.5e-4
  config.pretext.epochs = 100

  config.head_warmup.epochs = HEAD_WARMUP_EPOCHS[task]
  config.head_warmup.lr = 6.25e-5

  config.bissl.cg_iters = 5
  config.bissl.alternations = 200
  config.bissl.lower_steps = 20
  config.bissl.upper_steps = 4
  config.bissl.lower_lr = 5e-6
  config.bissl.checkpoint_every = 10

  config.finetune.epochs = 3
  config.finetune.warmup_fraction = 0.002
  config.finetune.lr = 6.25e-5
  config.finetune.bissl_lr = 6.25e-5

  config.evaluate.batch_size = 64
  config.search.lr_grid = LR_GRID
  config.search.wd_grid = WD_GRID
  config.search.num_configs = len(LR_GRID) * len(WD_GRID)
  config.search.epochs = 3

  if "runlocal" in args:
    common.apply_runlocal(config, pretext_epochs=1)
    config.head_warmup.epochs = HEAD_WARMUP_EPOCHS[task]
    config.finetune.epochs = 1
    config.search.lr_grid = LR_GRID[-2:]
    config.search.wd_grid = WD_GRID[-1:]
  return config


def expected_result(task: str) -> str:
  """Table 7.1's numbers for ``task``."""
  (base, base_sd), (bissl, bissl_sd) = TABLE7_1[task]
  return f"Only FT {base} ± {base_sd}, BiSSL+FT {bissl} ± {bissl_sd}"
