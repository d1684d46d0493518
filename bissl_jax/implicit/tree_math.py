"""Vector-space algebra on pytrees, used by the linear solvers.

A pytree of arrays (nested dicts of parameters, say) is treated as one long vector.
Inner products accumulate in at least float32 (bfloat16 leaves are upcast; float64
leaves stay float64) and are formed as elementwise products plus sums rather than
``dot`` calls, so accelerators with reduced-precision matmul defaults (TPU) still
give full float32 accuracy. Results of ``tree_add``/``tree_axpy``/... keep each
leaf's own dtype. Real-valued leaves only.
"""


import jax
import jax.numpy as jnp

from bissl_jax.types import PyTree


def _accumulation_dtype(x: jnp.ndarray) -> jnp.dtype:
  return jnp.promote_types(x.dtype, jnp.float32)


def _leaf_vdot(x: jnp.ndarray, y: jnp.ndarray) -> jnp.ndarray:
  dtype = jnp.promote_types(_accumulation_dtype(x), _accumulation_dtype(y))
  return jnp.sum(x.astype(dtype) * y.astype(dtype))


def tree_vdot(a: PyTree, b: PyTree) -> jnp.ndarray:
  """Inner product ``Σ_leaves Σ_i a_i b_i`` of two pytrees of the same structure."""
  dots = jax.tree_util.tree_leaves(jax.tree_util.tree_map(_leaf_vdot, a, b))
  return sum(dots, jnp.zeros((), jnp.float32))


def tree_leaf_vdots(a: PyTree, b: PyTree) -> PyTree:
  """Per-leaf inner products, as a pytree of scalars shaped like ``a``."""
  return jax.tree_util.tree_map(_leaf_vdot, a, b)


def tree_add(a: PyTree, b: PyTree) -> PyTree:
  """``a + b`` leafwise."""
  return jax.tree_util.tree_map(lambda x, y: (x + y).astype(x.dtype), a, b)


def tree_sub(a: PyTree, b: PyTree) -> PyTree:
  """``a − b`` leafwise."""
  return jax.tree_util.tree_map(lambda x, y: (x - y).astype(x.dtype), a, b)


def tree_scale(a: PyTree, s) -> PyTree:
  """``s·a`` for a scalar ``s`` (a Python number or a 0-d array)."""
  return jax.tree_util.tree_map(lambda x: (s * x).astype(x.dtype), a)


def tree_axpy(alpha, x: PyTree, y: PyTree) -> PyTree:
  """``alpha·x + y`` for a scalar ``alpha``; leaves keep ``y``'s dtypes."""
  return jax.tree_util.tree_map(lambda u, v: (alpha * u + v).astype(v.dtype), x, y)


def tree_norm(a: PyTree) -> jnp.ndarray:
  """Euclidean norm of the whole pytree seen as one vector."""
  return jnp.sqrt(tree_vdot(a, a))


def tree_zeros_like(a: PyTree) -> PyTree:
  """A pytree of zeros with ``a``'s structure, shapes and dtypes."""
  return jax.tree_util.tree_map(jnp.zeros_like, a)


def tree_where_finite(a: PyTree) -> PyTree:
  """Replaces NaN and ±inf entries with 0, leaving finite entries untouched."""
  return jax.tree_util.tree_map(
      lambda x: jnp.where(jnp.isfinite(x), x, jnp.zeros_like(x)), a)


def tree_all_finite(a: PyTree) -> jnp.ndarray:
  """A bool scalar array: True iff every entry of every leaf is finite."""
  flags = [jnp.all(jnp.isfinite(x)) for x in jax.tree_util.tree_leaves(a)]
  return jnp.all(jnp.stack(flags)) if flags else jnp.asarray(True)
