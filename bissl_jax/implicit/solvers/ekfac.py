"""EK-FAC implicit gradients: K-FAC's eigenbasis with the diagonal re-estimated.

EK-FAC (George et al., NeurIPS 2018, "Fast Approximate Natural Gradient Descent in a
Kronecker-factored Eigenbasis") keeps K-FAC's per-layer eigenbasis ``U_A ⊗ U_G``
(:mod:`~bissl_jax.implicit.solvers.kfac`) but replaces its eigenvalues ``s_A s_Gᵀ`` by
the second moment of the per-example gradients in that basis,

    S = mean over examples n of (U_Aᵀ ∇W_n U_G)²,    ∇W_n = Σ_positions ã (N g)ᵀ,

the diagonal of the per-example empirical Fisher ``F_l`` in the Kronecker eigenbasis
(``N·g``: one example's own output gradient of a mean loss, as in K-FAC's ``G``; for a
convolution or a dense layer on tokens ``∇W_n`` sums its positions). That diagonal is
the best one in Frobenius norm for the basis: EK-FAC's block
``(U_A ⊗ U_G) diag(S) (U_A ⊗ U_G)ᵀ`` is at least as close to ``F_l`` as K-FAC's
``A ⊗ G`` (the two agree when ``F_l`` is itself Kronecker). The solve is K-FAC's,

    X = U_A [ (U_Aᵀ V U_G) / (1 + S/μ) ] U_Gᵀ,     μ = λ + δ,

and leaves without a block are ``x = v`` as there.

Cost above K-FAC's, per stage: the rows it captures anyway, rotated into the
eigenbasis, and one ``d_in × d_out`` product per example (about the weight-gradient
work of one backward pass), in chunks of examples so that memory stays at a few
``d_in × d_out`` matrices; per solve the same four matrix products per layer.
"""
from typing import Callable, List

import jax
import jax.numpy as jnp
from jax import lax

from bissl_jax.implicit.solvers import kfac
from bissl_jax.implicit.solvers import kfac_capture
from bissl_jax.implicit.solvers.spec import SolverSpec
from bissl_jax.types import PyTree

_HIGHEST = lax.Precision.HIGHEST
_CHUNK_FLOATS = 2 ** 24   # per-example gradients held at once (64 MiB in float32)


def _sum_of_squared_rotations(a: jnp.ndarray, g: jnp.ndarray, n: int, ua, ug) -> jnp.ndarray:
  """``Σ_n (U_Aᵀ Σ_t ã_nt g_ntᵀ U_G)²`` over the n examples of one call (rows
  example-major: each example's positions are consecutive)."""
  a = jnp.matmul(a, ua, precision=_HIGHEST).reshape(n, -1, ua.shape[1])
  g = jnp.matmul(g, ug, precision=_HIGHEST).reshape(n, -1, ug.shape[1])
  chunk = max(1, min(n, _CHUNK_FLOATS // (a.shape[-1] * g.shape[-1])))
  pad = -n % chunk   # zero examples add zero gradients
  a = jnp.pad(a, ((0, pad), (0, 0), (0, 0))).reshape(-1, chunk, *a.shape[1:])
  g = jnp.pad(g, ((0, pad), (0, 0), (0, 0))).reshape(-1, chunk, *g.shape[1:])

  def body(total, pair):
    per_example = jnp.einsum("nti,ntj->nij", pair[0], pair[1], precision=_HIGHEST)
    return total + jnp.sum(per_example ** 2, axis=0), None
  zero = jnp.zeros((a.shape[-1], g.shape[-1]), jnp.float32)
  return lax.scan(body, zero, (a, g))[0]


def corrected_eigenvalues(calls, rows, factor: kfac.KFACFactor) -> List[jnp.ndarray]:
  """Per block of ``factor`` (layers in its order) EK-FAC's ``S``, from
  :func:`~bissl_jax.implicit.solvers.kfac_capture.captured_rows`'s rows."""
  index = {layer.kernel: i for i, layer in enumerate(factor.layers)}
  sums = [0.0] * len(factor.layers)
  counts = [0] * len(factor.layers)
  for call, (a, g, n) in zip([c for c in calls if c is not None], rows):
    i = index[call.kernel]
    a = kfac_capture.with_bias_column(call, a)
    sums[i] = sums[i] + _sum_of_squared_rotations(a, g, n, factor.a_vecs[i], factor.g_vecs[i])
    counts[i] += n
  # (1/N) Σ_n (N·R_n)² = N Σ_n R_n², N the examples over all calls of the layer.
  return [s * c for s, c in zip(sums, counts)]


def factorize(loss_fn: Callable[[PyTree], jnp.ndarray], params: PyTree) -> kfac.KFACFactor:
  """The EK-FAC model of ``loss_fn`` at ``params`` (a mean loss over a batch that runs
  Flax ``Dense``/``Conv`` layers): one forward/backward pass gives K-FAC's factors and
  the per-example gradients. Works under ``jit``."""
  calls = kfac_capture.discover(loss_fn, params)
  rows = kfac_capture.captured_rows(loss_fn, params, calls)
  layers, a_factors, g_factors = kfac_capture.factors_from_rows(calls, rows)
  factor = kfac.from_factors(layers, a_factors, g_factors)
  return kfac.KFACFactor(factor.layers, factor.a_vals, factor.a_vecs, factor.g_vals,
                         factor.g_vecs, corrected_eigenvalues(calls, rows, factor))


# ---------------------------------------------------------------------------
# The declaration the library reads (``config.bissl.solver='ekfac'``).

def _curvature_factor(loss_fn, params: PyTree, settings) -> kfac.KFACFactor:
  del settings
  return factorize(loss_fn, params)


SPEC = SolverSpec(
    name="ekfac", needs="curvature_model", solves_head=False, operator_products=0,
    curvature_factor=_curvature_factor, curvature_solve=kfac.SPEC.curvature_solve,
    curvature_matvec=kfac.SPEC.curvature_matvec,
    summary="EK-FAC: K-FAC's per-layer eigenbasis (Dense, Conv) with its eigenvalues "
            "re-estimated from the per-example gradients of the stage's batch, inverted "
            "exactly in that basis; identity on leaves without a block; no "
            "Hessian-vector product.")
