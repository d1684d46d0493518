"""Shared test helper: set dotted config fields, e.g. ``override(c, **{'bissl.lam': 0.1})``."""


def override(config, **changes):
  """Sets each ``'a.b.c': value`` in ``config`` (a ConfigDict or nested dict) and returns it."""
  for dotted, value in changes.items():
    node = config
    *parents, leaf = dotted.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  return config


import os  # noqa: E402

# Test files live in folders mirroring the packages; these locate the repository and
# the shared test scripts (tests/*.py) from any of them.
TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.dirname(TESTS_DIR)
