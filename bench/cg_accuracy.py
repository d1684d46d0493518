"""How well do 1–20 solver iterations solve BiSSL's system, cold and warm-started? (docs/implicit_grad.md)

At a briefly pretrained point (a few dozen SimCLR steps on the digits), with the
Hessian H of the pretext loss on one augmented pretext batch and φ_P fixed, the
system is ``A x = b`` with ``A = I + H/(λ + δ)`` (by default the paper's λ = 0.001,
δ = 10) and ``b = v = ∇_θ L_D(θ_P, φ_D)`` on consecutive downstream batches.
Reported, per iteration count:

* the relative residual ``‖A x − b‖/‖b‖`` (recomputed with the true operator) of
  'cg' and 'layerwise_cg' started at zero;
* 'cg' warm-started from the previous downstream batch's solution (each chain runs
  the same iteration count at every step, as BiSSL's ``warm_start`` does; the first
  step of a chain starts cold and is not counted). 'layerwise_cg' always starts at
  zero (the layer-wise CG of the reference code, docs/implicit_grad.md);
* ``‖x − x*‖/‖x*‖`` against the most accurate solution found (cold 'cg' after the
  largest iteration count).

Iterates are produced by a Python loop over a jitted operator (one compile for every
iteration count); the loop is checked against the library's ``solvers.cg.cg`` and
``solvers.layerwise_cg.layerwise_cg`` at ``--check-iters`` iterations.

Run: ``python -m bench.cg_accuracy --small`` (add ``--no-record`` to only print).
"""
import functools
from typing import Dict, List, Optional, Sequence

import jax
import numpy as np
import optax

from bench import common
from bissl_jax.tasks import augment
from bissl_jax import implicit
from bissl_jax.core import optim
from bissl_jax.implicit import solvers
from bissl_jax.core import upper as upper_level
from bissl_jax.implicit import tree_math as tm

LAM, DAMPING = 1e-3, 10.0  # the paper's λ and δ (defaults of --lam and --damping)


def add_arguments(parser) -> None:
  parser.add_argument("--pretrain-steps", type=int, default=None,
                      help="SimCLR steps before measuring (default 40; 0 at --tiny).")
  parser.add_argument("--max-iters", type=int, default=None, help="default 20 (3 at --tiny).")
  parser.add_argument("--batches", type=int, default=None,
                      help="consecutive downstream batches (default 6; 2 at --tiny).")
  parser.add_argument("--warm-iters", default=None,
                      help="iteration counts of the warm-started chains (default 1,2,3,5).")
  parser.add_argument("--lam", type=float, default=LAM, help="λ (paper: 0.001).")
  parser.add_argument("--damping", type=float, default=DAMPING, help="δ (paper: 10).")
  parser.add_argument("--check-iters", type=int, default=None,
                      help="iterations at which the loop is checked against the library "
                           "solvers (default 5; 2 at --tiny).")


# ----------------------------------------------------------------------------- the system

def pretrain(problem: common.Problem, pool: common.ImagePool, steps: int, seed: int):
  """A few SimCLR steps (Adam 1e-3, clipped) from the initial point.

  Returns:
    ``(lower_params, batch_stats, first_loss, last_loss)``.
  """
  tx = optax.chain(optax.clip_by_global_norm(optim.GRAD_CLIP_NORM), optax.adam(1e-3))
  size = problem.size.image_size

  @jax.jit
  def step(params, stats, opt_state, images, rng):
    views = augment.pretext_views(rng, images, size=size)
    (loss, aux), grads = jax.value_and_grad(problem.task.loss, has_aux=True)(params, stats, views)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), aux["batch_stats"], opt_state, loss

  params, stats = common.lower_params_of(problem.params), problem.batch_stats
  opt_state = tx.init(params)
  rng = np.random.default_rng(seed + 11)
  losses = []
  for i in range(steps):
    images, _ = common.sample_batch(rng, pool, (problem.size.pretext_batch,))
    params, stats, opt_state, loss = step(params, stats, opt_state, images,
                                          jax.random.PRNGKey(seed * 1000 + i))
    losses.append(float(loss))
  return params, stats, (losses[0] if losses else float("nan")), (losses[-1] if losses else
                                                                  float("nan"))


def fit_head(problem, backbone, stats, pool, seed, steps=200):
  """A linear downstream head fitted on frozen features (a short head warm-up)."""
  images, labels = common.sample_batch(np.random.default_rng(seed + 5), pool, (256,))
  size = problem.size.image_size
  feats = jax.jit(lambda bb, st, im: problem.model.features(
      bb, st, augment.eval_view(None, im, size=size), train=False)[0])(
          backbone, stats["backbone"], images)
  tx = optax.adam(1e-2)
  head = problem.params["downstream_head"]

  def loss_fn(h):
    logits = problem.downstream.head_outputs(h, feats)
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

  @jax.jit
  def step(h, s):
    g = jax.grad(loss_fn)(h)
    u, s = tx.update(g, s, h)
    return optax.apply_updates(h, u), s

  state = tx.init(head)
  for _ in range(steps):
    head, state = step(head, state)
  return head


class System:
  """``A = I + H/(λ+δ)`` at θ_P as jitted pieces; products are ``apply(x)``."""

  def __init__(self, problem, lower_params, stats, hvp_images, seed, *, lam=LAM,
               damping=DAMPING, augmented=True):
    size = problem.size.image_size
    views = common.make_views(hvp_images, image_size=size, seed=seed + 3, augmented=augmented)
    loss = common.pretext_loss_of_backbone(problem.task)
    head = lower_params["pretext_head"]

    @jax.jit
    def linearize(theta, head, stats, views):
      return jax.linearize(jax.grad(lambda th: loss(th, head, stats, views)), theta)[1]

    self.hessian = linearize(lower_params["backbone"], head, stats, views)
    self._apply = jax.jit(lambda hmap, x: implicit.damped_operator(hmap, lam=lam,
                                                                   damping=damping)(x))
    self._solve = jax.jit(
        lambda hmap, b, init, *, solver, iters: implicit.solve(
            implicit.damped_operator(hmap, lam=lam, damping=damping), b, solver=solver,
            maxiter=iters, init=init, unroll=True),
        static_argnames=("solver", "iters"))

  def apply(self, x):
    return self._apply(self.hessian, x)

  def library_solve(self, b, *, solver, iters, init=None):
    return self._solve(self.hessian, b, init, solver=solver, iters=iters)


@jax.jit
def _relative_residual(ax, b):
  return tm.tree_norm(tm.tree_sub(ax, b)) / tm.tree_norm(b)


@jax.jit
def _cg_update(x, r, p, rs, ap):
  alpha = rs / tm.tree_vdot(p, ap)
  x, r = tm.tree_axpy(alpha, p, x), tm.tree_axpy(-alpha, ap, r)
  rs_new = tm.tree_vdot(r, r)
  return x, r, tm.tree_axpy(rs_new / rs, p, r), rs_new


@jax.jit
def _layerwise_update(x, r, p, ap):
  # Same formulas and 1e-12 as solvers.layerwise_cg.layerwise_cg, leaf by leaf.
  eps = solvers.layerwise_cg.LAYERWISE_EPS
  rs = tm.tree_leaf_vdots(r, r)
  alpha = jax.tree_util.tree_map(lambda a, b: a / (b + eps), rs, tm.tree_leaf_vdots(p, ap))
  x = jax.tree_util.tree_map(lambda a, p_, x_: x_ + a * p_, alpha, p, x)
  r_new = jax.tree_util.tree_map(lambda a, q, r_: r_ - a * q, alpha, ap, r)
  beta = jax.tree_util.tree_map(lambda a, b: a / (b + eps), tm.tree_leaf_vdots(r_new, r_new), rs)
  p = jax.tree_util.tree_map(lambda bt, p_, r_: r_ + bt * p_, beta, p, r_new)
  return x, r_new, p


def iterate(system: System, b, iters: int, *, solver: str, init=None):
  """Runs ``iters`` iterations.

  Returns:
    ``(iterates x_1..x_iters, their relative residuals, the Rayleigh quotients
    pᵀAp/pᵀp of the directions the operator was applied to)``.
  """
  x = tm.tree_zeros_like(b) if init is None else init
  r = b if init is None else tm.tree_sub(b, system.apply(init))
  p, rs = r, tm.tree_vdot(r, r)
  xs, residuals, rayleigh = [], [], []
  for _ in range(iters):
    ap = system.apply(p)
    rayleigh.append(float(_rayleigh(p, ap)))
    if solver == "cg":
      x, r, p, rs = _cg_update(x, r, p, rs, ap)
    else:
      x, r, p = _layerwise_update(x, r, p, ap)
    xs.append(x)
    residuals.append(float(_relative_residual(system.apply(x), b)))
  return xs, residuals, rayleigh


@jax.jit
def _rayleigh(p, ap):
  return tm.tree_vdot(p, ap) / tm.tree_vdot(p, p)


@jax.jit
def _relative_error(x, ref):
  return tm.tree_norm(tm.tree_sub(x, ref)) / tm.tree_norm(ref)


@jax.jit
def _cosine(a, b):
  return tm.tree_vdot(a, b) / (tm.tree_norm(a) * tm.tree_norm(b))


# ----------------------------------------------------------------------------- main

def main(argv: Optional[Sequence[str]] = None) -> List[common.Table]:
  """Runs the benchmark; returns (and prints, and records) its tables."""
  args = common.parse_args(argv, __doc__, add_arguments)
  size, tiny = args.size, args.base_size == "tiny"
  pretrain_steps = args.pretrain_steps if args.pretrain_steps is not None else (0 if tiny else 40)
  max_iters = args.max_iters or (4 if tiny else 20)
  n_batches = args.batches or (2 if tiny else 6)
  warm_iters = [int(k) for k in (args.warm_iters or ("1,2" if tiny else "1,2,3,5")).split(",")]
  check_iters = args.check_iters or (2 if tiny else 5)
  if n_batches < 2 or max(warm_iters + [check_iters]) > max_iters:
    raise ValueError("Need --batches >= 2 and --warm-iters/--check-iters <= --max-iters.")

  problem = common.build_problem(size, args.seed)
  pool = common.image_pool(size)
  lower_params, stats, loss0, loss1 = pretrain(problem, pool, pretrain_steps, args.seed)
  # --tiny (the smoke test, limited by compile time) keeps the initial head.
  head = (problem.params["downstream_head"] if tiny else
          fit_head(problem, lower_params["backbone"], stats, pool, args.seed))
  rng = np.random.default_rng(args.seed + 1)
  hvp_images, _ = common.sample_batch(rng, pool, (size.pretext_batch,))
  system = System(problem, lower_params, stats, hvp_images, args.seed, lam=args.lam,
                  damping=args.damping, augmented=not tiny)

  setup = common.make_setup(problem)

  @jax.jit
  def downstream_v(images, labels, key):
    x = setup.downstream.prepare(key, images, train=True)
    return jax.grad(functools.partial(upper_level.downstream_loss, setup), has_aux=True)(
        lower_params["backbone"], head, stats["backbone"], x, labels)[0]

  rhs = []
  for t in range(n_batches):
    images, labels = common.sample_batch(rng, pool, (size.downstream_batch,))
    rhs.append(downstream_v(images, labels, jax.random.PRNGKey(args.seed * 100 + t)))

  # Cold runs: every iterate of one run gives every iteration count.
  cold: Dict[str, list] = {"cg": [], "layerwise_cg": []}
  cold_x: Dict[str, list] = {"cg": [], "layerwise_cg": []}
  min_rayleigh: Dict[str, float] = {"cg": np.inf, "layerwise_cg": np.inf}
  for b in rhs:
    for solver in cold:
      xs, res, rayleigh = iterate(system, b, max_iters, solver=solver)
      cold[solver].append(res)
      cold_x[solver].append(xs)
      min_rayleigh[solver] = min(min_rayleigh[solver], min(rayleigh))
  first_order = [float(_relative_residual(system.apply(b), b)) for b in rhs]

  # Check the loop against the library's solvers (same iterates up to float32 rounding).
  checks = []
  for solver in cold:
    x_lib, info = system.library_solve(rhs[0], solver=solver, iters=check_iters)
    err = float(_relative_error(cold_x[solver][0][check_iters - 1], x_lib))
    if not err < 1e-2:
      raise AssertionError(f"The benchmark's {solver} loop differs from solvers.{solver} at "
                           f"{check_iters} iterations: relative difference {err:.2e}.")
    checks.append(f"{solver}: loop vs library {err:.1e}, library residual "
                  f"{float(info.residual):.3g} vs loop {cold[solver][0][check_iters - 1]:.3g}, "
                  f"library's smallest Rayleigh quotient {float(info.min_curvature):.3g}")

  # Warm chains: each chain runs k iterations per batch from the previous solution.
  warm: Dict[int, list] = {}
  warm_first: Dict[int, tuple] = {}  # k -> (init, solution) of the chain's second step
  for k in warm_iters:
    x_prev, res_k = None, []
    for t, b in enumerate(rhs):
      xs, res, _ = iterate(system, b, k, solver="cg", init=x_prev)
      if t == 1:
        warm_first[k] = (x_prev, xs[-1])
      if t > 0:
        res_k.append(res[-1])
      x_prev = xs[-1]
    warm[k] = res_k
  k_check = warm_iters[0]
  init, x_loop = warm_first[k_check]
  x_lib, info_warm = system.library_solve(rhs[1], solver="cg", iters=k_check, init=init)
  err = float(_relative_error(x_loop, x_lib))
  if not err < 1e-2:
    raise AssertionError(f"The benchmark's warm-started cg differs from solvers.cg.cg(init=...) "
                         f"at {k_check} iterations: relative difference {err:.2e}.")
  checks.append(f"warm cg at k={k_check}: loop vs library {err:.1e}, library residual "
                f"{float(info_warm.residual):.3g} vs loop {warm[k_check][0]:.3g}")
  refs = [xs[-1] for xs in cold_x["cg"]]
  rel_err = {s: [[float(_relative_error(xs[k], ref)) for k in range(max_iters)]
                 for xs, ref in zip(cold_x[s], refs)] for s in cold}
  med = lambda values: common.median(values)

  shown = [k for k in (1, 2, 3, 4, 5, 7, 10, 15, 20, 30, 40) if k <= max_iters]
  if max_iters not in shown:
    shown.append(max_iters)
  first_order_err = [float(_relative_error(b, ref)) for b, ref in zip(rhs, refs)]
  rows = [["0 (x = v, first order)", med(first_order), "–", med(first_order),
           med(first_order_err), med(first_order_err)]]
  for k in shown:
    rows.append([str(k), med([r[k - 1] for r in cold["cg"]]),
                 med(warm[k]) if k in warm else "–",
                 med([r[k - 1] for r in cold["layerwise_cg"]]),
                 med([e[k - 1] for e in rel_err["cg"]]) if k < max_iters else "(reference)",
                 med([e[k - 1] for e in rel_err["layerwise_cg"]])])
  b_cos = [float(_cosine(rhs[t], rhs[t - 1])) for t in range(1, n_batches)]
  sol_cos = [float(_cosine(refs[t], refs[t - 1])) for t in range(1, n_batches)]
  residual_table = common.Table(
      title=f"Relative residual ‖Ax − b‖/‖b‖ after k iterations (λ={args.lam:g}, "
            f"δ={args.damping:g}; "
            f"medians over {n_batches} downstream batches, warm: over {n_batches - 1}) — "
            f"{common.describe(size)}",
      columns=["k", "cg, cold", "cg, warm", "layerwise_cg (always cold)",
               "cg cold: ‖x − x*‖/‖x*‖", "layerwise: ‖x − x*‖/‖x*‖"],
      rows=rows,
      notes=[f"Pretrained {pretrain_steps} SimCLR steps (Adam 1e-3): loss {loss0:.3f} → "
             f"{loss1:.3f}; linear head "
             f"{'at its initialisation' if tiny else 'fitted on frozen features'}; "
             "b = ∇_θ L_D(θ_P, φ_D) per downstream batch; H on one pretext batch (φ_P fixed, "
             "batch statistics).",
             f"x* = cold cg after {max_iters} iterations (residual "
             f"{med([r[-1] for r in cold['cg']]):.2e}).",
             f"Consecutive right-hand sides: cosine(b_t, b_t−1) median {med(b_cos):.3f}; "
             f"cosine(x*_t, x*_t−1) {med(sol_cos):.3f}.",
             "Checks against the library solvers: " + "; ".join(checks) + "."])

  # Answers.
  k5 = min(5, max_iters - 1)  # x* is the last iterate, so compare an earlier one
  cold5 = med([r[k5 - 1] for r in cold["cg"]])
  lw5 = med([r[k5 - 1] for r in cold["layerwise_cg"]])
  matching = [k for k in sorted(warm) if med(warm[k]) <= cold5]
  smallest = matching[0] if matching else None
  answers = [
      [f"cg residual after {k5} cold iterations", cold5],
      [f"layerwise_cg residual after {k5} iterations", lw5],
      [f"cg: ‖x_{k5} − x*‖/‖x*‖", med([e[k5 - 1] for e in rel_err["cg"]])],
      [f"layerwise_cg: ‖x_{k5} − x*‖/‖x*‖",
       med([e[k5 - 1] for e in rel_err["layerwise_cg"]])],
      ["first order (x = v): ‖x − x*‖/‖x*‖", med(first_order_err)],
  ]
  if smallest is not None:
    answers.append([f"smallest warm-started k with residual ≤ cold {k5}", smallest])
  signed = []
  for solver in cold:
    signed.append(f"smallest Rayleigh quotient pᵀAp/pᵀp over {solver}'s directions")
    answers.append([signed[-1], min_rayleigh[solver]])
  better = "cg" if cold5 < lw5 else "layerwise_cg"
  indefinite = min(min_rayleigh.values()) < 0
  answer_notes = [
      "A residual above 1 is worse than x = 0. A negative Rayleigh quotient proves A "
      "indefinite (H has eigenvalues below −(λ+δ)); CG then has no convergence guarantee."
      + (" It is negative here." if indefinite else ""),
      f"Better solver at {k5} iterations (lower residual): {better}.",
      (f"Smallest warm-started iteration count matching {k5} cold iterations: "
       f"{smallest} (products per step {smallest + 1} incl. A·x₀, vs {k5} cold)."
       if smallest is not None else
       f"No warm-started count in {sorted(warm)} matches {k5} cold iterations."),
  ]
  if cold5 >= 1.0:
    answer_notes.append(f"Neither solver reaches a residual below 1 (that of x = 0) in {k5} "
                        f"iterations at this point, so {k5} iterations buy no accuracy here and "
                        "the warm-vs-cold comparison is between two non-solutions.")
  summary = common.Table(title="Answers", columns=["Question", "value"], rows=answers,
                         notes=answer_notes, signed_rows=signed)
  return common.finish("cg_accuracy", [residual_table, summary], args)


if __name__ == "__main__":
  main()
