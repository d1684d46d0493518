"""Type aliases shared by every layer (a leaf module: it imports nothing of bissl_jax)."""
from typing import Any

# A pytree of arrays (nested dicts, lists, tuples, NamedTuples, flax structs).
PyTree = Any
