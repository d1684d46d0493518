"""How close is each solver's v_IG to the exact implicit gradient? (docs/solvers.md)

On a one-block ResNet small enough for a dense Hessian (≈2,400 backbone
parameters by default), at a point reached by a short SimCLR pretraining and N_L
real BiSSL lower steps (LARS on L_P + λ/2·‖θ − θ_D‖²), the exact implicit gradient
is ``x* = A⁻¹ v`` with ``A = I + H/(λ+δ)``, H the dense Hessian of the pretext loss
on one augmented pretext batch (over θ, φ_P fixed; by default the paper's
λ = 0.001, δ = 10), and ``v = ∇_θ L_D(θ_P, φ_D)`` on one downstream batch. Every
solver's answer is compared with ``x*`` (cosine similarity, relative error, and
the relative residual on the true A, computed in float64 from the dense matrix):

* ``layerwise_cg`` (the paper's), ``cg``, ``minres``, ``neumann`` (``--iters``
  products each) and ``first_order`` (x = v), on the Hessian operator;
* ``gauss_newton+cg``: CG on ``I + G/(λ+δ)`` with the Gauss–Newton matrix G;
* ``mfac``: BiSSLight's ``(I + F/λ')⁻¹ v`` from the pretext gradients of the N_L
  lower steps, per leaf / per layer / global, with λ' = λ+δ (the others' damping)
  and λ' = λ (BiSSLight's own setting, no δ).
* ``cg``/``minres + mfac preconditioner``: those solvers on the true A, preconditioned
  by M-FAC's per-leaf ``(I + F/(λ+δ))⁻¹`` from the same window.
* ``kfac``: ``(I + F_K/(λ+δ))⁻¹ v`` with F_K the K-FAC model (per Conv/Dense layer
  ``A ⊗ G``) of L_P on the HVP batch; ``cg``/``minres + kfac preconditioner``: those
  solvers on the true A, preconditioned by that inverse. ``ekfac``: the same with
  EK-FAC's eigenvalues (per-example gradients in K-FAC's eigenbasis).
* ``penalty``: the first-order penalty method's h = (λ+δ)(θ_P − z)/σ (F2SA,
  ``bissl_jax.core.penalty``) after K steps of the library's z optimizer from z = θ_P,
  with L_P on the HVP batch and L_D on the downstream batch: the default (σ = 1, K = 5)
  and longer runs of z. It approximates x* only where θ_P is a stationary point of
  the lower problem and z's penalised problem has a minimiser near θ_P.

A second table draws ``--residual-batches`` fresh (HVP batch, downstream batch)
pairs at the same point and reports how often each operator solver's residual on
the true A exceeds 1 (worse than x = 0), and how often A showed negative curvature
(CG's smallest Rayleigh quotient, MINRES's smallest Ritz value).

Run: ``python -m bench.solver_accuracy`` (a few minutes on a 2-core CPU),
``--small`` (a 900-parameter backbone, about a minute); ``--no-record`` to only print.
Records go to ``docs/solvers.md``.
"""
import dataclasses
import functools
import os
from typing import Dict, List, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.flatten_util import ravel_pytree

from bench import cg_accuracy
from bench import common
from bissl_jax.tasks import augment
from bissl_jax.core import hessian as hessian_lib
from bissl_jax.core import penalty
from bissl_jax.core.state import PenaltyState
from bissl_jax import implicit
from bissl_jax.implicit.solvers import ekfac
from bissl_jax.implicit.solvers import kfac
from bissl_jax.implicit.solvers import mfac


DOC = os.path.join(common.REPO_ROOT, "docs", "solvers.md")
LAM, DAMPING = 1e-3, 10.0

# Sizes of this benchmark (the dense Hessian bounds the backbone to a few thousand
# parameters): default ≈ 2,400 backbone parameters, --small ≈ 900.
SIZES = {
    "full": common.Size("default", "mini_resnet", 0.125, 16, 16, 16),
    "small": common.Size("small", "mini_resnet", 0.0625, 16, 8, 8),
    "tiny": common.Size("tiny", "mini_resnet", 0.0625, 8, 4, 4),
}
DEFAULTS = {  # (pretrain steps, lower steps = m, dense batches, residual batches)
    "full": (40, 20, 3, 12),
    "small": (30, 10, 2, 8),
    "tiny": (0, 3, 1, 2),
}
OPERATOR_SOLVERS = ("layerwise_cg", "cg", "minres", "neumann")
PRECONDITIONED_SOLVERS = ("cg", "minres")   # with M-FAC's or K-FAC's (I + F/(λ+δ))⁻¹
PENALTY_RUNS = ((1.0, None), (1.0, 200), (0.1, 200))   # (σ, K); None: the config's K


def add_arguments(parser) -> None:
  parser.add_argument("--iters", type=int, default=5, help="solver iterations (paper: 5).")
  parser.add_argument("--lam", type=float, default=LAM, help="λ (paper: 0.001).")
  parser.add_argument("--damping", type=float, default=DAMPING, help="δ (paper: 10).")
  parser.add_argument("--pretrain-steps", type=int, default=None)
  parser.add_argument("--lower-steps", type=int, default=None,
                      help="BiSSL lower steps before measuring = M-FAC window m.")
  parser.add_argument("--lower-lr", type=float, default=0.5, help="LARS learning rate.")
  parser.add_argument("--batches", type=int, default=None,
                      help="(HVP, downstream) batch pairs with a dense reference.")
  parser.add_argument("--residual-batches", type=int, default=None,
                      help="batch pairs for the how-often-is-the-residual-above-1 table.")
  parser.set_defaults(doc=DOC)


def resolve_size(args) -> common.Size:
  base = SIZES[args.base_size]
  overrides = {"arch": args.arch, "width": args.width, "image_size": args.image_size,
               "pretext_batch": args.pretext_batch, "downstream_batch": args.downstream_batch}
  overrides = {k: v for k, v in overrides.items() if v is not None}
  return dataclasses.replace(base, name="custom", **overrides) if overrides else base


# ----------------------------------------------------------------------------- the point

def lower_steps(problem, params, stats, pool, steps: int, lam: float, lr: float, seed: int):
  """BiSSL lower steps from θ_D = θ: LARS on L_P + λ/2‖θ − θ_D‖², as the core runs them.

  Each step's gradient of L_P alone (no proximal term) goes into an M-FAC window,
  exactly what the lower stage keeps for free.
  """
  tx = common.pretext_optimizer(lr)
  size = problem.size.image_size
  theta_d = params["backbone"]

  @jax.jit
  def step(params, stats, opt_state, window, images, rng):
    views = augment.pretext_views(rng, images, size=size)
    (_, aux), grads = jax.value_and_grad(problem.task.loss, has_aux=True)(params, stats, views)
    window = mfac.push(window, grads["backbone"])           # ∇_θ L_P alone
    gap = jax.tree_util.tree_map(lambda a, b: a - b, params["backbone"], theta_d)
    grads = {**grads, "backbone": jax.tree_util.tree_map(lambda g, d: g + lam * d,
                                                         grads["backbone"], gap)}
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), aux["batch_stats"], opt_state, window

  window = mfac.init(params["backbone"], steps)
  opt_state, rng = tx.init(params), np.random.default_rng(seed + 13)
  for i in range(steps):
    images, _ = common.sample_batch(rng, pool, (problem.size.pretext_batch,))
    params, stats, opt_state, window = step(params, stats, opt_state, window, images,
                                            jax.random.PRNGKey(seed * 2000 + i))
  return params, stats, window


def fit_head(problem, backbone, stats, pool, seed, steps=100):
  """A linear downstream head fitted on frozen features."""
  images, labels = common.sample_batch(np.random.default_rng(seed + 5), pool, (128,))
  size = problem.size.image_size
  feats = jax.jit(lambda bb, st, im: problem.model.features(
      bb, st, augment.eval_view(None, im, size=size), train=False)[0])(
          backbone, stats["backbone"], images)
  tx = optax.adam(1e-2)

  @jax.jit
  def step(h, s):
    g = jax.grad(lambda h: optax.softmax_cross_entropy_with_integer_labels(
        problem.downstream.head_outputs(h, feats), labels).mean())(h)
    u, s = tx.update(g, s, h)
    return optax.apply_updates(h, u), s

  head = problem.params["downstream_head"]
  state = tx.init(head)
  for _ in range(steps):
    head, state = step(head, state)
  return head


# ----------------------------------------------------------------------------- one batch

class Batch:
  """Operators and right-hand side of one (HVP batch, downstream batch) pair."""

  def __init__(self, problem, lower, stats, head, pool, rng, key):
    size = problem.size.image_size
    k_views, k_down = jax.random.split(key)
    hvp_images, _ = common.sample_batch(rng, pool, (problem.size.pretext_batch,))
    images, labels = common.sample_batch(rng, pool, (problem.size.downstream_batch,))
    self.views = common.make_views(hvp_images, image_size=size,
                                   seed=int(jax.random.randint(k_views, (), 0, 2**30)))
    self.hessian, self.gn = _operators(problem.task, lower, stats, self.views)
    self.kfac = _kfac_factor(problem.task, lower, stats, self.views, kfac.factorize)
    self.ekfac = _kfac_factor(problem.task, lower, stats, self.views, ekfac.factorize)
    self.downstream = (head, images, labels, k_down)
    self.v = _downstream_grad(problem.downstream, size, lower["backbone"], head, stats["backbone"],
                              images, labels, k_down)


@functools.partial(jax.jit, static_argnums=0)
def _operators(task, lower, stats, views):
  head = lower["pretext_head"]
  loss = lambda theta: task.loss({"backbone": theta, "pretext_head": head}, stats, views)[0]
  hessian = implicit.hessian_operator(loss, lower["backbone"], mode="linearize")
  return hessian, hessian_lib.gauss_newton_hessian(task, lower, stats, views)


@functools.partial(jax.jit, static_argnums=(0, 4))
def _kfac_factor(task, lower, stats, views, factorize):
  """K-FAC's (or EK-FAC's) eigendecomposed model of L_P over θ on the HVP batch (φ_P fixed)."""
  head = lower["pretext_head"]
  loss = lambda theta: task.loss({"backbone": theta, "pretext_head": head}, stats, views)[0]
  return factorize(loss, lower["backbone"])


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3, 4))
def _penalty(task, downstream, size, tx, steps, lower, theta_d, stats, views, down, sigma,
             lam, damping):
  """The penalty method's h after ``steps`` z steps of ``tx`` from z = θ_P."""
  theta_p, phi_p = lower["backbone"], lower["pretext_head"]
  head, images, labels, key = down
  pretext_grad = jax.grad(lambda t: task.loss({"backbone": t, "pretext_head": phi_p}, stats,
                                              views)[0])
  downstream_grad = lambda z: _downstream_grad(downstream, size, z, head, stats["backbone"],
                                               images, labels, key)
  gradient = lambda z: penalty.penalised_gradient(sigma, lam, damping, pretext_grad(z),
                                                  downstream_grad(z), z, theta_d, theta_p)
  start = PenaltyState(theta_p, tx.init(theta_p))
  z = penalty.run_z_steps(tx, start, gradient, steps, unroll=False).z
  return penalty.hypergradient(sigma, lam, damping, theta_p, z)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _downstream_grad(downstream, size, theta, head, stats, images, labels, key):
  x = augment.downstream_train_view(key, images, size=size)

  def loss(theta):
    feats, _ = downstream.model.features(theta, stats, x, train=True)
    return optax.softmax_cross_entropy_with_integer_labels(
        downstream.head_outputs(head, feats), labels).mean()
  return jax.grad(loss)(theta)


@functools.partial(jax.jit, static_argnames=("solver", "iters"))
def _solve(hmap, b, lam, damping, *, solver, iters):
  matvec = implicit.damped_operator(hmap, lam=lam, damping=damping)
  return implicit.solve(matvec, b, solver=solver, maxiter=iters, unroll=True)


def _model_inverse(model, r, lam):
  """``(I + F/lam)⁻¹ r`` of a K-FAC factor, or of an M-FAC window (per leaf)."""
  if isinstance(model, kfac.KFACFactor):
    return kfac.solve(model, r, lam, diagnostics=False)[0]
  return mfac.solve(model, r, lam, "per_leaf")[0]


@functools.partial(jax.jit, static_argnames=("solver", "iters"))
def _solve_preconditioned(hmap, b, model, lam, damping, *, solver, iters):
  """``solver`` on the true A, preconditioned by ``model``'s (I + F/(λ+δ))⁻¹."""
  matvec = implicit.damped_operator(hmap, lam=lam, damping=damping)
  precondition = lambda r: _model_inverse(model, r, lam + damping)
  return implicit.solve(matvec, b, solver=solver, maxiter=iters, unroll=True,
                        preconditioner=precondition)


@functools.partial(jax.jit, static_argnames="blocks")
def _mfac(window, v, lam, *, blocks):
  return mfac.solve(window, v, lam, blocks)


@jax.jit
def _kfac(factor, v, lam):
  return kfac.solve(factor, v, lam)


@jax.jit
def _apply(hmap, x):
  return hmap(x)


@jax.jit
def _apply_columns(hmap, columns, like):
  _, unravel = ravel_pytree(like)
  return jax.vmap(lambda e: ravel_pytree(hmap(unravel(e)))[0])(columns)


def dense_matrix(hmap, like, chunk: int = 64) -> np.ndarray:
  """The n×n matrix of a linear map on pytrees shaped like ``like`` (symmetrised).

  Columns come from vmapped products, ``chunk`` at a time, and are checked against
  single products on random vectors: with jax 0.10.2 on XLA:CPU, vmapping these
  products over 256 columns at once returned wrong columns (errors of ~15% of the
  largest entry), while 8–128 columns matched single products to float32 rounding.
  """
  n = ravel_pytree(like)[0].size
  eye = np.eye(n, dtype=np.float32)
  cols = [np.asarray(_apply_columns(hmap, jnp.asarray(eye[i:i + chunk]), like), np.float64)
          for i in range(0, n, chunk)]
  m = np.concatenate(cols, axis=0).T
  _, unravel = ravel_pytree(like)
  for seed in range(2):
    u = np.random.default_rng(seed).normal(size=n).astype(np.float32)
    single = flat(_apply(hmap, unravel(jnp.asarray(u))))
    err = np.linalg.norm(m @ u - single) / np.linalg.norm(single)
    if not err < 1e-4:
      raise AssertionError(f"The dense matrix disagrees with single products (relative "
                           f"error {err:.2e}); lower the chunk size ({chunk}).")
  return 0.5 * (m + m.T)


def flat(tree) -> np.ndarray:
  return np.asarray(ravel_pytree(tree)[0], np.float64)


def compare(x: np.ndarray, ref: np.ndarray, a: np.ndarray, v: np.ndarray) -> Dict[str, float]:
  return {"cos": float(x @ ref / (np.linalg.norm(x) * np.linalg.norm(ref))),
          "err": float(np.linalg.norm(x - ref) / np.linalg.norm(ref)),
          "res": float(np.linalg.norm(a @ x - v) / np.linalg.norm(v))}


def solver_answers(batch: Batch, window, args) -> Dict[str, tuple]:
  """``{row label: (x, reported residual, operator products per solve)}``."""
  lam, damping, k = args.lam, args.damping, args.iters
  out = {}
  for solver in OPERATOR_SOLVERS:
    x, info = _solve(batch.hessian, batch.v, lam, damping, solver=solver, iters=k)
    out[solver] = (x, float(info.residual), k)
  for name, model in (("mfac", window), ("kfac", batch.kfac), ("ekfac", batch.ekfac)):
    for solver in PRECONDITIONED_SOLVERS:
      x, info = _solve_preconditioned(batch.hessian, batch.v, model, lam, damping,
                                      solver=solver, iters=k)
      out[f"{solver} + {name} preconditioner"] = (x, float(info.residual), k)
  out["first_order"] = (batch.v, float("nan"), 0)
  x, info = _solve(batch.gn, batch.v, lam, damping, solver="cg", iters=k)
  out["gauss_newton+cg"] = (x, float(info.residual), k)
  for blocks in ("per_leaf", "per_layer", "global"):
    x, info = _mfac(window, batch.v, lam + damping, blocks=blocks)
    out[f"mfac {blocks}, λ+δ"] = (x, float(info.residual), 0)
  x, info = _mfac(window, batch.v, lam, blocks="per_leaf")
  out["mfac per_leaf, λ (BiSSLight)"] = (x, float(info.residual), 0)
  for name in ("kfac", "ekfac"):
    x, info = _kfac(getattr(batch, name), batch.v, lam + damping)
    out[f"{name}, λ+δ"] = (x, float(info.residual), 0)
  return out


def penalty_answers(problem, batch: Batch, lower, theta_d, stats, args) -> Dict[str, tuple]:
  """``{row label: (h, NaN, 0)}`` for each (σ, K) of :data:`PENALTY_RUNS`."""
  setup = common.make_setup(problem, upper_method="penalty", lam=args.lam,
                            damping=args.damping)
  tx, out = setup.penalty_optimizer(), {}
  for sigma, steps in PENALTY_RUNS:
    steps = setup.penalty_inner_steps if steps is None else steps
    h = _penalty(problem.task, problem.downstream, problem.size.image_size, tx, steps, lower,
                 theta_d, stats, batch.views, batch.downstream, sigma, args.lam, args.damping)
    out[f"penalty σ={sigma:g}, K={steps}"] = (h, float("nan"), 0)
  return out


# ----------------------------------------------------------------------------- main

def main(argv: Optional[Sequence[str]] = None) -> List[common.Table]:
  """Runs the benchmark; returns (and prints, and records) its tables."""
  args = common.parse_args(argv, __doc__, add_arguments)
  size = args.size = resolve_size(args)
  pre, m, n_dense, n_res = DEFAULTS[args.base_size]
  pre = pre if args.pretrain_steps is None else args.pretrain_steps
  m = m if args.lower_steps is None else args.lower_steps
  n_dense = n_dense if args.batches is None else args.batches
  n_res = n_res if args.residual_batches is None else args.residual_batches

  problem = common.build_problem(size, args.seed)
  pool = common.image_pool(size)
  lower, stats, _, _ = cg_accuracy.pretrain(problem, pool, pre, args.seed)
  theta_d = lower["backbone"]   # the lower steps' proximal anchor
  lower, stats, window = lower_steps(problem, lower, stats, pool, m, args.lam, args.lower_lr,
                                     args.seed)
  head = fit_head(problem, lower["backbone"], stats, pool, args.seed)
  n_params = ravel_pytree(lower["backbone"])[0].size
  rng, key = np.random.default_rng(args.seed + 1), jax.random.PRNGKey(args.seed + 1)

  results: Dict[str, List[Dict[str, float]]] = {}
  products: Dict[str, int] = {}
  eig_min, gn_eig_min, hessian_norm = [], [], []
  for t in range(n_dense):
    batch = Batch(problem, lower, stats, head, pool, rng, jax.random.fold_in(key, t))
    h = dense_matrix(batch.hessian, lower["backbone"])
    g = dense_matrix(batch.gn, lower["backbone"])
    eig = np.linalg.eigvalsh(h)
    eig_min.append(eig[0])
    hessian_norm.append(np.abs(eig).max())
    gn_eig_min.append(np.linalg.eigvalsh(g)[0] / np.linalg.eigvalsh(g)[-1])
    a = np.eye(n_params) + h / (args.lam + args.damping)
    v = flat(batch.v)
    ref = np.linalg.solve(a, v)
    answers = solver_answers(batch, window, args)
    answers.update(penalty_answers(problem, batch, lower, theta_d, stats, args))
    for label, (x, reported, k) in answers.items():
      row = compare(flat(x), ref, a, v)
      row["reported"] = reported
      results.setdefault(label, []).append(row)
      products[label] = k

  med = lambda label, key: common.median([r[key] for r in results[label]])
  rows = []
  for label in results:
    reported = med(label, "reported")
    rows.append([label, products[label], med(label, "cos"), med(label, "err"),
                 med(label, "res"), "–" if np.isnan(reported) else reported])
  accuracy = common.Table(
      title=f"Implicit gradient vs the dense solve x* = A⁻¹v, A = I + H/(λ+δ) (λ={args.lam:g}, "
            f"δ={args.damping:g}, {args.iters} iterations; medians over {n_dense} batch "
            f"pair(s)) — {common.describe(size)}, {n_params} backbone parameters",
      columns=["solver", "HVPs per solve", "cos(x, x*)", "‖x − x*‖/‖x*‖",
               "‖Ax − v‖/‖v‖ (true A)", "reported residual (own system)"],
      rows=rows, signed_rows=[r[0] for r in rows],
      notes=[f"Point: {pre} SimCLR pretraining steps, then {m} BiSSL lower steps (LARS "
             f"{args.lower_lr:g}); M-FAC window m = {m} gradients of L_P from those steps.",
             f"H: smallest eigenvalue {common.median(eig_min):.3g}, largest |eigenvalue| "
             f"{common.median(hessian_norm):.3g} (medians); A is indefinite when the smallest "
             f"eigenvalue is below −(λ+δ) = {-(args.lam + args.damping):.3g}.",
             f"Gauss–Newton G: smallest/largest eigenvalue {common.median(gn_eig_min):.2e} "
             f"(PSD up to rounding).",
             "Reported residual: the solver's own SolveInfo.residual (for gauss_newton+cg on "
             "I + G/(λ+δ), for mfac on I + F/λ'); the column before it is on the true A.",
             "mfac needs no HVP at all (one m×m solve per block from stored gradients).",
             "'+ mfac preconditioner': the solver on the true A, preconditioned by M-FAC's "
             "per-leaf (I + F/(λ+δ))⁻¹ from the same window (no extra HVP).",
             "kfac: (I + F_K/(λ+δ))⁻¹ v exactly, F_K the K-FAC model (A ⊗ G per conv layer, "
             "identity on BatchNorm leaves) of L_P on the HVP batch: one forward/backward "
             "pass and one eigh per factor per stage, no HVP; '+ kfac preconditioner': the "
             "solver on the true A, preconditioned by that inverse; ekfac: the same with "
             "EK-FAC's eigenvalues (per-example gradients in the K-FAC eigenbasis).",
             "penalty σ, K: the F2SA estimate (λ+δ)(θ_P − z)/σ after K z steps (the "
             "library's SGD, lr and momentum of config.bissl) from z = θ_P: K pretext + K "
             "downstream gradients, no HVP (the upper step adds 2 downstream gradients). "
             "Its error includes the lower stage's own residual ∇g(θ_P), amplified by 1/σ."])

  # How often is the residual above 1, over fresh batch pairs (no dense matrices).
  over: Dict[str, List[float]] = {s: [] for s in OPERATOR_SOLVERS + ("gauss_newton+cg",)}
  negative, ritz_negative = [], []
  for t in range(n_res):
    batch = Batch(problem, lower, stats, head, pool, rng, jax.random.fold_in(key, 1000 + t))
    for solver in OPERATOR_SOLVERS:
      _, info = _solve(batch.hessian, batch.v, args.lam, args.damping, solver=solver,
                       iters=args.iters)
      over[solver].append(float(info.residual))
      if solver == "cg":
        negative.append(float(info.min_curvature) < 0)
      if solver == "minres":   # its smallest Ritz value
        ritz_negative.append(float(info.min_curvature) < 0)
    x, _ = _solve(batch.gn, batch.v, args.lam, args.damping, solver="cg", iters=args.iters)
    # Residual of the GN answer on the true A: one more product with H.
    ax = flat(x) + flat(_apply(batch.hessian, x)) / (args.lam + args.damping)
    over["gauss_newton+cg"].append(float(np.linalg.norm(ax - flat(batch.v))
                                         / np.linalg.norm(flat(batch.v))))
  res_rows = [[s, float(np.mean(np.asarray(r) > 1.0)), common.median(r), float(np.max(r))]
              for s, r in over.items()]
  frequency = common.Table(
      title=f"Relative residual ‖Ax − v‖/‖v‖ on the true A after {args.iters} iterations, over "
            f"{n_res} fresh (HVP batch, downstream batch) pairs",
      columns=["solver", "fraction > 1", "median", "max"], rows=res_rows,
      signed_rows=[r[0] for r in res_rows],
      notes=[f"CG saw negative curvature (A indefinite) in {np.mean(negative):.0%} of the "
             "pairs, MINRES's smallest Ritz value was negative in "
             f"{np.mean(ritz_negative):.0%}. A residual above 1 is worse than x = 0."])
  return common.finish("solver_accuracy", [accuracy, frequency], args)


if __name__ == "__main__":
  main()
