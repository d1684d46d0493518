r"""Runs the BiSSL pipeline: pretext → head warm-up → BiSSL → fine-tuning → test.

Offline default (scikit-learn digits, tiny ResNet-18, 3 seeds, a few minutes on a
CPU)::

  python -m experiments.main

Paper-scale runs take a config file and overrides::

  python -m experiments.main --workdir=runs/pets \
      --config=configs/imagenet_simclr.py:downstream=oxford_iiit_pet \
      --config.bissl.lam=0.01

Rerunning with the same ``--workdir`` resumes from the last checkpoint; Ctrl-C or
SIGTERM saves the running stage's last completed step first. See docs/pipeline.md.
"""
import os
import signal
import sys

# The config files import ``configs.common``: make the repository root importable
# wherever this script is started from (the one place that does so).
_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO_ROOT not in sys.path:
  sys.path.insert(0, _REPO_ROOT)

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
from absl import logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

_DEFAULT_CONFIG = os.path.join(_REPO_ROOT, "configs", "digits_simclr.py")

_WORKDIR = flags.DEFINE_string("workdir", "./workdir",
                               "Directory for checkpoints, logs and results (resumed if it "
                               "already holds a run).")
_CONFIG = config_flags.DEFINE_config_file(
    "config", _DEFAULT_CONFIG, "Pipeline config file, e.g. configs/stl10_simclr.py.",
    lock_config=True)


def _stop_on_sigterm(signum, frame):
  # Cluster pre-emption sends SIGTERM. Inside a stage the stage loop catches it and
  # stops after the current step, saving it; between stages this ends the run like
  # Ctrl-C.
  raise KeyboardInterrupt(f"signal {signum}")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  # Imported after flag parsing so --help stays fast.
  from bissl_jax import parallel
  from bissl_jax.pipeline import run

  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # orbax logs every file it writes at INFO
  parallel.initialize_multihost()
  signal.signal(signal.SIGTERM, _stop_on_sigterm)
  try:
    run(_CONFIG.value, _WORKDIR.value)
  except KeyboardInterrupt:
    # The running stage has saved its last step and said so; no traceback.
    print("Stopped. Rerun the same command (same --workdir) to resume.", file=sys.stderr,
          flush=True)
    sys.exit(130)


if __name__ == "__main__":
  app.run(main)
