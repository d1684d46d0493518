r"""Runs the BiSSL pipeline: pretext → head warm-up → BiSSL → fine-tuning → test.

Offline default (scikit-learn digits, tiny ResNet-18, 3 seeds, a few minutes on a
CPU)::

  python -m experiments.main          # = bissl-jax run

Paper-scale runs take a config file and overrides::

  python -m experiments.main --workdir=runs/pets \
      --config=configs/imagenet_simclr.py:downstream=oxford_iiit_pet \
      --config.bissl.lam=0.01

``--help`` lists every config field with its value and meaning. Rerunning with the
same ``--workdir`` resumes from the last checkpoint; Ctrl-C or SIGTERM saves the
running stage's last completed step first. Errors a user can fix print one message
(exit status 2); ``--debug`` shows the traceback. See docs/pipeline.md and
``bissl_jax/cli.py`` (the same command as ``bissl-jax run``).
"""
import os
import sys

# Make the repository root importable wherever this script is started from.
_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO_ROOT not in sys.path:
  sys.path.insert(0, _REPO_ROOT)

import signal  # noqa: E402,F401  (tests patch signal.signal through this module)

from bissl_jax import cli  # noqa: E402

_DEFAULT_CONFIG = cli.DEFAULT_CONFIG
main = cli._run_main  # pylint: disable=protected-access  (the absl main, flags parsed)


if __name__ == "__main__":
  cli.line_buffered_output()
  cli.run_command(sys.argv)
