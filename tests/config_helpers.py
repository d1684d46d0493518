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
