"""The command line of the few-label study (``python -m experiments.study``).

The flags of :mod:`bissl_jax.cli`'s ``run`` where they apply (``--config``,
``--workdir``, ``--debug``, ``--config.<field>=V``), plus ``--results`` (the
report) and ``--part``. Errors a user can fix print one message and exit with
status 2 (``bissl_jax.cli.error_boundary``); Ctrl-C or SIGTERM stops after saving
the running stage, and rerunning the same command resumes.
"""
import os
import sys
from typing import Sequence

from absl import app
from absl import flags
from absl import logging

from bissl_jax import cli

DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                              "configs", "study_digits.py")
# --config, --workdir and --debug are the flags of bissl_jax.cli (one definition each).
flags.FLAGS.set_default("workdir", "runs/study_digits")
_RESULTS = flags.DEFINE_string("results", "docs/results.md",
                               "The Markdown report; its plot is written next to it.")
_PART = flags.DEFINE_enum("part", "all", ["all", "grid", "sensitivity", "report"],
                          "all: grid, sensitivity cells, report; grid: no sensitivity "
                          "cells; sensitivity: the worker the study starts on simulated "
                          "devices; report: rewrite the report from the finished cells.")
_ARGV = []


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  from bissl_jax.runtime import determinism  # pylint: disable=g-import-not-at-top
  from bissl_jax.pipeline import study  # pylint: disable=g-import-not-at-top
  determinism.pin()
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
  config = cli._CONFIG.value or cli.load_config(DEFAULT_CONFIG)  # pylint: disable=protected-access
  with cli.error_boundary(cli._DEBUG.value or cli.debug_requested()):  # pylint: disable=protected-access
    cli.apply_cpu_kernels(config.pipeline)  # every cell runs this pipeline config
    # SIGTERM/Ctrl-C are recorded; the running (or next) stage stops after its step.
    from bissl_jax.pipeline import stage_loop  # pylint: disable=g-import-not-at-top
    stage_loop.install_stop_handlers()
    try:
      study.run_study(config, flags.FLAGS.workdir, results_path=_RESULTS.value,
                      part=_PART.value, argv=_ARGV)
    except KeyboardInterrupt:
      print("Stopped. Rerun the same command to resume.", file=sys.stderr, flush=True)
      sys.exit(cli.INTERRUPTED_STATUS)


def run(argv: Sequence[str]) -> None:
  """Parses ``argv`` (program name first) and runs the study."""
  argv = list(argv)
  if not any(a == "--config" or a.startswith("--config=") for a in argv):
    argv.insert(1, f"--config={DEFAULT_CONFIG}")
  _ARGV[:] = argv[1:]
  app.run(main, argv=argv)
