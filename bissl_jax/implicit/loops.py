"""The one loop primitive of bissl_jax: unrolled on XLA:CPU, ``lax`` loops elsewhere.

XLA:CPU runs convolution *gradients* about 15–40× slower inside ``while_loop``,
``fori_loop`` or ``scan`` bodies than in straight-line code (measured in
``bench/loop_cliff.py``). Every fixed-length loop over gradients or Hessian-vector
products in the library (solver iterations, the lower steps and the upper steps of
a stage, GeSSL's inner steps) therefore goes through :func:`scan`/:func:`fori`,
which trace a Python loop (straight-line code under ``jit``) when ``unroll`` is
true and a ``lax`` loop otherwise. Both drivers run the same body and give the
same result; :func:`default_unroll` picks the unrolled one on CPU.
"""
from typing import Any, Callable, Optional, Tuple

import jax
import jax.numpy as jnp
from jax import lax

Carry = Any


def default_unroll() -> bool:
  """True on XLA:CPU (the loop cliff), False on GPU and TPU."""
  return jax.default_backend() == "cpu"


def resolve_unroll(unroll: Optional[bool]) -> bool:
  """``unroll`` itself, or :func:`default_unroll` when it is None."""
  return default_unroll() if unroll is None else bool(unroll)


def _stack(ys):
  return jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *ys)


def scan(body: Callable[[Carry, Any], Tuple[Carry, Any]], carry: Carry, xs: Any, *,
         length: Optional[int] = None, unroll: Optional[bool] = None
         ) -> Tuple[Carry, Any]:
  """``lax.scan(body, carry, xs)``, or the same loop traced step by step.

  Args:
    body: ``(carry, x) -> (carry, y)``.
    carry: the initial carry.
    xs: a pytree of arrays with a common leading axis (or None with ``length``).
    length: number of steps when ``xs`` is None.
    unroll: True for a Python loop, False for ``lax.scan``, None for
      :func:`default_unroll`.

  Returns:
    ``(final carry, ys stacked along a new leading axis)``.
  """
  if not resolve_unroll(unroll):
    return lax.scan(body, carry, xs, length=length)
  if xs is None:
    n = int(length)
  else:
    n = jax.tree_util.tree_leaves(xs)[0].shape[0]
  ys = []
  for i in range(n):
    x = None if xs is None else jax.tree_util.tree_map(lambda a: a[i], xs)
    carry, y = body(carry, x)
    ys.append(y)
  if not ys:  # n == 0: shapes of y are unknown without tracing the body
    return lax.scan(body, carry, xs, length=length)
  return carry, _stack(ys)


def fori(body: Callable[[int, Carry], Carry], carry: Carry, n: int, *,
         unroll: Optional[bool] = None) -> Carry:
  """``lax.fori_loop(0, n, body, carry)``, or the same loop traced step by step.

  ``n`` must be a Python int: it fixes the loop length at trace time. The index
  passed to ``body`` is a Python int in the unrolled driver and a traced int32 in
  the ``lax`` one, so a body must not branch on it in Python.
  """
  if resolve_unroll(unroll):
    for i in range(int(n)):
      carry = body(i, carry)
    return carry
  return lax.fori_loop(0, int(n), body, carry)
