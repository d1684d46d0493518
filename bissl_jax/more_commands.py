"""``bissl-jax gessl`` and ``bissl-jax study``: the other experiments, with ``run``'s flags.

Both parse ``--config=FILE[:ARGS]``, ``--workdir=DIR``, ``--config.<field>=VALUE`` and
``--debug`` with :mod:`bissl_jax.cli`'s parser and report errors through its
``error_boundary``; the older entry points (``python -m
bissl_jax.pipeline.gessl_comparison``, ``python -m experiments.study``) still work.
"""
import os
import sys
from typing import Sequence

from absl import app
from absl import flags
from absl import logging

from bissl_jax import cli

# pylint: disable=protected-access  (the flags of bissl_jax.cli: one definition each)

GESSL_CONFIG = os.path.join(cli._ROOT, "configs", "digits_gessl.py")
GESSL_WORKDIR = "runs/digits_gessl"


def _gessl_main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  from bissl_jax.runtime import determinism  # pylint: disable=g-import-not-at-top
  from bissl_jax.pipeline import gessl_comparison  # pylint: disable=g-import-not-at-top
  from bissl_jax.runtime import mesh  # pylint: disable=g-import-not-at-top
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
  determinism.pin()
  with cli.error_boundary(cli._DEBUG.value or cli.debug_requested()):
    config = cli._CONFIG.value
    cli.apply_cpu_kernels(config)
    mesh.initialize_multihost()  # one process per host: docs/scale.md, "How to launch"
    gessl_comparison.say_once(gessl_comparison.to_markdown(
        gessl_comparison.run(config, cli._WORKDIR.value)))


def gessl_command(argv: Sequence[str]) -> None:
  """``bissl-jax gessl``: the GeSSL comparison (``configs/digits_gessl.py`` by default)
  with the flags of ``run`` (``--config=FILE[:ARGS]``, ``--workdir``, ``--config.<field>``)."""
  argv = list(argv)
  if not any(a == "--config" or a.startswith("--config=") for a in argv[1:]):
    argv.insert(1, f"--config={GESSL_CONFIG}")
  if not any(a == "--workdir" or a.startswith("--workdir=") for a in argv[1:]):
    argv.insert(1, f"--workdir={GESSL_WORKDIR}")
  app.run(_gessl_main, argv=argv, flags_parser=cli._parse_run_flags)


def study_command(argv: Sequence[str]) -> None:
  """``bissl-jax study``: the few-label study (``python -m experiments.study``)."""
  from bissl_jax import study_cli  # pylint: disable=g-import-not-at-top  (sets its defaults)
  if any(a in cli._HELP_ARGS for a in argv[1:]):
    print(f"usage: {argv[0]} [--config=FILE] [--workdir=DIR] [--results=FILE] "
          "[--part=all|grid|sensitivity|report] [--config.<field>=VALUE ...] [--debug]\n"
          + (sys.modules["experiments.study"].__doc__ if "experiments.study" in sys.modules
             else study_cli.__doc__))
    return
  study_cli.run(argv)
