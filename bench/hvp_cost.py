"""Cost of one Hessian-vector product of the SimCLR pretext loss, in gradients (docs/benchmarks/hvp_cost.md).

Everything is measured side by side in one run, on one batch and one backbone:

* one gradient ``∇_θ L_P`` (the unit);
* reverse-over-reverse, ``∇_θ ⟨∇_θ L_P, v⟩`` (what the PyTorch reference does);
* forward-over-reverse, ``jvp(grad)``, recomputing the primal per product;
* ``jax.linearize(grad)`` as its own jitted call (returning the linear map, a pytree
  of residuals) and the map applied in separate jitted calls, amortised over N
  products;
* N dependent products unrolled in one jit, jvp each time vs linearize once (inside
  one jit XLA can share the primal work either way);
* the marginal cost of one CG iteration inside a jitted ``implicit_grad`` solve, in
  both Hessian modes (target: ≤ 1.8 gradients).

Every product is chained (``v ← v + 0.01·H v``) so that products cannot be merged.

Run: ``python -m bench.hvp_cost --small`` (add ``--no-record`` to only print).
"""
import functools
from typing import List, Optional, Sequence

import jax
import numpy as np

from bench import common
from bissl_jax import implicit
from bissl_jax.implicit import tree_math

LAM, DAMPING = 1e-3, 10.0
MARGINAL_TARGET = 1.8  # gradients per HVP inside CG (issue "Benchmarks")
MODES = ("linearize", "jvp")  # implicit.HESSIAN_MODES


def _counts(text: str) -> List[int]:
  values = [int(x) for x in text.split(",") if x.strip()]
  if not values or min(values) < 1:
    raise ValueError(f"Counts must be positive integers separated by commas; got {text!r}.")
  return values


def add_arguments(parser) -> None:
  parser.add_argument("--unrolled-counts", default=None,
                      help="N for 'N products unrolled in one jit' (default 1,5; 1,5,40 at "
                           "full size). Compile time grows faster than N on XLA:CPU.")
  parser.add_argument("--amortised-counts", default="1,5,40",
                      help="N for 'linearize once, N products in separate calls'.")
  parser.add_argument("--cg-iters", default=None,
                      help="two CG iteration counts k1,k2; the marginal product cost is "
                           "(T(k2) − T(k1))/(k2 − k1) (default 1,5).")


def build_functions(problem: common.Problem):
  """The jitted contenders, all taking ``(θ, …, φ_P, batch_stats, views)``."""
  loss = common.pretext_loss_of_backbone(problem.task)
  grad_fn = jax.grad(loss)

  def gradient(theta, head, stats, views):
    return grad_fn(theta, head, stats, views)

  def rev_over_rev(theta, v, head, stats, views):
    inner = lambda th: tree_math.tree_vdot(grad_fn(th, head, stats, views), v)
    return common.chained_products(lambda _: jax.grad(inner)(theta), v, 1)

  def jvp_products(theta, v, head, stats, views, *, count):
    matvec = implicit.hessian_operator(lambda th: loss(th, head, stats, views), theta, mode="jvp")
    return common.chained_products(matvec, v, count)

  def linearized_products(theta, v, head, stats, views, *, count):
    matvec = implicit.hessian_operator(lambda th: loss(th, head, stats, views), theta,
                                       mode="linearize")
    return common.chained_products(matvec, v, count)

  def linearize(theta, head, stats, views):
    # jax.linearize returns a jax.tree_util.Partial: its residuals are the outputs.
    return jax.linearize(lambda th: grad_fn(th, head, stats, views), theta)[1]

  def apply_map(hessian_map, v):
    return common.chained_products(hessian_map, v, 1)

  def cg_solve(theta, b, head, stats, views, *, iters, mode):
    x, _ = implicit.implicit_grad(lambda th: loss(th, head, stats, views), theta, b, lam=LAM,
                                  damping=DAMPING, solver="cg", maxiter=iters,
                                  hessian_mode=mode)
    return x

  return dict(gradient=jax.jit(gradient), rev_over_rev=jax.jit(rev_over_rev),
              jvp_products=jvp_products, linearized_products=linearized_products,
              linearize=jax.jit(linearize), apply_map=jax.jit(apply_map), cg_solve=cg_solve)


def random_tangent(theta, seed: int):
  """A unit-norm Gaussian direction shaped like ``θ``."""
  leaves, treedef = jax.tree_util.tree_flatten(theta)
  keys = jax.random.split(jax.random.PRNGKey(seed + 7), len(leaves))
  v = jax.tree_util.tree_unflatten(treedef, [jax.random.normal(k, x.shape, x.dtype)
                                             for k, x in zip(keys, leaves)])
  return tree_math.tree_scale(v, 1.0 / tree_math.tree_norm(v))


def main(argv: Optional[Sequence[str]] = None) -> List[common.Table]:
  """Runs the benchmark; returns (and prints, and records) its table."""
  args = common.parse_args(argv, __doc__, add_arguments)
  size = args.size
  # N = 1 doubles as the "jvp(grad) in its own jit" contender.
  unrolled = sorted({1, *_counts(args.unrolled_counts or (
      "1,5,40" if args.base_size == "full" else "1" if args.base_size == "tiny" else "1,5"))})
  # --tiny (the smoke test) skips the second mode: compile time, not coverage, is its limit.
  modes = MODES[:1] if args.base_size == "tiny" else MODES
  amortised = _counts(args.amortised_counts if args.base_size != "tiny" else "1,2")
  cg_iters = _counts(args.cg_iters or ("1,2" if args.base_size == "tiny" else "1,5"))
  if len(cg_iters) != 2 or cg_iters[0] >= cg_iters[1]:
    raise ValueError(f"--cg-iters needs two increasing counts k1,k2; got {cg_iters}.")

  problem = common.build_problem(size, args.seed)
  images, _ = common.sample_batch(np.random.default_rng(args.seed), common.image_pool(size),
                                  (size.pretext_batch,))
  views = common.make_views(images, image_size=size.image_size, seed=args.seed,
                            augmented=args.base_size != "tiny")
  theta, head = problem.params["backbone"], problem.params["pretext_head"]
  stats = problem.batch_stats
  v = random_tangent(theta, args.seed)
  fns = build_functions(problem)

  compiled, compile_s = {}, {}

  def compile_as(name, fn, *fn_args):
    compiled[name], compile_s[name] = common.compile_timed(fn, *fn_args)

  compile_as("gradient", fns["gradient"], theta, head, stats, views)
  compile_as("rev_over_rev", fns["rev_over_rev"], theta, v, head, stats, views)
  compile_as("linearize", fns["linearize"], theta, head, stats, views)
  hessian_map = compiled["linearize"](theta, head, stats, views)
  compile_as("apply", fns["apply_map"], hessian_map, v)
  for n in unrolled:
    compile_as(f"unrolled_jvp_{n}", jax.jit(functools.partial(fns["jvp_products"], count=n)),
               theta, v, head, stats, views)
    compile_as(f"unrolled_lin_{n}",
               jax.jit(functools.partial(fns["linearized_products"], count=n)),
               theta, v, head, stats, views)
  for mode in modes:
    for k in cg_iters:
      compile_as(f"cg_{mode}_{k}",
                 jax.jit(functools.partial(fns["cg_solve"], iters=k, mode=mode)),
                 theta, v, head, stats, views)

  def amortised_run(n):
    def run():
      hmap = compiled["linearize"](theta, head, stats, views)
      out = v
      for _ in range(n):
        out = compiled["apply"](hmap, out)
      return out
    return run

  contenders = {
      "gradient": lambda: compiled["gradient"](theta, head, stats, views),
      "rev_over_rev": lambda: compiled["rev_over_rev"](theta, v, head, stats, views),
      "linearize": lambda: compiled["linearize"](theta, head, stats, views),
      "apply": lambda: compiled["apply"](hessian_map, v),
  }
  contenders.update({f"amortised_{n}": amortised_run(n) for n in amortised})
  for n in unrolled:
    for kind in ("jvp", "lin"):
      name = f"unrolled_{kind}_{n}"
      contenders[name] = functools.partial(compiled[name], theta, v, head, stats, views)
  for mode in modes:
    for k in cg_iters:
      name = f"cg_{mode}_{k}"
      contenders[name] = functools.partial(compiled[name], theta, v, head, stats, views)

  times = common.interleaved_timings(contenders, args.repeats)
  grad_t = times["gradient"]

  def row(label, name, products, compile_name=None):
    t = times[name]
    return [label, products, compile_s.get(compile_name or name, "–"), common.median(t),
            common.median(t / products), common.paired_ratio(t / products, grad_t)]

  rows = [
      row("one gradient ∇_θ L_P (the unit)", "gradient", 1),
      row("HVP, reverse-over-reverse ∇⟨∇L, v⟩", "rev_over_rev", 1),
      row("HVP, jvp(grad), primal recomputed (own jit)", "unrolled_jvp_1", 1),
      row("linearize(grad) alone, returns the map (own jit)", "linearize", 1),
      row("one product with a built map (own jit)", "apply", 1),
  ]
  for n in amortised:
    rows.append(row(f"linearize once + {n} product(s), separate calls", f"amortised_{n}", n,
                    compile_name="apply"))
  for n in unrolled[1:]:
    rows.append(row(f"{n} product(s) unrolled in one jit, jvp each", f"unrolled_jvp_{n}", n))
    rows.append(row(f"{n} product(s) unrolled in one jit, linearize once", f"unrolled_lin_{n}", n))
  rows.insert(3, row("HVP, linearize + 1 product in one jit", "unrolled_lin_1", 1))

  def marginal(name_lo, name_hi, span):
    per_round = (times[name_hi] - times[name_lo]) / span
    return common.median(per_round), common.paired_ratio(per_round, grad_t)

  k1, k2 = cg_iters
  signed, cg_ratio = [], {}
  for mode in modes:
    cg_s, cg_ratio[mode] = marginal(f"cg_{mode}_{k1}", f"cg_{mode}_{k2}", k2 - k1)
    signed.append(f"marginal HVP inside CG ((T(k={k2}) − T(k={k1}))/{k2 - k1}, one jit, "
                  f"hessian_mode='{mode}')")
    rows.append([signed[-1], 1, compile_s[f"cg_{mode}_{k2}"], cg_s, cg_s, cg_ratio[mode]])
  if len(unrolled) >= 2:
    n1, n2 = unrolled[0], unrolled[-1]
    for kind, label in (("jvp", "jvp each"), ("lin", "linearize once")):
      s, ratio = marginal(f"unrolled_{kind}_{n1}", f"unrolled_{kind}_{n2}", n2 - n1)
      signed.append(f"marginal product unrolled in one jit, {label} "
                    f"((T({n2}) − T({n1}))/{n2 - n1})")
      rows.append([signed[-1], 1, "–", s, s, ratio])

  verdict = lambda r: "met" if r <= MARGINAL_TARGET else "missed"
  notes = [
      f"{args.repeats} interleaved rounds after one warm-up round; 'gradients per product' "
      "is the median over rounds of (time / products) / (gradient time in the same round).",
      f"Target: marginal HVP inside CG ≤ {MARGINAL_TARGET} gradients — measured " + ", ".join(
          f"{cg_ratio[m]:.2f} with hessian_mode='{m}' ({verdict(cg_ratio[m])})"
          for m in modes) + " ('linearize' is the library default).",
      "Marginal rows are differences of two timings and can be noisy (signed).",
  ]
  table = common.Table(
      title=f"HVP cost in gradients — {common.describe(size)}",
      columns=["Measure", "products", "compile s", "seconds", "s per product",
               "gradients per product"],
      rows=rows, notes=notes, signed_rows=signed)
  return common.finish("hvp_cost", [table], args)


if __name__ == "__main__":
  main()
