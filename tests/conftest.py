"""Test-session settings: small CPU compile times and float32 everywhere."""
import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402

# Tiny models: compile time dominates, so cut XLA's optimisation passes.
jax.config.update("jax_disable_most_optimizations", True)


def pytest_configure(config):
  config.addinivalue_line(
      "markers", "slow: takes more than ~20 s (end-to-end runs); skip with -m 'not slow'")
