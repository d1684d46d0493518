"""What must be pinned for bit-identical reruns on one machine and backend.

Same config and seed give the same bits across reruns and across kill-and-resume
when:

* random numbers do not depend on how arrays are sharded
  (``jax_threefry_partitionable``, pinned on here rather than left to the JAX
  version's default), so 1 and 8 devices draw the same augmentations;
* GPU reductions are deterministic (``--xla_gpu_deterministic_ops``: no atomics
  in scatter-adds and reductions). It must be in ``XLA_FLAGS`` before the backend
  starts; :func:`pin` adds it when it can and says when it is too late. XLA:CPU is
  deterministic for a fixed thread count;
* every host loop sums in a fixed order (the pipeline's metrics and data stacks do:
  NumPy over arrays in index order, one permutation per epoch from the seed).

Checked on the 2-core AMD EPYC development CPU (2026-12-01): two fresh processes of
``python -m experiments.main --config=configs/digits_simclr.py:runlocal
--config.seeds='(0,)'`` wrote equal ``results.json`` and equal ``metrics.jsonl``
records (every logged loss, gradient norm and solver residual, timestamps aside);
tests/pipeline/test_study.py checks the same within one process, with a kill-and-resume.

The library's 'fast' CPU kernels (``config.model.cpu_kernels``, bissl_jax/runtime/cpu_kernels.py)
are deterministic too: two fresh processes of the same run wrote equal
``results.json`` with them (2026-12-01), though their bits differ from the 'default'
kernels'.

What is *not* the same across machines or backends: the summation order of XLA's
kernels (another CPU model, a GPU, another device count). docs/results.md measures
how far that rounding moves a run.
"""
import os

GPU_FLAG = "--xla_gpu_deterministic_ops=true"


def pin() -> None:
  """Applies the settings above; call before the first computation of a run."""
  import jax  # pylint: disable=g-import-not-at-top
  jax.config.update("jax_threefry_partitionable", True)
  flags = os.environ.get("XLA_FLAGS", "")
  if GPU_FLAG.split("=")[0] not in flags:
    os.environ["XLA_FLAGS"] = (flags + " " + GPU_FLAG).strip()
