"""The Threefry hash on CPU as straight-line code: the same random bits, compiled faster.

jaxlib 0.10.2 lowers ``threefry2x32`` (behind ``jax.random.split``, ``uniform``,
``randint``, ...) on CPU as a rolled loop of its five rounds: one XLA ``while`` per call,
whose body and condition XLA:CPU compiles as programs of their own. The augmentations draw
many numbers per image, so the ``runlocal`` config's SimCLR pretext step held 44 such
loops (1,356 kernels; unrolled: 2 loops, 1,022 kernels). On every other platform JAX
already emits the rounds unrolled; JAX itself made CPU do the same after this release
(jax-ml/jax#37872: faster to compile and to run).

:func:`unroll_threefry_on_cpu` registers that unrolled form for CPU when the installed JAX
still rolls it. The hash is integer arithmetic (adds, rotations, xors), so every random
number is bit-for-bit what the rolled loop gives (tests/runtime/test_cpu_random.py checks
the published known-answer vectors and a NumPy implementation). ``import bissl_jax``
applies it: it changes compile time and speed, never a result. Measured on the 2-core
Intel Xeon, quiet, ``configs/digits_simclr.py:runlocal`` from a cold cache with XLA's
full optimisation (a user's run): 48–49 s of compiling instead of 57–61 (wall 68–70 s
instead of 76–82), and the SimCLR augmentation of a 2×16-image batch at 32 px 7.5–7.7 ms
instead of 7.9–8.5. At XLA's lowest optimisation (the test suite's setting) the compile
time did not change measurably.
"""
import functools
import inspect

_status = None


def unroll_threefry_on_cpu() -> str:
  """Lowers ``threefry2x32`` on CPU with its rounds unrolled; idempotent.

  Returns what happened: ``'applied'``, ``'not needed'`` (this JAX no longer rolls the
  loop on CPU) or ``'unavailable'`` (JAX's internals moved; the rolled loop stays, which
  is slower to compile but gives the same numbers).
  """
  global _status
  if _status is None:
    _status = _register()
  return _status


def _register() -> str:
  try:  # private modules: this mirrors a later JAX release's own CPU lowering
    from jax._src.interpreters import mlir  # pylint: disable=import-outside-toplevel
    from jax._src.random import threefry2x32  # pylint: disable=import-outside-toplevel
  except ImportError:
    return "unavailable"
  if not hasattr(threefry2x32, "_threefry2x32_cpu_lowering_rule"):
    return "not needed"
  lowering = getattr(threefry2x32, "_threefry2x32_lowering", None)
  primitive = getattr(threefry2x32, "threefry2x32_p", None)
  if (lowering is None or primitive is None
      or "use_rolled_loops" not in inspect.signature(lowering).parameters):
    return "unavailable"
  unrolled = mlir.lower_fun(functools.partial(lowering, use_rolled_loops=False),
                            multiple_results=True)
  mlir.register_lowering(primitive, unrolled, platform="cpu")
  return "applied"
