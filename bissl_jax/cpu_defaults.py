"""XLA:CPU settings for faster convolution gradients: opt-in, because they move numerics.

docs/benchmarks.md §9 times the pretext gradient (ResNet-18, CIFAR stem, width 64,
2×16 images of 32 px) under every XLA:CPU flag that jaxlib 0.10.2 accepts. Only one
changes the speed: ``--xla_cpu_experimental_ynn_fusion_type=dot,eltwise,reduce``
(YNNPACK fusions of matrix products, elementwise ops and reductions, which replaces
the default list and so gives the convolutions back to XLA's own kernels) took 0.68–0.81×
the default's time, but its gradient is not bit-identical to the default's. Since the
library never changes numerics behind the user's back (every recorded result would
move), nothing here is applied unless asked for:

    from bissl_jax import cpu_defaults
    cpu_defaults.enable_fast_cpu_convolutions()   # first thing, before any JAX work

**Known failure:** with this flag, XLA:CPU 0.10.2 cannot run the ``mfac`` solver's
upper step (``INTERNAL: ... Instruction with unsupported layout in YNN fusion:
f32[60,20,20]{1,2,0}``, the per-leaf 20×20 Gram matrices of ResNet-18's 60 leaves);
do not combine it with ``solver='mfac'``.

It adds the flag to ``XLA_FLAGS`` only when that is still effective and wanted: the
backend has not started (XLA reads the variable once), the run is not pinned to a
non-CPU platform, and the user's ``XLA_FLAGS`` does not set the option already.
"""
import os
from typing import MutableMapping, Optional

FAST_CPU_FLAG = "--xla_cpu_experimental_ynn_fusion_type=dot,eltwise,reduce"


def enable_fast_cpu_convolutions(environ: Optional[MutableMapping[str, str]] = None) -> str:
  """Adds :data:`FAST_CPU_FLAG` to ``XLA_FLAGS`` where it takes effect.

  Args:
    environ: the environment to edit (default ``os.environ``).

  Returns:
    ``'applied'``, or why not: ``'user XLA_FLAGS already set it'`` or
    ``'not a CPU run (JAX_PLATFORMS=...)'``.

  Raises:
    RuntimeError: the JAX backend has already started, so the flag would be ignored.
  """
  env = os.environ if environ is None else environ
  name = FAST_CPU_FLAG.split("=", 1)[0]
  flags = env.get("XLA_FLAGS", "")
  if name in flags:
    return "user XLA_FLAGS already set it"
  platforms = env.get("JAX_PLATFORMS", "")
  if platforms and "cpu" not in platforms.split(","):
    return f"not a CPU run (JAX_PLATFORMS={platforms})"
  from jax._src import xla_bridge  # pylint: disable=import-outside-toplevel
  if xla_bridge.backends_are_initialized():
    raise RuntimeError("enable_fast_cpu_convolutions: the JAX backend has already started, "
                       "so XLA_FLAGS is no longer read; call it before any JAX computation "
                       f"or start Python with XLA_FLAGS={FAST_CPU_FLAG}.")
  env["XLA_FLAGS"] = (flags + " " + FAST_CPU_FLAG).strip()
  return "applied"
