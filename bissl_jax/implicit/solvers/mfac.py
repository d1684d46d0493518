"""M-FAC implicit gradients from stored pretext gradients (BiSSLight; docs/solvers.md).

BiSSLight replaces the Hessian of the lower problem by the empirical Fisher of the
last m pretext gradients g_1..g_m (of L_P alone, without the proximal term),
taken block by block: with G_b the m×d_b matrix of those gradients restricted to
block b and ``F_b = G_bᵀG_b/m``, the implicit gradient is, by Woodbury,

    (I + F_b/λ)⁻¹ v_b = v_b − G_bᵀ (mλ·I_m + G_b G_bᵀ)⁻¹ G_b v_b.

That needs no Hessian-vector product: per block one m×m Gram matrix, one m×m
solve (all blocks batched in one ``jnp.linalg.solve``) and two passes over the
stored gradients. It equals the sequential Sherman–Morrison recursion of the
reference code (denominators ``m + gᵀH⁻¹g``), without its host round trips.

Two entry points:

* :func:`mfac_solve` takes a stacked pytree of gradients (leading axis m), e.g.
  collected by the caller; it composes with ``jit`` and ``vmap``.
* a rolling :class:`GradientWindow` (:func:`init`, :func:`push`, :func:`solve`)
  that the lower stage fills with one gradient per step and the upper stage reads;
  it keeps the last m and, before m have arrived, uses only the valid ones.

**Blocks** (``blocks=``):

* ``'per_leaf'``: every parameter tensor is a block (BiSSLight's default);
* ``'per_module'``: the leaves of one module form a block: one LoRA adapter's A and B
  (BiSSLight's ``block`` setting: q and v separately), a BatchNorm's scale and bias;
* ``'per_layer'``: the leaves under one network layer form a block. A leaf's layer
  is the path prefix up to its first key that names a layer: ``layer<i>_<j>``
  (a ResNet block, e.g. ``layer1_0``), ``blocks_<i>`` / ``block_<i>`` (a ViT
  block: all its LoRA leaves together, BiSSLight's ViT setting), ``layers_<i>``
  or ``h_<i>`` (transformer stacks). A leaf outside any layer (stem, patch
  embedding, final norm) is grouped with its siblings: its block is its parent
  module (so ``conv1/kernel`` alone, ``bn1/{scale,bias}`` together);
* ``'global'``: one block, everything;
* a callable ``path -> block id``: ``path`` is the tuple of key names of a leaf
  (e.g. ``('layer1_0', 'conv1', 'kernel')``), the id any hashable, or None to
  exclude the leaf.

**Frozen leaves** (``mask`` False, e.g. from ``Model.trainable``) are excluded:
F has no entries there, so ``x = v`` on them, and the window stores nothing for
them (a ``(m, 0)`` placeholder).

**Precision.** Gradients may be stored in bfloat16 (half the memory); Gram
matrices, products and the m×m solve accumulate in float32 (``Precision.HIGHEST``
matmuls, so TPUs do not drop to bfloat16 passes).
"""
from typing import Callable, List, NamedTuple, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from bissl_jax.implicit.solvers.base import SolveInfo
# The block rules live in blocks.py; re-exported here, where users of M-FAC look for them.
from bissl_jax.implicit.solvers.blocks import (  # noqa: F401
    BLOCK_RULES, LAYER_KEY, BlockRule, block_assignment, leaf_paths, mask_leaves,
    per_layer_block)
from bissl_jax.implicit.tree_math import tree_all_finite, tree_norm, tree_sub, tree_vdot
from bissl_jax.implicit.solvers.spec import SolverSpec
from bissl_jax.types import PyTree

STORAGE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}

_HIGHEST = lax.Precision.HIGHEST


# ---------------------------------------------------------------------------
# The solve.

def _rows(g: jnp.ndarray) -> jnp.ndarray:
  return g.reshape(g.shape[0], -1)


def _block_products(g_leaves, vec_leaves, ids, n_blocks: int, m: int) -> jnp.ndarray:
  """``(n_blocks, m)``: ``G_b u_b`` for every block."""
  out = [jnp.zeros((m,), jnp.float32) for _ in range(n_blocks)]
  for g, u, b in zip(g_leaves, vec_leaves, ids):
    if b is not None:
      out[b] = out[b] + jnp.einsum("id,d->i", _rows(g), u.reshape(-1), precision=_HIGHEST,
                                   preferred_element_type=jnp.float32)
  return jnp.stack(out)


def _apply_rows(g_leaves, vec_leaves, ids, coeffs: jnp.ndarray, scale) -> List[jnp.ndarray]:
  """``u_b + scale·G_bᵀ c_b`` leaf by leaf (excluded leaves unchanged)."""
  out = []
  for g, u, b in zip(g_leaves, vec_leaves, ids):
    if b is None:
      out.append(u)
      continue
    gt_c = jnp.einsum("id,i->d", _rows(g), coeffs[b], precision=_HIGHEST,
                      preferred_element_type=jnp.float32)
    out.append((u.astype(jnp.float32) + scale * gt_c.reshape(u.shape)).astype(u.dtype))
  return out


def _check_grads(g_leaves, v_leaves, ids) -> int:
  ms = set()
  for g, v, b in zip(g_leaves, v_leaves, ids):
    if b is None:
      continue
    if g.ndim < 1 or tuple(g.shape[1:]) != tuple(v.shape):
      raise ValueError(f"Stacked gradients must be shaped (m, *leaf.shape); got a leaf "
                       f"{tuple(g.shape)} for v's leaf {tuple(v.shape)}.")
    ms.add(g.shape[0])
  if len(ms) > 1:
    raise ValueError(f"Every stacked gradient leaf needs the same leading axis m; got "
                     f"{sorted(ms)}.")
  return ms.pop() if ms else 0


class WindowFactor(NamedTuple):
  """:func:`factorize`'s per-block factorisation of ``nλ·I_m + G_b G_bᵀ``: it depends on
  the stored gradients and λ only, so one serves every solve of an upper stage.
  ``lu, pivots``: ``jax.scipy.linalg.lu_factor`` of the transposed systems; ``valid``:
  ``(m,)`` 1 on the valid rows; ``n_lam``: ``max(n, 1)·λ``."""
  lu: jnp.ndarray
  pivots: jnp.ndarray
  valid: jnp.ndarray
  n_lam: jnp.ndarray


def _flat_problem(grads: PyTree, v: PyTree, blocks: BlockRule, mask: Optional[PyTree]):
  """``(v leaves, treedef, gradient leaves, block ids, n_blocks, m)``."""
  v_leaves, treedef = jax.tree_util.tree_flatten(v)
  try:
    g_leaves = treedef.flatten_up_to(grads)
  except (ValueError, TypeError) as e:
    raise ValueError(f"grads must have v's pytree structure (with a leading axis m on "
                     f"every leaf); {e}") from e
  ids, n_blocks = block_assignment(v, blocks, mask)
  return v_leaves, treedef, g_leaves, ids, n_blocks, _check_grads(g_leaves, v_leaves, ids)


def _valid_rows(m: int, num_valid, lam):
  """``(valid (m,) float32, max(n, 1)·λ)`` for n = ``num_valid`` (None: m) rows."""
  n = jnp.asarray(m if num_valid is None else jnp.minimum(num_valid, m), jnp.float32)
  return (jnp.arange(m) < n).astype(jnp.float32), jnp.maximum(n, 1.0) * jnp.asarray(
      lam, jnp.float32)


def _factorize(g_leaves, ids, n_blocks: int, m: int, lam, num_valid) -> WindowFactor:
  valid, n_lam = _valid_rows(m, num_valid, lam)
  gram = [jnp.zeros((m, m), jnp.float32) for _ in range(n_blocks)]
  for g, b in zip(g_leaves, ids):
    if b is not None:
      rows = _rows(g)
      gram[b] = gram[b] + jnp.einsum("id,jd->ij", rows, rows, precision=_HIGHEST,
                                     preferred_element_type=jnp.float32)
  # Invalid rows: zero Gram rows/columns and right-hand side, so their
  # coefficients are exactly 0 and whatever they hold never enters x.
  gram = jnp.stack(gram) * (valid[:, None] * valid[None, :])
  system = gram + n_lam * jnp.eye(m, dtype=jnp.float32)
  # The system is symmetric (each Gram matrix is, bit for bit), so solving with its
  # transpose is the same solve; handing LAPACK (column-major) the transpose lets XLA
  # keep the producing fusion row-major, which the YNNPACK fusions of the fast CPU
  # kernels (runtime/cpu_kernels.py) require: otherwise XLA:CPU 0.10.2 stops with
  # 'Instruction with unsupported layout in YNN fusion'. lu_factor + lu_solve is
  # what jnp.linalg.solve computes, bit for bit, with the factorisation kept.
  lu, pivots = jax.scipy.linalg.lu_factor(jnp.swapaxes(system, -1, -2))
  return WindowFactor(lu=lu, pivots=pivots, valid=valid, n_lam=n_lam)


def _solve_factored(g_leaves, v_leaves, ids, n_blocks: int, m: int, factor: WindowFactor,
                    treedef, diagnostics: bool) -> Tuple[PyTree, SolveInfo]:
  """Two passes over the gradients (``G_b v_b``, then ``v_b − G_bᵀc_b``), two more
  with ``diagnostics`` (``A x`` for the residual and the Rayleigh quotient)."""
  valid = factor.valid
  gv = _block_products(g_leaves, v_leaves, ids, n_blocks, m) * valid
  coeffs = jax.scipy.linalg.lu_solve((factor.lu, factor.pivots), gv[..., None])[..., 0] * valid
  x_leaves = _apply_rows(g_leaves, v_leaves, ids, coeffs, -1.0)
  unflatten = lambda leaves: jax.tree_util.tree_unflatten(treedef, leaves)
  x, v = unflatten(x_leaves), unflatten(v_leaves)
  if not diagnostics:
    return x, _unchecked_info(x)
  # Diagnostics: A x = x + G_bᵀ(G_b x_b)/(nλ), with the same F.
  gx = _block_products(g_leaves, x_leaves, ids, n_blocks, m) * valid
  ax_leaves = _apply_rows(g_leaves, x_leaves, ids, gx, 1.0 / factor.n_lam)
  return x, _info(v, x, unflatten(ax_leaves))


def mfac_solve(grads: PyTree, v: PyTree, lam, *, blocks: BlockRule = "per_leaf",
               mask: Optional[PyTree] = None, num_valid=None, factor: Optional[WindowFactor]
               = None, diagnostics: bool = True) -> Tuple[PyTree, SolveInfo]:
  """``(I + F_b/λ)⁻¹ v_b`` per block with the empirical Fisher of stacked gradients.

  Args:
    grads: pytree shaped like ``v`` with a leading axis m on every leaf: row i is
      gradient g_i (any float dtype; bfloat16 storage is fine). Leaves excluded by
      ``mask`` may hold anything.
    v: the right-hand side (e.g. ``∇_θ L_D(θ_P, φ_D)``).
    lam: λ > 0 (may be traced); BiSSLight adds no damping.
    blocks: the block rule (see the module docstring).
    mask: optional tree of Python bools shaped like ``v``; False leaves are
      excluded (``x = v`` there).
    num_valid: optional (possibly traced) count n ≤ m of valid rows: rows ≥ n are
      ignored and ``F = (1/n) Σ_{i<n} g_i g_iᵀ``. None: all m rows. With n = 0,
      ``x = v``.
    factor: :func:`factorize`'s result for the same ``grads``, ``lam``, ``blocks``,
      ``mask`` and ``num_valid`` (then those are not read again): skips the Gram
      matrices and their factorisation. None: built here.
    diagnostics: compute ``residual`` and ``min_curvature`` (two more passes over the
      gradients); False: they are NaN and +inf (unmeasured).

  Returns:
    ``(x, SolveInfo)``: ``residual`` is ``‖(I + F/λ)x − v‖/‖v‖`` with the same F
    (it measures the float32 solve, not how well F approximates the Hessian);
    ``iterations`` 0; ``min_curvature`` the Rayleigh quotient ``xᵀ(I + F/λ)x/xᵀx``
    (≥ 1: the operator is positive definite); ``nonfinite`` as usual.
  """
  v_leaves, treedef, g_leaves, ids, n_blocks, m = _flat_problem(grads, v, blocks, mask)
  if n_blocks == 0 or m == 0:  # nothing to precondition
    return v, _info(v, v, v) if diagnostics else _unchecked_info(v)
  if factor is None:
    factor = _factorize(g_leaves, ids, n_blocks, m, lam, num_valid)
  return _solve_factored(g_leaves, v_leaves, ids, n_blocks, m, factor, treedef, diagnostics)


def factorize_stacked(grads: PyTree, lam, *, blocks: BlockRule = "per_leaf",
                      like: Optional[PyTree] = None) -> Optional[WindowFactor]:
  """:func:`mfac_solve`'s factorisation for stacked ``grads`` (all m rows valid), to pass
  as ``factor=`` to every solve with the same gradients and λ. ``like``: a pytree
  shaped like one right-hand side (default: row 0 of ``grads``). None when there is
  nothing to factorise (no block or no row)."""
  template = like if like is not None else jax.tree_util.tree_map(lambda g: g[0], grads)
  _, _, g_leaves, ids, n_blocks, m = _flat_problem(grads, template, blocks, None)
  if n_blocks == 0 or m == 0:
    return None
  return _factorize(g_leaves, ids, n_blocks, m, lam, None)


def _unchecked_info(x) -> SolveInfo:
  return SolveInfo(iterations=jnp.zeros((), jnp.int32),
                   residual=jnp.full((), jnp.nan, jnp.float32),
                   min_curvature=jnp.full((), jnp.inf, jnp.float32),
                   nonfinite=jnp.logical_not(tree_all_finite(x)))


def _info(v, x, ax) -> SolveInfo:
  v_norm = tree_norm(v)
  residual = tree_norm(tree_sub(ax, v)) / jnp.where(v_norm > 0, v_norm, 1.0)
  xx = tree_vdot(x, x)
  rayleigh = jnp.where(xx > 0, tree_vdot(x, ax) / jnp.where(xx > 0, xx, 1.0), jnp.inf)
  return SolveInfo(iterations=jnp.zeros((), jnp.int32),
                   residual=residual.astype(jnp.float32),
                   min_curvature=rayleigh.astype(jnp.float32),
                   nonfinite=jnp.logical_not(tree_all_finite(x) & jnp.isfinite(residual)))


# ---------------------------------------------------------------------------
# The rolling gradient window.

class GradientWindow(NamedTuple):
  """The last m pretext gradients, for :func:`solve`.

  Attributes:
    grads: pytree shaped like the parameters; every included leaf is
      ``(m, *leaf.shape)`` in the storage dtype, slot ``count % m`` written next;
      every excluded (frozen) leaf is a ``(m, 0)`` placeholder.
    count: int32, gradients pushed so far; ``min(count, m)`` rows are valid.
  """
  grads: PyTree
  count: jnp.ndarray


def _storage_dtype(dtype):
  if isinstance(dtype, str):
    if dtype not in STORAGE_DTYPES:
      raise ValueError(f"Unknown M-FAC storage dtype {dtype!r}; use one of "
                       f"{sorted(STORAGE_DTYPES)}.")
    return STORAGE_DTYPES[dtype]
  dtype = jnp.dtype(dtype)
  if dtype not in (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16)):
    raise ValueError(f"M-FAC stores gradients in float32 or bfloat16; got {dtype}.")
  return dtype


def init(params_like: PyTree, m: int, dtype=jnp.float32,
         mask: Optional[PyTree] = None) -> GradientWindow:
  """An empty window for the last ``m`` gradients of trees shaped like ``params_like``.

  Args:
    params_like: the parameters (or ``jax.ShapeDtypeStruct`` s) the gradients are of.
    m: window length (BiSSLight: m = N_L = 20).
    dtype: storage dtype, ``float32`` or ``bfloat16`` (or their names).
    mask: optional tree of Python bools; False leaves are not stored.
  """
  if isinstance(m, bool) or not isinstance(m, (int, np.integer)) or m < 1:
    raise ValueError(f"The M-FAC window length m must be a positive Python int; got {m!r}.")
  dtype = _storage_dtype(dtype)
  leaves, treedef = jax.tree_util.tree_flatten(params_like)
  keep = mask_leaves(mask, treedef, len(leaves))
  stored = [jnp.zeros((int(m), *np.shape(p)) if k else (int(m), 0), dtype)
            for p, k in zip(leaves, keep)]
  return GradientWindow(grads=jax.tree_util.tree_unflatten(treedef, stored),
                        count=jnp.zeros((), jnp.int32))


def _included(stored: jnp.ndarray, leaf) -> bool:
  return tuple(stored.shape[1:]) == tuple(np.shape(leaf))


def window_length(window: GradientWindow) -> int:
  """m, the number of slots."""
  return jax.tree_util.tree_leaves(window.grads)[0].shape[0]


def push(window: GradientWindow, grads: PyTree) -> GradientWindow:
  """Stores ``grads`` in the next slot, overwriting the oldest once the window is full."""
  m = window_length(window)
  slot = window.count % m
  g_leaves, treedef = jax.tree_util.tree_flatten(grads)
  try:
    stored = treedef.flatten_up_to(window.grads)
  except (ValueError, TypeError) as e:
    raise ValueError(f"push: grads must have the window's parameter structure; {e}") from e
  new = []
  for s, g in zip(stored, g_leaves):
    if not _included(s, g):
      if s.shape[1:] != (0,):
        raise ValueError(f"push: gradient leaf {np.shape(g)} does not match the window's "
                         f"{tuple(s.shape[1:])}.")
      new.append(s)   # excluded leaf: nothing stored
      continue
    new.append(lax.dynamic_update_index_in_dim(s, g.astype(s.dtype), slot, 0))
  return GradientWindow(grads=jax.tree_util.tree_unflatten(treedef, new),
                        count=window.count + 1)


def num_valid(window: GradientWindow) -> jnp.ndarray:
  """``min(count, m)``, the rows :func:`solve` uses."""
  return jnp.minimum(window.count, window_length(window))


def ordered(window: GradientWindow) -> Tuple[PyTree, jnp.ndarray]:
  """``(stored gradients oldest first, valid mask (m,))``; for inspection and tests."""
  m = window_length(window)
  full = window.count >= m
  start = jnp.where(full, window.count % m, 0)
  rolled = jax.tree_util.tree_map(lambda s: jnp.roll(s, -start, axis=0), window.grads)
  return rolled, jnp.arange(m) < num_valid(window)


def _window_mask(window: GradientWindow) -> PyTree:
  """True on the stored leaves; False on the frozen leaves' ``(m, 0)`` placeholders."""
  return jax.tree_util.tree_map(lambda s: tuple(s.shape[1:]) != (0,), window.grads)


def factorize(window: GradientWindow, lam, blocks: BlockRule = "per_leaf") -> WindowFactor:
  """The per-block factorisation :func:`solve` needs for this window and λ; build it
  once and pass it to every solve while the window and λ stay the same (an upper
  stage). None when there is nothing to factorise (no included leaf)."""
  mask = _window_mask(window)
  g_leaves = jax.tree_util.tree_leaves(window.grads)
  ids, n_blocks = block_assignment(window.grads, blocks, mask)
  m = window_length(window)
  if n_blocks == 0:
    return None
  return _factorize(g_leaves, ids, n_blocks, m, lam, num_valid(window))


def solve(window: GradientWindow, v: PyTree, lam, blocks: BlockRule = "per_leaf", *,
          factor: Optional[WindowFactor] = None, diagnostics: bool = True
          ) -> Tuple[PyTree, SolveInfo]:
  """:func:`mfac_solve` with the window's valid gradients (frozen leaves: ``x = v``);
  ``factor``: :func:`factorize` of this window, λ and ``blocks`` (else built here)."""
  try:
    jax.tree_util.tree_structure(v).flatten_up_to(window.grads)
  except (ValueError, TypeError) as e:
    raise ValueError(f"solve: v must have the window's parameter structure; {e}") from e
  return mfac_solve(window.grads, v, lam, blocks=blocks, mask=_window_mask(window),
                    num_valid=num_valid(window), factor=factor, diagnostics=diagnostics)


def matvec(window: GradientWindow, lam, blocks: BlockRule = "per_leaf"
           ) -> Callable[[PyTree], PyTree]:
  """``x ↦ (I + F_b/λ) x``, the operator :func:`solve` inverts (for a residual check)."""
  ids, n_blocks = block_assignment(window.grads, blocks, _window_mask(window))
  valid, n_lam = _valid_rows(window_length(window), num_valid(window), lam)

  def apply(x):
    x_leaves, treedef = jax.tree_util.tree_flatten(x)
    g_leaves = treedef.flatten_up_to(window.grads)
    gx = _block_products(g_leaves, x_leaves, ids, n_blocks, len(valid)) * valid
    return jax.tree_util.tree_unflatten(treedef, _apply_rows(g_leaves, x_leaves, ids, gx,
                                                             1.0 / n_lam))
  return apply


def window_bytes(window_or_params: PyTree, m: Optional[int] = None, dtype=jnp.float32,
                 mask: Optional[PyTree] = None) -> int:
  """Bytes of a window: of ``window_or_params`` if it is a :class:`GradientWindow`,
  else of ``init(window_or_params, m, dtype, mask)`` (computed from shapes only)."""
  if isinstance(window_or_params, GradientWindow):
    window = window_or_params
  else:
    if m is None:
      raise ValueError("window_bytes of a parameter tree needs the window length m.")
    window = jax.eval_shape(lambda p: init(p, m, dtype, mask), window_or_params)
  return int(sum(np.prod(x.shape) * jnp.dtype(x.dtype).itemsize
                 for x in jax.tree_util.tree_leaves(window)))


# ---------------------------------------------------------------------------
# The declaration the library reads (``config.bissl.solver='mfac'``).

def _window_init(params_like: PyTree, settings) -> GradientWindow:
  """The empty window; ``settings.mfac_window_length`` and ``settings.mfac_dtype``."""
  return init(params_like, settings.mfac_window_length, dtype=settings.mfac_dtype)


# The hooks below take ``settings.mfac_blocks``; their ``lam`` is λ + δ.
def _window_factor(window: GradientWindow, lam, settings) -> WindowFactor:
  return factorize(window, lam, blocks=settings.mfac_blocks)


def _window_solve(window: GradientWindow, v: PyTree, lam, settings, factor=None,
                  diagnostics: bool = True):
  return solve(window, v, lam, blocks=settings.mfac_blocks, factor=factor,
               diagnostics=diagnostics)


def _window_matvec(window: GradientWindow, lam, settings):
  return matvec(window, lam, blocks=settings.mfac_blocks)


SPEC = SolverSpec(
    name="mfac", needs="gradient_window", solves_head=False,
    operator_products=0, window_init=_window_init, window_push=push,
    window_solve=_window_solve, window_factor=_window_factor, window_matvec=_window_matvec,
    summary="BiSSLight's M-FAC: block-wise Woodbury solve against the empirical Fisher of "
            "the last m pretext gradients; no Hessian-vector product.")
