"""The checks of ``validate_config``, one function per config section.

Each takes a :class:`Checker`, which collects the problems, and reads the library's
registries for the valid choices (:func:`bissl_jax.config_validation.fields.choices`).
"""
import math
from typing import Any, List

import jax

from bissl_jax.config_validation.fields import (
    REUSE_MODES, STAGE_INPUTS, STAGES, _MLP_SPEC, _absent, _check_hessian_for_task, _get,
    _get_or, _is_known_dataset, bilevel_combination_problems, config_fields)


class Checker:
  """The problems found so far, and the checks every section uses.

  Attributes:
    config: the config being checked.
    choices: the registries' valid values, by field.
    n_dev: devices the batches are split over.
    errors: ``config.<field>=<value>: <why>`` lines.
  """

  def __init__(self, config: Any, choices: dict, n_dev: int):
    self.config, self.choices, self.n_dev = config, choices, n_dev
    self.errors: List[str] = []

  def bad(self, field, why):
    try:
      value = _get(self.config, field)
    except (AttributeError, KeyError):
      value = "<missing>"
    self.errors.append(f"config.{field}={value!r}: {why}")

  def missing(self, field):
    try:
      _get(self.config, field)
      return False
    except (AttributeError, KeyError):
      self.errors.append(f"config.{field} is missing: start from configs/common.py:base_config().")
      return True

  def choice(self, field, options):
    if not self.missing(field) and _get(self.config, field) not in options:
      self.bad(field, f"unknown value; choose one of {options}.")

  def positive(self, field, integer=True, allow_zero=False):
    if self.missing(field):
      return
    value = _get(self.config, field)
    kind = int if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kind):
      self.bad(field, f"must be {'an integer' if integer else 'a number'}.")
    elif value < 0 or (value == 0 and not allow_zero):
      self.bad(field, f"must be {'>= 0' if allow_zero else '> 0'}.")

  def divisible(self, field):
    if self.missing(field):
      return
    value = _get(self.config, field)
    if isinstance(value, int) and value > 0 and value % self.n_dev:
      self.bad(field, f"must be a multiple of the device count ({self.n_dev}) so the batch "
                      f"splits evenly; use {max(self.n_dev, value // self.n_dev * self.n_dev)}.")


def _finite_numbers(c: Checker) -> None:
  """Every number must be finite: NaN passes every comparison below."""
  config = c.config
  bad = c.bad
  for name, value in config_fields(config).items():
    if (isinstance(value, float) and not math.isfinite(value)) or (
        isinstance(value, (tuple, list)) and any(
            isinstance(v, float) and not math.isfinite(v) for v in value)):
      bad(name, "must be a finite number.")


def _stages_and_seeds(c: Checker) -> None:
  """Which stages run, how reruns treat stale artifacts, the seeds, logging."""
  config = c.config
  bad, missing, choice, positive = c.bad, c.missing, c.choice, c.positive
  choice("stages", STAGES)
  if _get_or(config, "reuse", "recompute") not in REUSE_MODES:
    bad("reuse", f"unknown value; choose one of {REUSE_MODES}.")
  positive("seed", allow_zero=True)
  if not missing("seeds"):
    seeds = _get(config, "seeds")
    if (not isinstance(seeds, (tuple, list)) or not seeds
        or not all(isinstance(s, int) and s >= 0 for s in seeds)):
      bad("seeds", "must be a non-empty tuple of non-negative integers, e.g. (0, 1, 2).")
    elif len(set(seeds)) != len(seeds):
      bad("seeds", "contains duplicates; every comparison seed must be distinct.")
  positive("log_every")
  positive("checkpoint_every")


def _data_and_model(c: Checker) -> None:
  """The datasets, image and token sizes, the architecture and its heads."""
  config, choices = c.config, c.choices
  bad, missing, choice, positive = c.bad, c.missing, c.choice, c.positive
  from bissl_jax.data import catalogue
  from bissl_jax.data import detection_sets
  from bissl_jax.data import text_sets
  for field in ("data.pretext_dataset", "data.downstream_dataset"):
    if not missing(field) and not _is_known_dataset(_get(config, field)):
      bad(field, f"unknown dataset; choose one of {tuple(catalogue.CATALOGUE)} (images), "
                 f"{detection_sets.DETECTION_DATASETS} (detection), "
                 f"folder:<path> (your own images), tfds:<name> (any prepared TFDS set) or "
                 f"{text_sets.TEXT_DATASETS} (text).")
  positive("data.context")
  positive("data.vocab_size")
  positive("data.max_chars")
  choice("data.glue_source", choices["data.glue_source"])
  positive("data.image_size")
  positive("data.loader_workers", allow_zero=True)
  positive("data.device_prefetch", allow_zero=True)
  if not missing("data.val_fraction"):
    vf = _get(config, "data.val_fraction")
    if not isinstance(vf, (int, float)) or not 0.0 < vf < 1.0:
      bad("data.val_fraction", "must lie strictly between 0 and 1 (paper: 0.2).")
  if not missing("data.max_train_examples") and _get(config, "data.max_train_examples") is not None:
    positive("data.max_train_examples")
  if not missing("data.labels_per_class") and _get(config, "data.labels_per_class") is not None:
    positive("data.labels_per_class")
  choice("model.arch", choices["model.arch"])
  choice("model.pool", choices["model.pool"])
  choice("model.backbone_ends_at", choices["model.backbone_ends_at"])
  if (_get_or(config, "model.backbone_ends_at", "res5") != "res5"
      and _get_or(config, "model.arch", "") not in choices["model.resnets"]):
    bad("model.backbone_ends_at", "moves the boundary of a ResNet only; keep 'res5' for "
                                  f"config.model.arch={_get_or(config, 'model.arch', '')!r}.")
  downstream = _get_or(config, "data.downstream_dataset", "")
  if (detection_sets.is_detection_dataset(downstream)
      and _get_or(config, "model.backbone_ends_at", "res5") != "res4"):
    bad("model.backbone_ends_at", f"must be 'res4' for the detection set {downstream!r}: "
                                  "Faster R-CNN C4 shares the ResNet up to res4 and owns res5.")
  pretext = _get_or(config, "data.pretext_dataset", "")
  if detection_sets.is_detection_dataset(pretext) and pretext != downstream:
    bad("data.pretext_dataset", f"{pretext!r} is a detection set; pretrain on it only "
                                "when it is also config.data.downstream_dataset.")
  choice("model.posemb", choices["model.posemb"])
  choice("model.cpu_kernels", choices["model.cpu_kernels"])
  positive("model.width_multiplier", integer=False)
  for field in ("model.projector", "model.predictor"):
    try:
      spec = _get(config, field)
    except (AttributeError, KeyError):
      continue
    if spec is not None and not (isinstance(spec, str) and _MLP_SPEC.match(spec)):
      bad(field, "must be layer widths joined by '-', e.g. '256-256-256'"
                 + (" (or None)." if field.endswith("predictor") else "."))
  projector, predictor = (_get_or(config, f, None) for f in ("model.projector", "model.predictor"))
  if (isinstance(projector, str) and isinstance(predictor, str) and _MLP_SPEC.match(projector)
      and _MLP_SPEC.match(predictor) and projector.split("-")[-1] != predictor.split("-")[-1]):
    bad("model.predictor", f"its last width must equal config.model.projector's "
                           f"({projector.split('-')[-1]}): BYOL compares the two outputs.")
  positive("model.lm_weight", integer=False, allow_zero=True)
  if not missing("model.dropout"):
    rate = _get(config, "model.dropout")
    if not isinstance(rate, (int, float)) or not 0.0 <= rate < 1.0:
      bad("model.dropout", "must lie in [0, 1) (GPT: 0.1).")


def _pretext(c: Checker) -> None:
  """Pretext pretraining: task, optimizer, BatchNorm grouping, schedule, batch."""
  config, choices = c.config, c.choices
  bad, missing, choice, positive, divisible = c.bad, c.missing, c.choice, c.positive, c.divisible
  choice("pretext.task", choices["pretext.task"])
  choice("pretext.optimizer", choices["pretext.optimizer"])
  choice("pretext.bn_grouping", choices["pretext.bn_grouping"])
  positive("pretext.temperature", integer=False)
  if not missing("pretext.ema_decay"):
    decay = _get(config, "pretext.ema_decay")
    if not isinstance(decay, (int, float)) or not 0.0 <= decay < 1.0:
      bad("pretext.ema_decay", "must lie in [0, 1) (paper: 0.9995).")
  positive("pretext.epochs", allow_zero=True)
  positive("pretext.warmup_epochs", allow_zero=True)
  if not missing("pretext.baseline_epochs") and _get(config, "pretext.baseline_epochs") is not None:
    positive("pretext.baseline_epochs", allow_zero=True)
    if _get(config, "pretext.checkpoint"):
      bad("pretext.baseline_epochs", "gives the baseline its own pretext run, which needs "
          "pretraining; unset it (None) when config.pretext.checkpoint is given.")
  positive("pretext.lr", integer=False)
  positive("pretext.weight_decay", integer=False, allow_zero=True)
  positive("pretext.batch_size")
  divisible("pretext.batch_size")


def _gessl(c: Checker) -> None:
  """GeSSL around the pretext task (docs/gessl.md), when enabled."""
  config, choices = c.config, c.choices
  bad, missing, choice, positive = c.bad, c.missing, c.choice, c.positive
  if not _absent(config, "gessl.enabled") and _get(config, "gessl.enabled"):
    if not missing("pretext.task") and _get(config, "pretext.task") not in choices[
        "gessl.pretext_task"]:
      bad("pretext.task", f"GeSSL (config.gessl.enabled) wraps one of "
                          f"{choices['gessl.pretext_task']}; set config.pretext.task to one.")
    for field in ("gessl.K", "gessl.lam", "gessl.n_tasks"):
      positive(field)
    for field, least in (("gessl.classes_per_task", 2), ("gessl.num_views", 2)):
      positive(field)
      if isinstance(_get(config, field), int) and 0 < _get(config, field) < least:
        bad(field, f"must be >= {least}.")
    positive("gessl.inner_lr", integer=False)
    positive("gessl.ssl_weight", integer=False, allow_zero=True)
    positive("gessl.gessl_weight", integer=False, allow_zero=True)
    positive("gessl.fd_radius", integer=False, allow_zero=True)
    if not missing("gessl.first_order") and not isinstance(_get(config, "gessl.first_order"),
                                                            bool):
      bad("gessl.first_order", "must be True or False.")
    for field in ("gessl.second_level_loss", "gessl.inner_params", "gessl.head_init",
                  "gessl.task_batching"):
      choice(field, choices[field])
    n_tasks, classes = _get(config, "gessl.n_tasks"), _get(config, "gessl.classes_per_task")
    if isinstance(n_tasks, int) and isinstance(classes, int):
      batch_fields = ["pretext.batch_size"]
      if _get(config, "stages") in ("all", "bissl"):  # BiSSL's lower level prepares GeSSL too
        batch_fields.append("bissl.pretext_batch_size")
      for field in batch_fields:
        if _get(config, field) != n_tasks * classes:
          bad(field, f"GeSSL splits each batch into gessl.n_tasks x gessl.classes_per_task "
                     f"= {n_tasks} x {classes} = {n_tasks * classes} images; set it to "
                     f"{n_tasks * classes} or change those two.")


def _head_warmup(c: Checker) -> None:
  """The head warm-up (a fraction of an epoch is allowed: GLUE's 10% / 50%)."""
  choices = c.choices
  choice, positive, divisible = c.choice, c.positive, c.divisible
  positive("head_warmup.epochs", integer=False)
  choice("head_warmup.optimizer", choices["head_warmup.optimizer"])
  positive("head_warmup.lr", integer=False)
  positive("head_warmup.weight_decay", integer=False, allow_zero=True)
  positive("head_warmup.batch_size")
  divisible("head_warmup.batch_size")


def _bissl(c: Checker) -> None:
  """BiSSL's levels, solver, Hessian mode, λ variants; the solver and Hessian choices
  come from their registries."""
  config, choices = c.config, c.choices
  bad, missing, choice, positive, divisible = c.bad, c.missing, c.choice, c.positive, c.divisible
  if not missing("bissl.lam"):
    lam = _get(config, "bissl.lam")
    if not isinstance(lam, (int, float)) or lam < 0:
      bad("bissl.lam", "the regularisation weight λ must be >= 0 (paper: 0.001).")
    elif lam == 0 and _get(config, "bissl.learnable_lam"):
      bad("bissl.lam", "a learnable λ starts at softplus⁻¹(λ) and needs λ > 0.")
  positive("bissl.damping", integer=False, allow_zero=True)
  choice("bissl.solver", choices["bissl.solver"])
  positive("bissl.cg_iters")
  positive("bissl.cg_tol", integer=False, allow_zero=True)
  for field in ("bissl.lower_steps", "bissl.upper_steps", "bissl.alternations",
                "bissl.checkpoint_every", "bissl.pretext_batch_size",
                "bissl.downstream_batch_size"):
    positive(field)
  divisible("bissl.pretext_batch_size")
  divisible("bissl.downstream_batch_size")
  positive("bissl.lower_lr", integer=False)
  positive("bissl.lower_weight_decay", integer=False, allow_zero=True)
  for field in ("pretext.momentum", "head_warmup.momentum"):
    if not missing(field):
      momentum = _get(config, field)
      if not isinstance(momentum, (int, float)) or not 0.0 <= momentum < 1.0:
        bad(field, "must lie in [0, 1) (paper: 0.9).")
  for field in ("bissl.lower_momentum", "bissl.upper_momentum", "bissl.penalty_momentum"):
    if not missing(field):
      momentum = _get(config, field)
      if not isinstance(momentum, (int, float)) or not 0.0 <= momentum < 1.0:
        bad(field, "must lie in [0, 1) (paper: 0.9).")
  positive("bissl.trust_coefficient", integer=False)
  positive("bissl.grad_clip", integer=False)
  if not missing("bissl.unroll") and _get(config, "bissl.unroll") not in (None, True, False):
    bad("bissl.unroll", "must be True, False or None (None: unrolled on CPU only).")
  for field in ("bissl.upper_lr", "bissl.upper_weight_decay"):
    if not missing(field) and _get(config, field) is not None:
      positive(field, integer=False, allow_zero=field.endswith("decay"))
  choice("bissl.hessian_mode", choices["bissl.hessian_mode"])
  _check_hessian_for_task(config, bad)
  choice("bissl.stage_driver", choices["bissl.stage_driver"])
  choice("bissl.lower_optimizer_name", choices["bissl.lower_optimizer_name"])
  choice("bissl.upper_optimizer_name", choices["bissl.upper_optimizer_name"])
  choice("bissl.mfac_blocks", choices["bissl.mfac_blocks"])
  choice("bissl.mfac_dtype", choices["bissl.mfac_dtype"])
  choice("bissl.preconditioner", choices["bissl.preconditioner"])
  choice("bissl.upper_method", choices["bissl.upper_method"])
  positive("bissl.penalty_sigma", integer=False)
  positive("bissl.penalty_inner_steps")
  positive("bissl.penalty_lr", integer=False)
  if not missing("bissl.mfac_history") and _get(config, "bissl.mfac_history") is not None:
    positive("bissl.mfac_history")
  if not missing("bissl.residual_guard") and not isinstance(
      _get(config, "bissl.residual_guard"), bool):
    bad("bissl.residual_guard", "must be True or False.")
  positive("bissl.residual_every", allow_zero=True)
  choice("bissl.lam_schedule", choices["bissl.lam_schedule"])
  positive("bissl.lam_min", integer=False, allow_zero=True)
  positive("bissl.lam_exp_alpha", integer=False)
  positive("bissl.lam_damping", integer=False, allow_zero=True)


def _finetune_and_search(c: Checker) -> None:
  """Fine-tuning, evaluation and the random search."""
  config, choices = c.config, c.choices
  bad, missing, choice, positive, divisible = c.bad, c.missing, c.choice, c.positive, c.divisible
  positive("finetune.epochs")
  choice("finetune.optimizer", choices["finetune.optimizer"])
  if not missing("finetune.warmup_fraction"):
    frac = _get(config, "finetune.warmup_fraction")
    if isinstance(frac, bool) or not isinstance(frac, (int, float)) or not 0.0 <= frac < 1.0:
      bad("finetune.warmup_fraction", "must lie in [0, 1) (GPT: 0.002; paper: 0).")
  positive("finetune.batch_size")
  divisible("finetune.batch_size")
  for field in ("finetune.lr", "finetune.bissl_lr"):
    positive(field, integer=False)
  for field in ("finetune.weight_decay", "finetune.bissl_weight_decay"):
    positive(field, integer=False, allow_zero=True)
  if not missing("finetune.momentum"):
    momentum = _get(config, "finetune.momentum")
    if not isinstance(momentum, (int, float)) or not 0.0 <= momentum < 1.0:
      bad("finetune.momentum", "must lie in [0, 1) (paper: 0.9).")
  positive("evaluate.batch_size")
  divisible("evaluate.batch_size")
  if not missing("search.enabled") and _get(config, "search.enabled"):
    positive("search.num_configs")
    positive("search.epochs")
    for field in ("search.lr_range", "search.wd_range"):
      rng = _get(config, field)
      if (not isinstance(rng, (tuple, list)) or len(rng) != 2
          or not all(isinstance(x, (int, float)) and x > 0 for x in rng) or rng[0] > rng[1]):
        bad(field, "must be (low, high) with 0 < low <= high (sampled log-uniformly).")
    for field in ("search.lr_grid", "search.wd_grid"):
      grid = () if missing(field) else _get(config, field)
      if (not isinstance(grid, (tuple, list))
          or not all(isinstance(x, (int, float)) and x > 0 for x in grid)):
        bad(field, "must be a tuple of positive numbers (empty: random sampling).")
    if not missing("search.lr_grid") and not missing("search.wd_grid") and (
        bool(_get(config, "search.lr_grid")) != bool(_get(config, "search.wd_grid"))):
      bad("search.lr_grid", "a grid search needs both search.lr_grid and search.wd_grid.")


def _stage_inputs(c: Checker) -> None:
  """A single stage reads an earlier stage's output from a checkpoint path."""
  config = c.config
  bad, missing = c.bad, c.missing
  if not missing("stages"):
    stage = _get(config, "stages")
    field = STAGE_INPUTS.get(stage)
    if field is not None and not _get(config, field):
      bad(field, f"stages={stage!r} needs the output of the previous stage: set "
                 f"--config.{field}=<a directory exported by an earlier run>.")


def _across_fields(c: Checker) -> None:
  """Values valid alone but not together (the solver's declarations), and the bounds
  that keep a compile small (``config_bounds``)."""
  config = c.config
  missing = c.missing
  if not missing("bissl"):
    c.errors.extend(bilevel_combination_problems(dict(_get(config, "bissl"))))
  from bissl_jax import config_bounds  # split seed, compute dtype, compile-size bounds
  c.errors.extend(config_bounds.problems(config, _get, jax.default_backend()))


SECTIONS = (_finite_numbers, _stages_and_seeds, _data_and_model, _pretext, _gessl, _head_warmup,
            _bissl, _finetune_and_search, _stage_inputs, _across_fields)
"""Every section check, in the order their problems are listed."""
