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
from typing import Any, Optional

import jax

from bissl_jax.config_validation.fields import (  # noqa: F401  (the package's API)
    REUSE_MODES, STAGE_INPUTS, STAGES, ConfigError, _choices, _get, _get_or, _set,
    bilevel_combination_problems, check_field_names, config_fields, config_groups,
    pretext_task_names, resolve_config)
from bissl_jax.config_validation.sections import SECTIONS, Checker


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
  n_dev = jax.device_count() if num_devices is None else int(num_devices)
  c = Checker(config, _choices(), n_dev)
  for check in SECTIONS:
    check(c)
  _check_variants(c)
  if c.errors:
    raise ConfigError("Invalid config (nothing was computed):\n  " + "\n  ".join(c.errors))
  return resolve_config(config)


def _check_variants(c: Checker) -> None:
  """Extra BiSSL rows of the comparison: each variant's overrides must make a valid
  config.bissl of its own."""
  config, n_dev, bad, missing = c.config, c.n_dev, c.bad, c.missing
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
      c.errors.extend(f"in config.bissl_variants.{name}: {line.strip()}"
                    for line in str(e).splitlines()[1:] if line.strip() not in c.errors)


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
