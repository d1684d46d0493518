"""Test-session settings: small CPU compile times and float32 everywhere."""
import gc
import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import pytest  # noqa: E402

# Tiny models: compile time dominates, so cut XLA's optimisation passes.
jax.config.update("jax_disable_most_optimizations", True)


def pytest_configure(config):
  config.addinivalue_line(
      "markers", "slow: takes more than ~20 s (end-to-end runs); skip with -m 'not slow'")


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
  """Drops every compiled program after each test file.

  Each XLA:CPU executable keeps a few memory mappings for its code; one process that
  compiles the whole suite's programs approaches the kernel's per-process limit
  (vm.max_map_count, 65530 by default), and the next compile then crashes inside the
  compiler. Test files share no compiled programs worth keeping, so clearing JAX's
  caches between them costs little and keeps the count flat.
  """
  yield
  jax.clear_caches()
  gc.collect()
