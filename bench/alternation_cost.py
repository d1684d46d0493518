"""Wall time of one BiSSL alternation in plain pretext steps, with a breakdown (BiSSL paper Algorithm 1).

One alternation is N_L lower steps and one upper stage of N_U steps with
``cg_iters`` solver iterations each (paper: 20, 8, 5). The unit is one plain SimCLR
training step (augment, gradient, clip, LARS) on the same pretext batch, timed in the
same run. The measured alternation is compared with the flop floor

    N_L + N_U·(cg_iters·h + 2·d)   plain steps,

h being the marginal cost of one Hessian-vector product and d that of one downstream
gradient (both measured here, in seconds, then expressed in plain steps). The floor
leaves out the operator build (one pretext gradient per stage), the product that
the residual diagnostic spends on the steps that check it (every
``config.bissl.residual_every``-th; every 4th by default), and the optimizers.
Target: ≤ 1.1× the floor. A second layerwise_cg stage checks the residual on every
step (``residual_every=1``), to measure what checking only some saves.

Two drivers run the upper stage:

* ``library``: ``train_state.upper_stage`` in one jit (the ``'fused'`` stage driver). On
  CPU it unrolls the N_U steps and every CG iteration into one program, whose XLA:CPU
  compile time grows faster than linearly in N_U (``--compile-scaling`` measures it),
  so it is not the default on CPU;
* ``pieces``: the ``'per_step'`` stage driver of ``make_alternation_fn``, the CPU
  default: ``upper_level.prepare_stage`` builds the operator with ``jax.linearize`` in
  its own jit and returns it as a pytree (``jax.tree_util.Partial``), then one jitted
  ``upper_level.upper_step`` per step takes it as an argument: one compile regardless of
  N_U, and the primal work is still shared by every product of the stage. The bench uses
  the library's own jitted pieces. Both drivers give the same result (checked when both
  run, and in tests/core/test_train_state.py).

The breakdown times the parts of an upper step as separately jitted functions, and a
third table compares the 'cg' solver cold and warm-started with the paper's
'layerwise_cg'.

Run: ``python -m bench.alternation_cost --small`` (add ``--no-record`` to only print).
"""
import dataclasses
import functools
from typing import List, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from bench import common
from bissl_jax.core import state as bilevel
from bissl_jax.core import alternation as ts
from bissl_jax.core import upper as upper_level

FLOOR_TARGET = 1.1


def add_stage_arguments(parser) -> None:
  """``--lower-steps``, ``--upper-steps``, ``--cg-iters`` (see :func:`stage_sizes`)."""
  parser.add_argument("--lower-steps", type=int, default=None, help="N_L (default 20).")
  parser.add_argument("--upper-steps", type=int, default=None, help="N_U (default 8).")
  parser.add_argument("--cg-iters", type=int, default=None, help="solver iterations (default 5).")


def stage_sizes(args):
  """``(N_L, N_U, iterations)``: the paper's 20, 8, 5, or 2, 2, 2 at ``--tiny``."""
  tiny = args.base_size == "tiny"
  return (args.lower_steps or (2 if tiny else 20), args.upper_steps or (2 if tiny else 8),
          args.cg_iters or (2 if tiny else 5))


def add_arguments(parser) -> None:
  add_stage_arguments(parser)
  parser.add_argument("--driver", choices=["library", "pieces", "both"], default=None,
                      help="how the upper stage runs (default: pieces on CPU, library "
                           "elsewhere; both at --tiny, which also checks they agree).")
  parser.add_argument("--compile-scaling", default="",
                      help="comma-separated N_U values: instead of the alternation tables, "
                           "compile the library's upper stage for each N_U and report "
                           "compile and run time.")


# ----------------------------------------------------------------------------- pieces

@functools.lru_cache(maxsize=16)
def library_alternation(setup: bilevel.BisslSetup):
  """``train_state.make_alternation_fn(setup)``, cached so that scripts share compilations."""
  return ts.make_alternation_fn(setup)


def per_step_setup(setup: bilevel.BisslSetup) -> bilevel.BisslSetup:
  return dataclasses.replace(setup, stage_driver="per_step")


@functools.lru_cache(maxsize=16)
def make_pieces(setup: bilevel.BisslSetup) -> dict:
  """The library's per-step pieces, plus the parts of an upper step jitted on their own.

  ``build`` and ``step`` are the per-step driver's own jitted functions
  (``upper_level.prepare_stage`` and ``upper_level.upper_step``); ``solve`` and
  ``downstream`` split a step into its implicit solve (``upper_level.implicit_gradient``,
  residual diagnostic included) and its two downstream gradients, for the breakdown.
  """
  alt = library_alternation(per_step_setup(setup))

  def solve(state, operator, lam, b):
    x, info, _ = upper_level.implicit_gradient(setup, state, operator, lam, b)
    return x, info.residual

  def downstream_grads(state, images, labels, rng):
    x = setup.downstream.prepare(rng, images, train=True)
    grad_fn = jax.value_and_grad(functools.partial(upper_level.downstream_loss, setup),
                                 argnums=(0, 1), has_aux=True)
    phi_d = state.upper.params["downstream_head"]
    at_p = grad_fn(state.lower.params["backbone"], phi_d, state.lower.batch_stats["backbone"],
                   x, labels)
    at_d = grad_fn(state.upper.params["backbone"], phi_d, state.upper.batch_stats["backbone"],
                   x, labels)
    return at_p, at_d

  return {"build": alt.steps.prepare_stage, "step": alt.steps.upper_step,
          "solve": jax.jit(solve), "downstream": jax.jit(downstream_grads),
          "lower_step": alt.steps.lower_step, "residual": alt.steps.residual, "setup": setup}


def pieces_upper_stage(pieces, state, hvp_images, images, labels, rng):
  """The per-step driver's upper stage, run by the driver's own loop
  (``ts.run_upper_steps``: one build, one step per batch, deferred residual checks)."""
  steps = ts.StepFunctions(lower_step=pieces.get("lower_step"), prepare_stage=pieces["build"],
                           upper_step=pieces["step"], residual=pieces["residual"])
  hvp_key, keys = ts.upper_keys(rng, images.shape[0])
  state, per_step = ts.run_upper_steps(pieces["setup"], steps, state, hvp_images, images,
                                       labels, hvp_key, keys)
  return state, jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *per_step)


def lower_stage(lower_step, state, pretext, rng):
  """N_L calls of the jitted lower step, keyed as ``make_alternation_fn`` keys them
  (on a copy of ``state``: the step donates its input, as in the driver)."""
  state = ts.copy_state(state)
  for images, key in zip(pretext, ts.lower_keys(rng, pretext.shape[0])):
    state, _ = lower_step(state, images, key)
  return state


# ----------------------------------------------------------------------------- main

def make_batches(size: common.Size, lower_steps: int, upper_steps: int, seed: int
                 ) -> bilevel.AlternationBatches:
  rng = np.random.default_rng(seed)
  pool = common.image_pool(size)
  pretext, _ = common.sample_batch(rng, pool, (lower_steps, size.pretext_batch))
  hvp, _ = common.sample_batch(rng, pool, (size.pretext_batch,))
  down, labels = common.sample_batch(rng, pool, (upper_steps, size.downstream_batch))
  return bilevel.AlternationBatches(pretext=pretext, hvp=hvp, downstream_images=down,
                               downstream_labels=labels)


def max_relative_difference(a, b) -> float:
  """``max_leaf ‖a − b‖ / max(‖b‖, tiny)`` over two pytrees of the same structure."""
  diffs = jax.tree_util.tree_map(
      lambda x, y: float(jnp.linalg.norm(x - y) / jnp.maximum(jnp.linalg.norm(y), 1e-30)), a, b)
  return max(jax.tree_util.tree_leaves(diffs))


def compile_scaling(setup, state, batches, counts: Sequence[int], size: common.Size
                    ) -> common.Table:
  """Compile and run time of the library's jitted upper stage for several N_U."""
  rows = []
  for n in counts:
    s = dataclasses.replace(setup, upper_steps=n)
    stage = jax.jit(functools.partial(ts.upper_stage, s))
    reps = -(-n // batches.downstream_images.shape[0])  # reuse batches when N_U > the given ones
    images = np.concatenate([batches.downstream_images] * reps)[:n]
    labels = np.concatenate([batches.downstream_labels] * reps)[:n]
    args = (state, batches.hvp, images, labels, jax.random.PRNGKey(0))
    compiled, seconds = common.compile_timed(stage, *args)
    common.block(compiled(*args))  # first run: allocation and caches
    run_s = common.median([common.timed(lambda: compiled(*args)) for _ in range(2)])
    checks = sum(bool(s.residual_policy.due(i)) for i in range(n))
    rows.append([f"N_U = {n}", n, n * s.cg_iters + checks, seconds, run_s])
  unrolled = "unrolled (CPU path)" if setup.use_unrolled else "lax.scan"
  return common.Table(
      title=f"Compile time of the library's upper stage vs N_U ({unrolled}, "
            f"{setup.solver}, {setup.cg_iters} iterations) — {common.describe(size)}",
      columns=["N_U", "steps", "operator products", "compile s", "run s"], rows=rows,
      notes=["Operator products count the residual products of the checked steps; 'compile s' is "
             "lowering plus XLA compilation; 'run s' the median of two runs after a first."])


def main(argv: Optional[Sequence[str]] = None) -> List[common.Table]:
  """Runs the benchmark; returns (and prints, and records) its tables."""
  args = common.parse_args(argv, __doc__, add_arguments,
                           default_repeats={"tiny": 1, "small": 3, "full": 5})
  size, tiny = args.size, args.base_size == "tiny"
  n_lower, n_upper, cg_iters = stage_sizes(args)
  driver = args.driver or ("both" if tiny else "pieces" if jax.default_backend() == "cpu"
                           else "library")

  problem = common.build_problem(size, args.seed)
  base = common.make_setup(problem, solver="layerwise_cg", cg_iters=cg_iters,
                           lower_steps=n_lower, upper_steps=n_upper)
  variants = {"layerwise_cg": base,
              "layerwise_cg, residual every step": dataclasses.replace(base, residual_every=1)}
  checks = sum(bool(base.residual_policy.due(i)) for i in range(n_upper))
  if not tiny:  # --tiny is the smoke test, whose limit is compile time
    variants["cg, cold start"] = dataclasses.replace(base, solver="cg", warm_start=False)
    variants["cg, warm start"] = dataclasses.replace(base, solver="cg", warm_start=True)
  state = bilevel.init_bilevel_state(base, problem.params, problem.batch_stats)
  batches = make_batches(size, n_lower, n_upper, args.seed)
  if args.compile_scaling:
    counts = [int(x) for x in args.compile_scaling.split(",") if x.strip()]
    table = compile_scaling(base, state, batches, counts, size)
    return common.finish("alternation_cost", [table], args)
  rng = jax.random.PRNGKey(args.seed + 1)
  lower_rng, upper_rng = jax.random.split(rng)
  pre0, hvp_images = batches.pretext[0], batches.hvp
  down_images, down_labels = batches.downstream_images, batches.downstream_labels

  # ---- compile everything first (compile times are reported, not timed as runs)
  compile_s = {}

  def compiled(name, fn, *fn_args):
    out, compile_s[name] = common.compile_timed(fn, *fn_args)
    return out

  lower_params = common.lower_params_of(problem.params)
  plain = common.make_plain_step(problem)
  plain_opt = plain.init_opt_state(lower_params)
  plain_c = compiled("plain", plain, lower_params, problem.batch_stats, plain_opt, pre0, rng)
  loss = common.pretext_loss_of_backbone(problem.task)
  views = common.make_views(pre0, image_size=size.image_size, seed=args.seed,
                            augmented=not tiny)
  grad_args = (problem.params["backbone"], problem.params["pretext_head"], problem.batch_stats,
               views)
  grad_c = compiled("gradient", jax.jit(jax.grad(loss)), *grad_args)

  pieces = {name: make_pieces(s) for name, s in variants.items()}
  p0 = pieces["layerwise_cg"]
  lower_c = compiled("lower step", p0["lower_step"], state, pre0, rng)
  build_c = compiled("operator build", p0["build"], state, hvp_images, rng)
  hmap, lam = build_c(state, hvp_images, rng)
  v = state.lower.params["backbone"]
  solve_c = compiled("CG solve", p0["solve"], state, hmap, lam, v)
  solve1_c = compiled("CG solve, 1 iteration",
                      make_pieces(dataclasses.replace(base, cg_iters=1))["solve"],
                      state, hmap, lam, v)
  down_c = compiled("downstream gradients", p0["downstream"], state, down_images[0],
                    down_labels[0], rng)
  step_c = {}
  for name in variants:
    step_c[name] = compiled(f"upper step ({name})", pieces[name]["step"], state, hmap, lam,
                            down_images[0], down_labels[0], rng)
  library_stage = None
  if driver in ("library", "both"):
    library_stage = compiled("library upper stage", jax.jit(functools.partial(
        ts.upper_stage, base)), state, hvp_images, down_images, down_labels, upper_rng)

  def pieces_stage(name):
    local = dict(pieces[name], build=build_c, step=step_c[name])
    return lambda: pieces_upper_stage(local, state, hvp_images, down_images, down_labels,
                                      upper_rng)

  def alternation_pieces():
    s = lower_stage(lower_c, state, batches.pretext, lower_rng)
    return pieces_upper_stage(dict(p0, build=build_c, step=step_c["layerwise_cg"]), s,
                              hvp_images, down_images, down_labels, upper_rng)

  def alternation_library():
    s = lower_stage(lower_c, state, batches.pretext, lower_rng)
    return library_stage(s, hvp_images, down_images, down_labels, upper_rng)

  notes = []
  if driver == "both":  # the two drivers must agree before their timings mean anything
    lib_state, _ = alternation_library()
    pcs_state, _ = alternation_pieces()
    diff = max_relative_difference(pcs_state.upper.params, lib_state.upper.params)
    if not diff < 1e-3:
      raise AssertionError(f"The pieces driver's upper stage differs from the library's: "
                           f"max relative difference {diff:.2e} over upper parameters.")
    notes.append(f"Pieces and library drivers agree: max relative difference of the upper "
                 f"parameters after one alternation {diff:.1e}.")

  owned = [ts.copy_state(state)]  # the step donates its state: chain it on a copy

  def upper_step_alone():
    out = step_c["layerwise_cg"](owned[0], hmap, lam, down_images[0], down_labels[0], rng)
    owned[0] = out[0]
    return out[:2]

  contenders = {
      "plain": lambda: plain_c(lower_params, problem.batch_stats, plain_opt, pre0, rng),
      "gradient": lambda: grad_c(*grad_args),
      "lower stage": lambda: lower_stage(lower_c, state, batches.pretext, lower_rng),
      "build": lambda: build_c(state, hvp_images, rng),
      "solve": lambda: solve_c(state, hmap, lam, v),
      "solve1": lambda: solve1_c(state, hmap, lam, v),
      "downstream": lambda: down_c(state, down_images[0], down_labels[0], rng),
      "step": upper_step_alone,
  }
  for name in variants:
    contenders[f"stage: {name}"] = pieces_stage(name)
  if driver in ("pieces", "both"):
    contenders["alternation (pieces)"] = alternation_pieces
  if driver in ("library", "both"):
    contenders["alternation (library)"] = alternation_library
    contenders["stage (library)"] = lambda: library_stage(state, hvp_images, down_images,
                                                          down_labels, upper_rng)
  times = common.interleaved_timings(contenders, args.repeats)
  plain_t = times["plain"]

  def steps(name):
    return common.paired_ratio(times[name], plain_t)

  def med(name):
    return common.median(times[name])
  # Marginal product and downstream gradient, in seconds (per round), then the floor.
  h_s = (times["solve"] - times["solve1"]) / max(cg_iters - 1, 1)
  d_s = times["downstream"] / 2.0
  floor_s = n_lower * plain_t + n_upper * (cg_iters * h_s + 2.0 * d_s)
  measured_name = ("alternation (library)" if driver == "library" else "alternation (pieces)")
  measured = times[measured_name]
  floor_ratio = common.paired_ratio(measured, floor_s)
  # What the floor leaves out but the library does: the stage's operator build (a
  # pretext gradient with stored residuals) and the residual's product on checked steps.
  accounted_s = floor_s + times["build"] + checks * h_s
  accounted_ratio = common.paired_ratio(measured, accounted_s)

  alternation_rows = [
      ["plain SimCLR step: augment, gradient, clip, LARS (the unit)", med("plain"), 1.0],
      ["one gradient of the pretext loss", med("gradient"), steps("gradient")],
      [f"lower stage: {n_lower} lower steps", med("lower stage"), steps("lower stage")],
      [f"upper stage ({n_upper} steps, {cg_iters} iterations, layerwise_cg, pieces driver)",
       med("stage: layerwise_cg"), steps("stage: layerwise_cg")],
      ["the same with the residual checked on every step (residual_every=1)",
       med("stage: layerwise_cg, residual every step"),
       steps("stage: layerwise_cg, residual every step")],
  ]
  if library_stage is not None:
    alternation_rows.append([f"upper stage, library driver (compile "
                             f"{compile_s['library upper stage']:.0f} s)",
                             med("stage (library)"), steps("stage (library)")])
  alternation_rows += [
      [f"one alternation, measured ({measured_name.split('(')[1][:-1]} driver)",
       common.median(measured), steps(measured_name)],
      [f"flop floor N_L + N_U·({cg_iters}·h + 2·d)", common.median(floor_s),
       common.paired_ratio(floor_s, plain_t)],
      ["measured / floor (target ≤ 1.1)", floor_ratio, floor_ratio],
      [f"floor + work outside it: 1 operator build + {checks} residual products",
       common.median(accounted_s), common.paired_ratio(accounted_s, plain_t)],
      ["measured / (floor + work outside it)", accounted_ratio, accounted_ratio],
  ]
  grad_t = times["gradient"]
  h_grads, d_grads = common.paired_ratio(h_s, grad_t), common.paired_ratio(d_s, grad_t)
  notes += [
      f"{args.repeats} interleaved rounds after one warm-up round; medians, and ratios as "
      "medians of per-round ratios. Every call starts from the same state.",
      f"h = {h_grads:.2f} pretext gradients per HVP (marginal, (T(solve, {cg_iters} it.) − "
      f"T(solve, 1 it.))/{max(cg_iters - 1, 1)}); d = {d_grads:.2f} pretext gradients per "
      f"downstream gradient (batch {size.downstream_batch} vs 2×{size.pretext_batch} "
      "pretext views).",
      f"Target measured ≤ {FLOOR_TARGET}× floor: {floor_ratio:.2f}× — "
      f"{'met' if floor_ratio <= FLOOR_TARGET else 'missed'}.",
  ]
  alternation_table = common.Table(
      title=f"One alternation (N_L={n_lower}, N_U={n_upper}, {cg_iters} CG iterations) in "
            f"plain pretext steps — {common.describe(size)}",
      columns=["Measure", "seconds", "plain steps"], rows=alternation_rows, notes=notes)

  # ---- breakdown of the upper stage (layerwise_cg)
  stage_t = times["stage: layerwise_cg"]
  alt_t = times[measured_name]
  rest_s = times["step"] - times["solve"] - times["downstream"]
  products = cg_iters + 1

  def piece(label, calls, compile_name, per_call):
    per_alt = per_call * calls
    return [label, calls, compile_s[compile_name] if compile_name else "–",
            common.median(per_call), common.median(per_alt), common.paired_ratio(per_alt, alt_t)]

  breakdown_rows = [
      piece("lower steps", n_lower, "lower step", times["lower stage"] / n_lower),
      piece("operator build (linearize of the gradient, own jit)", 1, "operator build",
            times["build"]),
      piece(f"CG solve: {cg_iters} products + 1 for SolveInfo.residual", n_upper, "CG solve",
            times["solve"]),
      piece("downstream gradients at θ_P and θ_D (+ augmentation)", n_upper,
            "downstream gradients", times["downstream"]),
      piece("rest of an upper step (clip, SGD, metrics) = step − solve − gradients", n_upper,
            None, rest_s),
      piece("upper step as jitted (pieces driver)", n_upper, "upper step (layerwise_cg)",
            times["step"]),
      piece("upper stage, measured", 1, None, stage_t),
  ]
  breakdown = common.Table(
      title="Breakdown of one alternation (separately jitted pieces, layerwise_cg)",
      columns=["Piece", "calls per alternation", "compile s", "s per call",
               "s per alternation", "share of the alternation"],
      rows=breakdown_rows, signed_rows=[breakdown_rows[4][0]],
      notes=[f"The CG solve spends {products} operator products on a step that checks "
             "the residual ‖Ax − b‖/‖b‖ (one more product) and "
             f"{cg_iters} on the others; the stage checks {checks} of its {n_upper} steps "
             f"(residual_every={base.residual_every}); the timed 'CG solve' always checks."])

  # ---- warm vs cold
  warm_rows = []
  for name, setup in variants.items():
    _, metrics = contenders[f"stage: {name}"]()
    residuals = np.asarray(metrics["cg_residual"])
    residuals = residuals[np.asarray(metrics["residual_checked"])]  # NaN where unchecked
    extra = 1 if setup.warm_start and setup.solver == "cg" else 0
    stage_checks = sum(bool(setup.residual_policy.due(i)) for i in range(n_upper))
    warm_rows.append([name, f"{cg_iters + extra} (+1 on {stage_checks} of {n_upper})",
                      med(f"stage: {name}"), steps(f"stage: {name}"),
                      float(np.mean(residuals)) if residuals.size else "–",
                      float(residuals[-1]) if residuals.size else "–"])
  warm_table = common.Table(
      title="Upper stage: warm-started vs cold 'cg' and the paper's 'layerwise_cg'",
      columns=["Solver", "products per step", "stage seconds", "plain steps",
               "mean CG residual", "last-step CG residual"],
      rows=warm_rows,
      notes=["A warm start costs one extra product (A·x₀) per step at a fixed iteration "
             "count; it pays only if it allows fewer iterations (see cg_accuracy).",
             "Residuals here are at the initial (untrained) state, over the checked "
             "steps (–: none checked); cg_accuracy measures them at a pretrained point."])

  return common.finish("alternation_cost", [alternation_table, breakdown, warm_table], args)


if __name__ == "__main__":
  main()
