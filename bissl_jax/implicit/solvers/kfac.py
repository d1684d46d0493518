"""K-FAC implicit gradients: a Kronecker-factored curvature model, inverted exactly.

The Hessian H of the lower problem is replaced by a block-diagonal model with one block
per Dense/Conv layer, ``F_l = A_l ⊗ G_l`` (layer-input and output-gradient second
moments of the pretext loss on the stage's batch, estimated by
:mod:`bissl_jax.implicit.solvers.kfac_capture`; the empirical-Fisher K-FAC of Martens &
Grosse 2015, for convolutions KFC of Grosse & Martens 2016). With a layer's update
written as the matrix ``V`` (kernel rows, plus the bias as one more row), ``F_l`` acts
as ``V ↦ A V G``, and the system the other solvers solve,

    (I + H/μ) x = v,     μ = λ + δ,

becomes per block ``V + A V G / μ``. Both factors are eigendecomposed once per upper
stage, ``A = U_A diag(s_A) U_Aᵀ`` and ``G = U_G diag(s_G) U_Gᵀ``, after which the
inverse is exact in the eigenbasis:

    X = U_A [ (U_Aᵀ V U_G) / (1 + s_A s_Gᵀ / μ) ] U_Gᵀ.

So ``damping`` (δ) enters exactly as for M-FAC and the Krylov solvers: through μ. There
is no separate factored damping of A and G. Eigenvalues below 0 (round-off) count as 0.

**Leaves without a block** (BatchNorm/LayerNorm scales and biases, LoRA adapters, which
are ``self.param`` reads rather than Dense layers, tokens, position embeddings, and any
unregistered layer): the model has no curvature there, ``H ≈ 0``, so ``x = v`` (the
first-order implicit gradient on those leaves; ``(I + 0/μ)⁻¹ = I``). Frozen leaves
(LoRA base weights) are not in the solve space at all, like for every solver.

Cost: one forward/backward pass of the pretext loss and one ``eigh`` of each
``(d_in+1)²`` and ``d_out²`` factor per stage; each solve is then four matrix products
per layer and no Hessian-vector product.
"""
from typing import Callable, List, Optional, Tuple

import jax
import jax.numpy as jnp
from jax import lax

from bissl_jax.implicit.solvers import kfac_capture
from bissl_jax.implicit.solvers.mfac import _info, _unchecked_info
from bissl_jax.implicit.solvers.spec import SolverSpec
from bissl_jax.types import PyTree

_HIGHEST = lax.Precision.HIGHEST


@jax.tree_util.register_pytree_node_class
class KFACFactor:
  """The eigendecomposed factors of every block; a pytree (passes between jitted calls).

  Attributes:
    layers: static, one :class:`~bissl_jax.implicit.solvers.kfac_capture.LayerCall` per
      block (which leaves of the solve space it covers).
    a_vals, a_vecs, g_vals, g_vecs: per block the eigenvalues (clamped at 0) and
      eigenvectors of A and G.
    scales: None for K-FAC; for EK-FAC (:mod:`~bissl_jax.implicit.solvers.ekfac`) per
      block the ``(d_in+1) × d_out`` diagonal of the model in the Kronecker eigenbasis,
      which then replaces ``s_A s_Gᵀ``.
  """

  def __init__(self, layers, a_vals, a_vecs, g_vals, g_vecs, scales=None):
    self.layers = tuple(layers)
    self.a_vals, self.a_vecs = list(a_vals), list(a_vecs)
    self.g_vals, self.g_vecs = list(g_vals), list(g_vecs)
    self.scales = None if scales is None else list(scales)

  def eigenvalues(self, i: int) -> jnp.ndarray:
    """Block i's model eigenvalues on the basis ``U_A[:, j] ⊗ U_G[:, k]``."""
    if self.scales is not None:
      return self.scales[i]
    return self.a_vals[i][:, None] * self.g_vals[i][None, :]

  def tree_flatten(self):
    return (self.a_vals, self.a_vecs, self.g_vals, self.g_vecs, self.scales), self.layers

  @classmethod
  def tree_unflatten(cls, layers, children):
    return cls(layers, *children)


def from_factors(layers, a_factors: List[jnp.ndarray], g_factors: List[jnp.ndarray]
                 ) -> KFACFactor:
  """Eigendecomposes given ``A``, ``G`` (e.g. built by hand) into a :class:`KFACFactor`."""
  def eig(m):
    vals, vecs = jnp.linalg.eigh(jnp.asarray(m, jnp.float32))
    return jnp.maximum(vals, 0.0), vecs
  a = [eig(m) for m in a_factors]
  g = [eig(m) for m in g_factors]
  return KFACFactor(layers, [v for v, _ in a], [u for _, u in a],
                    [v for v, _ in g], [u for _, u in g])


def factorize(loss_fn: Callable[[PyTree], jnp.ndarray], params: PyTree) -> KFACFactor:
  """The K-FAC model of ``loss_fn`` at ``params`` (a mean loss over a batch that runs
  Flax ``Dense``/``Conv`` layers), eigendecomposed. Works under ``jit``."""
  layers, a_factors, g_factors = kfac_capture.kronecker_factors(loss_fn, params)
  return from_factors(layers, a_factors, g_factors)


def _as_matrix(leaves, layer) -> jnp.ndarray:
  """A block's update as the matrix ``V`` (kernel rows ``(kh, kw,) d_in``, then bias)."""
  kernel = leaves[layer.kernel]
  v = kernel.reshape(-1, kernel.shape[-1]).astype(jnp.float32)
  if layer.bias is not None:
    v = jnp.concatenate([v, leaves[layer.bias].reshape(1, -1).astype(jnp.float32)], axis=0)
  return v


def _write_back(out: list, leaves, layer, matrix: jnp.ndarray) -> None:
  kernel = leaves[layer.kernel]
  rows = matrix.shape[0] - (layer.bias is not None)
  out[layer.kernel] = matrix[:rows].reshape(kernel.shape).astype(kernel.dtype)
  if layer.bias is not None:
    bias = leaves[layer.bias]
    out[layer.bias] = matrix[rows].reshape(bias.shape).astype(bias.dtype)


def _mm(a, b):
  return jnp.matmul(a, b, precision=_HIGHEST)


def _check(factor: KFACFactor, leaves) -> None:
  for layer in factor.layers:
    for index in (layer.kernel, layer.bias):
      if index is not None and index >= len(leaves):
        raise ValueError(f"The K-FAC factor covers leaf {index}, but v has only "
                         f"{len(leaves)} leaves: build the factor over v's tree.")


def _apply_blocks(factor: KFACFactor, v: PyTree, scale_fn) -> PyTree:
  """Per block ``U_A [(U_Aᵀ V U_G) · scale_fn(s_A s_Gᵀ)] U_Gᵀ``; other leaves as in v."""
  leaves, treedef = jax.tree_util.tree_flatten(v)
  _check(factor, leaves)
  out = list(leaves)
  for i, layer in enumerate(factor.layers):
    ua, ug = factor.a_vecs[i], factor.g_vecs[i]
    rotated = _mm(_mm(ua.T, _as_matrix(leaves, layer)), ug)
    rotated = rotated * scale_fn(factor.eigenvalues(i))
    _write_back(out, leaves, layer, _mm(_mm(ua, rotated), ug.T))
  return jax.tree_util.tree_unflatten(treedef, out)


def matvec(factor: KFACFactor, mu) -> Callable[[PyTree], PyTree]:
  """``x ↦ (I + F/μ) x`` per block (identity on leaves without one): the model that
  :func:`solve` inverts, for a residual check."""
  mu = jnp.asarray(mu, jnp.float32)
  return lambda x: _apply_blocks(factor, x, lambda s: 1.0 + s / mu)


def solve(factor: KFACFactor, v: PyTree, mu, *, diagnostics: bool = True
          ) -> Tuple[PyTree, object]:
  """``x = (I + F/μ)⁻¹ v`` exactly (``F`` the K-FAC model, ``μ = λ + δ``); ``x = v`` on
  leaves without a block. ``(x, SolveInfo)``: no iterations; with ``diagnostics`` the
  residual and Rayleigh quotient of the model (one more application of it)."""
  mu = jnp.asarray(mu, jnp.float32)
  x = _apply_blocks(factor, v, lambda s: 1.0 / (1.0 + s / mu))
  if not diagnostics:
    return x, _unchecked_info(x)
  return x, _info(v, x, matvec(factor, mu)(x))


# ---------------------------------------------------------------------------
# The declaration the library reads (``config.bissl.solver='kfac'``).

def _curvature_factor(loss_fn, params: PyTree, settings) -> KFACFactor:
  del settings
  return factorize(loss_fn, params)


def _curvature_solve(factor: KFACFactor, v: PyTree, mu, settings, diagnostics: bool = True):
  del settings
  return solve(factor, v, mu, diagnostics=diagnostics)


def _curvature_matvec(factor: KFACFactor, mu, settings):
  del settings
  return matvec(factor, mu)


SPEC = SolverSpec(
    name="kfac", needs="curvature_model", solves_head=False, operator_products=0,
    curvature_factor=_curvature_factor, curvature_solve=_curvature_solve,
    curvature_matvec=_curvature_matvec,
    summary="K-FAC: per-layer Kronecker-factored curvature (Dense, Conv) of the pretext "
            "loss on the stage's batch, eigendecomposed once per stage, inverted exactly "
            "in the eigenbasis; identity on leaves without a block; no Hessian-vector "
            "product.")
