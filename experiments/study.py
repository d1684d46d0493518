r"""Runs the few-label study (``bissl_jax.pipeline.study``) and writes its report.

::

  python -m experiments.study --config=configs/study_digits.py \
      --workdir=runs/study_digits --results=docs/results.md

Rerunning the same command resumes: finished cells are loaded, an unfinished one
continues from its checkpoints. Overrides reach every cell, e.g.
``--config.pipeline.bissl.alternations=6`` or ``--config.study.seeds='(0,1,2)'``.
``--part=grid`` skips the sensitivity cells; the report is rewritten after every cell.
"""
import os
import sys

_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO_ROOT not in sys.path:
  sys.path.insert(0, _REPO_ROOT)

from bissl_jax import study_cli  # noqa: E402

main = study_cli.main


if __name__ == "__main__":
  from bissl_jax import cli  # noqa: E402
  cli.line_buffered_output()
  study_cli.run(sys.argv)
