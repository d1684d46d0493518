"""Seed derivation: one independent, reproducible random stream per purpose.

Stages, data stacks and pipelines each draw from ``derive_seed(seed, purpose)``, so
adding a stage never shifts another stage's stream, and both pipelines of one
comparison seed share exactly the streams they should (fine-tuning order, head
initialisation).
"""


def derive_seed(seed: int, *names: str) -> int:
  """A stable 31-bit seed for ``seed`` and a purpose, e.g. ``derive_seed(0, 'finetune')``.

  The same arguments give the same value on every machine and Python version (a
  64-bit FNV-1a hash, not Python's randomised ``hash``).
  """
  h = 1469598103934665603
  for byte in repr((int(seed),) + names).encode():
    h = ((h ^ byte) * 1099511628211) % 2**64
  return h % (2**31 - 1)
