"""Config checks beyond the field-by-field ones: seeds, compute dtype, compile-size bounds.

:func:`problems` is called by :func:`bissl_jax.config_validation.validate_config`, so
each value here is refused with one message, before any compute.

* ``data.split_seed`` seeds NumPy's generator, which refuses negative seeds.
* ``model.dtype`` is the compute dtype of every backbone (ResNet, ViT, GPT).
* ``model.width_multiplier`` of a ResNet must leave its first stage a channel.
* ``bissl.cg_iters`` on the unrolled path: on CPU the solver's loop is unrolled
  into straight-line code under ``jit`` (the XLA:CPU loop cliff, ``bissl_jax/implicit/solvers/__init__.py``),
  so its compile time and memory grow with every iteration. Above
  :data:`MAX_UNROLLED_SOLVER_ITERS` the run would spend its time (and memory) in the
  compiler; ``bissl.unroll=False`` runs the same solver as one ``lax`` loop, compiled
  once whatever the count.
"""
from typing import Any, Callable, List

MODEL_DTYPES = ("float32", "bfloat16")
# Far above any configured count (the paper's is 5): a bound on compile size, not on accuracy.
MAX_UNROLLED_SOLVER_ITERS = 100


def problems(config: Any, get: Callable[[Any, str], Any], backend: str) -> List[str]:
  """The messages of every value here that a run must refuse (empty if none).

  Args:
    config: the pipeline config.
    get: ``get(config, 'a.b')``, raising ``AttributeError``/``KeyError`` when absent.
    backend: ``jax.default_backend()`` (whether loops are unrolled by default).
  """
  out = []

  def value(field, default=None):
    try:
      return get(config, field)
    except (AttributeError, KeyError):
      return default

  seed = value("data.split_seed", 0)
  if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
    out.append(f"config.data.split_seed={seed!r}: must be an integer >= 0 (it seeds "
               f"NumPy's generator of the split), e.g. 0.")
  dtype, arch = value("model.dtype", "float32"), str(value("model.arch", ""))
  if dtype not in MODEL_DTYPES:
    out.append(f"config.model.dtype={dtype!r}: unknown compute dtype; choose one of "
               f"{MODEL_DTYPES}.")
  width = value("model.width_multiplier", 1.0)
  if (not arch.startswith(("vit", "gpt")) and isinstance(width, (int, float))
      and width > 0 and round(64 * width) < 1):
    out.append(f"config.model.width_multiplier={width!r}: a ResNet's first stage would have "
               f"round(64 × {width!r}) = 0 channels; use a value >= 1/64 (e.g. 0.0625).")
  iters, unroll = value("bissl.cg_iters"), value("bissl.unroll")
  unrolled = unroll if unroll is not None else backend == "cpu"
  if (isinstance(iters, int) and not isinstance(iters, bool) and unrolled
      and iters > MAX_UNROLLED_SOLVER_ITERS):
    out.append(f"config.bissl.cg_iters={iters}: above {MAX_UNROLLED_SOLVER_ITERS}, the "
               f"unrolled solver loop (the default on CPU) makes compilation explode; set "
               f"--config.bissl.unroll=False (one loop, compiled once) or lower "
               f"bissl.cg_iters (paper: 5).")
  return out
