"""Checks a pipeline config before any compute, naming the offending field.

``validate_config`` collects every problem it finds and raises one
:class:`ConfigError` listing them, each as ``config.<field>=<value>: <why and fix>``;
a valid config comes back *resolved* (:func:`resolve_config`: the placeholders the
configs leave to the pipeline filled in). It checks types and ranges only; whether a
dataset is present on disk is checked by the data module when the pipeline opens it
(``DatasetNotFoundError``), still before any training step.

The valid choices are read from the registries of the library (solvers, Hessian
modes, upper-stage drivers, architectures, pretext tasks, λ schedules), so a newly
registered one is accepted without a change here. The defaults live in
``configs/common.py`` only.
"""
import contextlib
import copy
import difflib
import math
import re
from typing import Any, List, Optional

import jax

STAGES = ("all", "pretext", "head_warmup", "bissl", "finetune", "evaluate")
REUSE_MODES = ("recompute", "strict")  # what a rerun does with a stale artifact
_MLP_SPEC = re.compile(r"^[1-9][0-9]*(-[1-9][0-9]*)*$")  # e.g. '256-256-256'

# Which earlier output a single stage needs, and the field that names it.
STAGE_INPUTS = {
    "head_warmup": "pretext.checkpoint",
    "bissl": "bissl.init_checkpoint",
    "finetune": "finetune.init_checkpoint",
    "evaluate": "evaluate.checkpoint",
}


class ConfigError(ValueError):
  """The config has invalid fields; the message names each one and how to fix it."""


def _get(config, dotted: str):
  node = config
  for part in dotted.split("."):
    node = node[part] if isinstance(node, dict) else getattr(node, part)
  return node


def _get_or(config: Any, dotted: str, default: Any) -> Any:
  try:
    return _get(config, dotted)
  except (AttributeError, KeyError):
    return default


def config_fields(config, prefix: str = "") -> dict:
  """``{dotted name: value}`` of every leaf (and every empty group) of ``config``."""
  out = {}
  for key, value in config.items():
    name = prefix + key
    if hasattr(value, "items"):
      nested = config_fields(value, name + ".")
      out.update(nested if nested else {name: value})
    else:
      out[name] = value
  return out


def config_groups(config, prefix: str = "") -> set:
  """The dotted names of every group (nested ConfigDict) of ``config``."""
  out = set()
  for key, value in config.items():
    if hasattr(value, "items"):
      out.add(prefix + key)
      out |= config_groups(value, prefix + key + ".")
  return out


def check_field_names(config: Any, names, *, hint: str = "") -> None:
  """Raises one ConfigError naming every dotted name in ``names`` that ``config`` lacks.

  Each unknown name gets the closest known names ("did you mean"): first by the whole
  dotted name, else by its last part (``lam`` -> ``bissl.lam``).
  """
  known = sorted(set(config_fields(config)) | config_groups(config))
  leaves = [k.rsplit(".", 1)[-1] for k in known]
  problems = []
  for name in names:
    if name in known:
      continue
    close = difflib.get_close_matches(name, known, n=3, cutoff=0.6)
    if not close:
      near = difflib.get_close_matches(name.rsplit(".", 1)[-1], leaves, n=3)
      close = [k for k in known if k.rsplit(".", 1)[-1] in near][:3]
    problems.append(f"config.{name}: unknown field; " + (
        f"did you mean {' or '.join(repr(c) for c in close)}?" if close
        else "no field of that name."))
  if problems:
    raise ConfigError("\n".join(problems) + (f"\n{hint}" if hint else ""))


def _absent(config, dotted: str) -> bool:
  try:
    _get(config, dotted)
    return False
  except (AttributeError, KeyError):
    return True


def _is_known_dataset(name) -> bool:
  from bissl_jax.data import catalogue, text_sets
  if text_sets.is_text_dataset(name) or str(name).startswith("folder:"):
    return True  # a folder of your own images: its files are checked before the run
  try:
    catalogue.get_spec(str(name))  # catalogue names, TFDS names and aliases
  except ValueError:
    return False
  return True


def _choices():
  """The registries' names: solver, Hessian mode, architecture, pretext task, λ schedule."""
  # pylint: disable=g-import-not-at-top  (imported on use: the registries pull in JAX models)
  from bissl_jax.core import state as bilevel
  from bissl_jax.tasks.pretext import gessl
  from bissl_jax.models import gpt
  from bissl_jax.core import lam_schedules
  from bissl_jax.models import resnet
  from bissl_jax.core import optim
  from bissl_jax.tasks import pretext
  from bissl_jax.implicit import solvers
  from bissl_jax.runtime import cpu_kernels
  from bissl_jax.implicit.solvers import mfac
  from bissl_jax.models import vit
  from bissl_jax.models import vit_bundle
  from bissl_jax.data import glue
  return {"gessl.second_level_loss": gessl.SECOND_LEVEL_LOSSES,
          "gessl.inner_params": gessl.INNER_PARAMS,
          "gessl.head_init": gessl.HEAD_INITS,
          "gessl.task_batching": gessl.TASK_BATCHING,
          "gessl.pretext_task": gessl.BASE_TASKS,
          "bissl.solver": solvers.names(),  # the registry, registered solvers included
          "bissl.stage_driver": tuple(bilevel.STAGE_DRIVERS),
          "bissl.lower_optimizer_name": tuple(bilevel.LOWER_OPTIMIZERS),
          "bissl.upper_optimizer_name": tuple(bilevel.UPPER_OPTIMIZERS),
          "pretext.optimizer": tuple(optim.OPTIMIZERS),
          "head_warmup.optimizer": tuple(optim.OPTIMIZERS),
          "finetune.optimizer": tuple(optim.OPTIMIZERS),
          "data.glue_source": tuple(glue.SOURCES),
          "bissl.hessian_mode": tuple(bilevel.HESSIAN_MODES),
          "bissl.mfac_blocks": tuple(mfac.BLOCK_RULES),
          "bissl.mfac_dtype": tuple(mfac.STORAGE_DTYPES),
          # ResNets (resnet.ARCHITECTURES), the named ViTs (vit_bundle.ARCHITECTURES)
          # and the GPTs (gpt.CONFIGS, text).
          "model.arch": (tuple(sorted(resnet.ARCHITECTURES)) + vit_bundle.ARCHITECTURES
                         + tuple(sorted(gpt.CONFIGS))),
          "model.pool": vit_bundle.POOLS,
          "model.posemb": vit.POSEMBS,
          "model.cpu_kernels": cpu_kernels.KERNELS,
          "pretext.task": pretext_task_names(),  # next_token: GPT
          "pretext.bn_grouping": tuple(pretext.BN_GROUPINGS),
          "bissl.lam_schedule": tuple(lam_schedules.SCHEDULES)}


def _pretext_task_class(name: str):
  """The class a ``config.pretext.task`` name builds, or None for an unknown name."""
  # pylint: disable=g-import-not-at-top  (imported on use: the tasks pull in JAX models)
  from bissl_jax.tasks import pretext
  from bissl_jax.tasks.pretext.next_token import NextToken
  return {**pretext.TASKS, "next_token": NextToken}.get(name)


def _check_hessian_for_task(config: Any, bad) -> None:
  """A Hessian mode the pretext task cannot build (Gauss–Newton needs the task's
  ``outputs``/``output_loss``), unless the solver needs no operator at all."""
  from bissl_jax.core import hessian  # pylint: disable=g-import-not-at-top
  from bissl_jax.implicit import solvers  # pylint: disable=g-import-not-at-top
  mode = _get_or(config, "bissl.hessian_mode", None)
  spec = solvers.REGISTRY.get(_get_or(config, "bissl.solver", None))
  task = _pretext_task_class(_get_or(config, "pretext.task", None))
  if _get_or(config, "gessl.enabled", False):  # GeSSL wraps the task (docs/gessl.md)
    from bissl_jax.tasks.pretext.gessl import GeSSL  # pylint: disable=g-import-not-at-top
    task = GeSSL
  if task is None or mode not in hessian.HESSIAN_MODES or (spec and not spec.needs_operator):
    return
  if mode == "gauss_newton" and not hessian.supports_gauss_newton(task):
    able = sorted(n for n in pretext_task_names() if hessian.supports_gauss_newton(
        _pretext_task_class(n)))
    bad("bissl.hessian_mode", f"'gauss_newton' needs a pretext task with outputs() and "
                              f"output_loss(); the pretext task {task.__name__} "
                              f"(config.pretext.task, config.gessl.enabled) has neither: use "
                              f"hessian_mode='linearize', or a pretext task in {able}.")


def pretext_task_names() -> tuple:
  """Every ``config.pretext.task`` name."""
  from bissl_jax.tasks import pretext  # pylint: disable=g-import-not-at-top
  return tuple(sorted(pretext.TASKS)) + ("next_token",)


def _set(config, dotted: str, value) -> None:
  *parents, leaf = dotted.split(".")
  node = config
  for part in parents:
    node = node[part] if isinstance(node, dict) else getattr(node, part)
  if isinstance(node, dict):
    node[leaf] = value
  else:
    setattr(node, leaf, value)


# Placeholders a config may leave as None, and where their value comes from.
_RESOLVED_FROM = {
    "bissl.upper_lr": "head_warmup.lr",                      # paper Table 4 serves both
    "bissl.upper_weight_decay": "head_warmup.weight_decay",
}


def resolve_config(config: Any) -> Any:
  """A copy of ``config`` with the pipeline's placeholders filled in.

  ``bissl.upper_lr`` / ``bissl.upper_weight_decay`` left at None take the head
  warm-up values (the paper's Table 4 gives one pair for both). Resolving a resolved
  config changes nothing. Works on ``ConfigDict`` and plain nested dicts.
  """
  resolved = copy.deepcopy(config)
  unlock = getattr(resolved, "unlocked", None)
  with (unlock() if unlock is not None else contextlib.nullcontext()):
    for field, source in _RESOLVED_FROM.items():
      try:
        value = _get(resolved, field)
      except (AttributeError, KeyError):
        continue
      if value is None:
        _set(resolved, field, float(_get(resolved, source)))
  return resolved


def validate_config(config: Any, *, num_devices: Optional[int] = None) -> Any:
  """Checks every field of ``config``; returns the resolved config.

  Args:
    config: the pipeline ``ConfigDict`` (see ``configs/common.py``).
    num_devices: devices the batches are split over (default: ``jax.device_count()``).

  Returns:
    :func:`resolve_config` of ``config`` (``config`` itself is not changed).

  Raises:
    ConfigError: listing every invalid field with the reason and a fix.
  """
  errors: List[str] = []
  choices = _choices()
  n_dev = jax.device_count() if num_devices is None else int(num_devices)

  def bad(field, why):
    try:
      value = _get(config, field)
    except (AttributeError, KeyError):
      value = "<missing>"
    errors.append(f"config.{field}={value!r}: {why}")

  def missing(field):
    try:
      _get(config, field)
      return False
    except (AttributeError, KeyError):
      errors.append(f"config.{field} is missing: start from configs/common.py:base_config().")
      return True

  def choice(field, options):
    if not missing(field) and _get(config, field) not in options:
      bad(field, f"unknown value; choose one of {options}.")

  def positive(field, integer=True, allow_zero=False):
    if missing(field):
      return
    value = _get(config, field)
    kind = int if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kind):
      bad(field, f"must be {'an integer' if integer else 'a number'}.")
    elif value < 0 or (value == 0 and not allow_zero):
      bad(field, f"must be {'>= 0' if allow_zero else '> 0'}.")

  def divisible(field):
    if missing(field):
      return
    value = _get(config, field)
    if isinstance(value, int) and value > 0 and value % n_dev:
      bad(field, f"must be a multiple of the device count ({n_dev}) so the batch splits "
                 f"evenly; use {max(n_dev, value // n_dev * n_dev)}.")

  # Every number must be finite: NaN passes every comparison below.
  for name, value in config_fields(config).items():
    if (isinstance(value, float) and not math.isfinite(value)) or (
        isinstance(value, (tuple, list)) and any(
            isinstance(v, float) and not math.isfinite(v) for v in value)):
      bad(name, "must be a finite number.")

  # Stages and seeds.
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

  # Data and model.
  from bissl_jax.data import catalogue
  from bissl_jax.data import text_sets
  for field in ("data.pretext_dataset", "data.downstream_dataset"):
    if not missing(field) and not _is_known_dataset(_get(config, field)):
      bad(field, f"unknown dataset; choose one of {tuple(catalogue.CATALOGUE)} (images), "
                 f"folder:<path> (your own images) or {text_sets.TEXT_DATASETS} (text).")
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

  # Pretext pretraining.
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

  # GeSSL around the pretext task (docs/gessl.md).
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

  # Head warm-up (a fraction of an epoch is allowed: GLUE's 10% / 50%).
  positive("head_warmup.epochs", integer=False)
  choice("head_warmup.optimizer", choices["head_warmup.optimizer"])
  positive("head_warmup.lr", integer=False)
  positive("head_warmup.weight_decay", integer=False, allow_zero=True)
  positive("head_warmup.batch_size")
  divisible("head_warmup.batch_size")

  # BiSSL.
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
  for field in ("bissl.lower_momentum", "bissl.upper_momentum"):
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

  # Fine-tuning, evaluation, random search.
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

  # Single stages read an earlier stage's output from a checkpoint path.
  if not missing("stages"):
    stage = _get(config, "stages")
    field = STAGE_INPUTS.get(stage)
    if field is not None and not _get(config, field):
      bad(field, f"stages={stage!r} needs the output of the previous stage: set "
                 f"--config.{field}=<a directory exported by an earlier run>.")

  if not missing("bissl"):
    errors.extend(bilevel_combination_problems(dict(_get(config, "bissl"))))
  from bissl_jax import config_bounds  # split seed, compute dtype, compile-size bounds
  errors.extend(config_bounds.problems(config, _get, jax.default_backend()))

  # Extra BiSSL rows of the comparison: each variant's overrides must make a valid
  # config.bissl of its own.
  variants = {} if missing("bissl_variants") else dict(_get(config, "bissl_variants") or {})
  for name, overrides in variants.items():
    unknown = sorted(set(dict(overrides)) - set(_get(config, "bissl")))
    if unknown:
      bad(f"bissl_variants.{name}", f"overrides unknown config.bissl fields {unknown}.")
      continue
    try:
      validate_config(with_bissl_overrides(config, overrides, variants=False),
                      num_devices=n_dev)
    except ConfigError as e:
      # A problem of the shared fields is the base config's, named once above.
      errors.extend(f"in config.bissl_variants.{name}: {line.strip()}"
                    for line in str(e).splitlines()[1:] if line.strip() not in errors)

  if errors:
    raise ConfigError("Invalid config (nothing was computed):\n  " + "\n  ".join(errors))
  return resolve_config(config)


def bilevel_combination_problems(bissl: dict) -> list:
  from bissl_jax.core import state as bilevel  # pylint: disable=g-import-not-at-top  (pulls in JAX)
  return bilevel.combination_problems(bissl)


def with_bissl_overrides(config: Any, overrides, *, variants: bool = True) -> Any:
  """A copy of ``config`` whose ``bissl`` fields take ``overrides`` (a BiSSL variant).

  With ``variants=False`` the copy has no ``bissl_variants`` of its own.
  """
  out = copy.deepcopy(config)
  unlock = getattr(out, "unlocked", None)
  with (unlock() if unlock is not None else contextlib.nullcontext()):
    for key, value in dict(overrides).items():
      _set(out, f"bissl.{key}", value)
    if not variants:
      try:
        _set(out, "bissl_variants", {})
      except (AttributeError, KeyError):
        pass
  return out
