"""Config fields: reading them, the registries' valid choices, resolving placeholders."""
import contextlib
import copy
import difflib
import re
from typing import Any

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
  from bissl_jax.data import catalogue, detection_sets, text_sets
  if detection_sets.is_detection_dataset(name):
    return True  # a detection downstream set (its files, VOC's, are checked before the run)
  if text_sets.is_text_dataset(name) or str(name).startswith(("folder:", "tfds:")):
    return True  # your own images or any TFDS set: their files are checked before the run
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
          "bissl.preconditioner": bilevel.preconditioner_names(),
          "bissl.upper_method": bilevel.UPPER_METHODS,
          # ResNets (resnet.ARCHITECTURES), the named ViTs (vit_bundle.ARCHITECTURES)
          # and the GPTs (gpt.CONFIGS, text).
          "model.arch": (tuple(sorted(resnet.ARCHITECTURES)) + vit_bundle.ARCHITECTURES
                         + tuple(sorted(gpt.CONFIGS))),
          "model.pool": vit_bundle.POOLS,
          "model.backbone_ends_at": resnet.BOUNDARIES,
          "model.resnets": tuple(sorted(resnet.ARCHITECTURES)),
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


def bilevel_combination_problems(bissl: dict) -> list:
  from bissl_jax.core import state as bilevel  # pylint: disable=g-import-not-at-top  (pulls in JAX)
  return bilevel.combination_problems(bissl)
