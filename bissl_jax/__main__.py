"""``python -m bissl_jax COMMAND``: the ``bissl-jax`` command line (bissl_jax/cli.py)."""
import sys

from bissl_jax import cli

if __name__ == "__main__":
  sys.exit(cli.main())
