"""XLA:CPU kernels for a run: the fast convolution path, set where it takes effect.

docs/benchmarks/cpu_conv.md times the pretext gradient (ResNet-18, CIFAR stem, width 64,
2×16 images of 32 px) under every XLA:CPU flag that jaxlib 0.10.2 accepts. One setting
changes the speed: naming the YNNPACK fusion types, which replaces jaxlib's default list.
That list holds the convolutions, so they go back to XLA's own kernels, which are faster
here (one 3×3 layer's gradient 0.58× YNNPACK's time). ``FAST_CPU_FLAG`` names
``eltwise,reduce`` (elementwise ops and reductions): the whole gradient took 0.56–0.64× the
default's time, as fast as with ``dot`` added (0.68×). ``dot`` is left out on purpose:
jaxlib 0.10.2's YNNPACK *dot* fusions returned inf or NaN, or different numbers from one
process to the next, for an implicit-gradient solve that starts from a constant zero
(``tests/runtime/test_cpu_defaults.py`` keeps that program as a check against the default
kernels). The fast kernels round differently from the default (about 7e-3 max |Δ|/max |g|
on a SimCLR gradient at initialisation) and are no less accurate against float64.

Because it changes the bits, it is a *run* setting, never an import-time one:
``config.model.cpu_kernels`` (``'fast'`` by default, or ``'default'``: jaxlib's own
choice) is applied by ``bissl-jax run`` and the study before the backend starts
(:func:`apply`), recorded in every stage's provenance, and announced in the run's
first lines. ``from bissl_jax import ...`` in a user's program changes no flag.
Before a run starts, the pipeline replaces the config's value by what is in effect
(:func:`reconcile`), so a result never claims kernels it did not use (a notebook's
backend, for instance, has started long before). The flag is read on CPU only; on
GPU and TPU the field changes nothing.
"""
import os
from typing import MutableMapping, Optional

FAST_CPU_FLAG = "--xla_cpu_experimental_ynn_fusion_type=eltwise,reduce"
KERNELS = ("fast", "default")
_FLAG_NAME = FAST_CPU_FLAG.split("=", 1)[0]


def _backend_started() -> bool:
  from jax._src import xla_bridge  # pylint: disable=import-outside-toplevel
  return xla_bridge.backends_are_initialized()


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
  flags = env.get("XLA_FLAGS", "")
  if _FLAG_NAME in flags:
    return "user XLA_FLAGS already set it"
  platforms = env.get("JAX_PLATFORMS", "")
  if platforms and "cpu" not in platforms.split(","):
    return f"not a CPU run (JAX_PLATFORMS={platforms})"
  if _backend_started():
    raise RuntimeError("enable_fast_cpu_convolutions: the JAX backend has already started, "
                       "so XLA_FLAGS is no longer read; call it before any JAX computation "
                       f"or start Python with XLA_FLAGS={FAST_CPU_FLAG}.")
  env["XLA_FLAGS"] = (flags + " " + FAST_CPU_FLAG).strip()
  return "applied"


def apply(kernels: str, environ: Optional[MutableMapping[str, str]] = None) -> str:
  """Applies ``config.model.cpu_kernels`` before the backend starts (a run's first step).

  ``'fast'`` adds the flag unless the user's ``XLA_FLAGS`` sets the option already (then
  theirs wins) or the backend has started (then nothing can change; :func:`reconcile`
  records what is in effect). ``'default'`` changes nothing. Returns what happened.
  """
  if kernels not in KERNELS:
    raise ValueError(f"cpu_kernels must be one of {KERNELS}, got {kernels!r}")
  if kernels == "default":
    return "default kernels"
  try:
    return enable_fast_cpu_convolutions(environ)
  except RuntimeError:
    return "backend already started"


def in_effect(environ: Optional[MutableMapping[str, str]] = None) -> str:
  """``'fast'`` when ``XLA_FLAGS`` names exactly :data:`FAST_CPU_FLAG`'s setting, else ``'default'``.

  XLA reads ``XLA_FLAGS`` once, when the backend starts, and this module only edits it
  before then, so the variable tells what the running backend uses.
  """
  env = os.environ if environ is None else environ
  flags = env.get("XLA_FLAGS", "").split()
  setting = [f for f in flags if f.startswith(_FLAG_NAME + "=")]
  return "fast" if setting and setting[-1] == FAST_CPU_FLAG else "default"


def reconcile(config, platform: str, environ: Optional[MutableMapping[str, str]] = None
              ) -> Optional[str]:
  """Sets ``config.model.cpu_kernels`` to the kernels in effect on a CPU run.

  Args:
    config: the run's config (its ``model.cpu_kernels`` may be changed).
    platform: ``jax.default_backend()``; off CPU the field is left as it is.
    environ: as in :func:`in_effect`.

  Returns:
    A one-line notice when the config asked for other kernels than those in effect,
    else None.
  """
  model = config.get("model") if hasattr(config, "get") else None
  if platform != "cpu" or model is None or "cpu_kernels" not in model:
    return None
  wanted, actual = model.cpu_kernels, in_effect(environ)
  if wanted == actual:
    return None
  model.cpu_kernels = actual
  why = ("the JAX backend started before the run could set the flag (a notebook or a "
         "program that ran JAX first); start a fresh process, or put "
         f"{FAST_CPU_FLAG} in XLA_FLAGS" if wanted == "fast" else
         f"XLA_FLAGS sets {_FLAG_NAME}")
  return (f"config.model.cpu_kernels={wanted!r} is not in effect: {why}. This run uses and "
          f"records cpu_kernels={actual!r}.")
