"""Lets every process of a multi-process test job write the persistent compilation cache.

JAX writes cache entries from process 0 only (to spare shared filesystems concurrent
writes), and on CPU the other processes' programs have keys of their own (the topology
fingerprint of each process's devices differs), so process 1 recompiled every program
in every run of a test job. Here each process writes its own entries, and a later run
of the same job (a killed run restarted, the same config in another test) loads them.
A hit is the executable that would have been compiled, so results are unchanged.
tests/multiprocess_run.py puts this folder on the processes' ``PYTHONPATH``.
"""
try:
  from jax._src import compiler as _compiler
  from jax._src import distributed as _distributed
except ImportError:  # another JAX layout: every process compiles, as without this file
  _compiler = None

if _compiler is not None and hasattr(_compiler, "_cache_write"):
  _write_from_process_0 = _compiler._cache_write

  def _cache_write(*args, **kwargs):
    state = _distributed.global_state
    process_id, state.process_id = state.process_id, 0  # the only thing JAX checks
    try:
      return _write_from_process_0(*args, **kwargs)
    finally:
      state.process_id = process_id

  _compiler._cache_write = _cache_write
