"""Cost of each implicit-gradient solver per upper step and per alternation, side by side.

Contenders, all through the library's own per-step pieces
(``train_state.make_alternation_fn`` with the ``'per_step'`` driver), on one model,
one state and the same batches:

* ``layerwise_cg`` (the paper's), ``cg`` and ``minres``, 5 iterations each, on the
  linearized Hessian;
* ``gauss_newton`` + ``cg``: the Gauss–Newton matrix (PSD) instead of the Hessian;
* ``mfac`` (BiSSLight): no Hessian at all; the lower steps keep the last N_L pretext
  gradients and each upper step solves with them by Woodbury.
* ``kfac``, ``ekfac``: no Hessian either; one pretext forward/backward pass on the HVP
  batch per upper stage gives the Kronecker factors (EK-FAC: also the per-example
  gradients), eigendecomposed once; each step is then an exact solve in the eigenbasis.
* ``minres``/``cg`` ``+ mfac``/``+ kfac``: those solvers on the linearized Hessian,
  preconditioned by M-FAC's (I + F/(λ+δ))⁻¹ on the window or K-FAC's on the HVP batch
  (``config.bissl.preconditioner``).
* ``penalty``: the first-order penalty upper step (``config.bissl.upper_method='penalty'``,
  F2SA): no solve; K = ``penalty_inner_steps`` (5) pretext and K + 2 downstream gradients
  per upper step.

Units are pretext gradients (one ``∇_θ L_P`` on the pretext batch, timed in the same
rounds). The M-FAC floor is ``N_L·(lower step) + N_U·2d``, d a downstream gradient:
M-FAC adds no product to either stage. Targets (issue): an M-FAC alternation
≤ 1.05× that floor, and its upper stage ≥ 5× cheaper than the paper's 5-iteration
layer-wise CG. Memory is XLA's compiled memory of one upper step (arguments +
outputs + temporaries − aliases), plus the M-FAC window.

Run: ``python -m bench.solver_cost --small`` (add ``--no-record`` to only print).
"""
import dataclasses
from typing import List, Optional, Sequence

import jax

from bench import alternation_cost
from bench import common
from bissl_jax.core import state as bilevel
from bissl_jax.implicit.solvers import mfac
from bissl_jax.core import alternation as ts

MiB = 2.0 ** 20
MFAC_FLOOR_TARGET = 1.05
MFAC_SPEEDUP_TARGET = 5.0


def solver_setups(base: bilevel.BisslSetup) -> dict:
  """The contenders, as per-step setups."""
  per_step = dataclasses.replace(base, stage_driver="per_step")
  return {
      "layerwise_cg": per_step,
      "cg": dataclasses.replace(per_step, solver="cg"),
      "minres": dataclasses.replace(per_step, solver="minres"),
      "gauss_newton + cg": dataclasses.replace(per_step, solver="cg",
                                               hessian_mode="gauss_newton"),
      "mfac": dataclasses.replace(per_step, solver="mfac"),
      "kfac": dataclasses.replace(per_step, solver="kfac"),
      "ekfac": dataclasses.replace(per_step, solver="ekfac"),
      "minres + mfac": dataclasses.replace(per_step, solver="minres", preconditioner="mfac"),
      "minres + kfac": dataclasses.replace(per_step, solver="minres", preconditioner="kfac"),
      "cg + mfac": dataclasses.replace(per_step, solver="cg", preconditioner="mfac"),
      "cg + kfac": dataclasses.replace(per_step, solver="cg", preconditioner="kfac"),
      "penalty": dataclasses.replace(per_step, upper_method="penalty"),
  }


def solver_contenders(setups: dict, params, batch_stats, batches, rng, contenders: dict):
  """Compiles each setup's per-step pieces and adds its three timed contenders.

  For every ``name, setup``: ``'<name>: lower stage'`` (N_L jitted lower steps),
  ``'<name>: upper stage'`` (the operator build and N_U jitted upper steps, from a
  state whose lower stage has run, so M-FAC's window holds real gradients) and
  ``'<name>: alternation'``, all keyed as ``make_alternation_fn`` keys them.

  Returns:
    ``(memory MiB of each upper step (+ 'mfac window'), compile seconds of each)``.
  """
  lower_rng, upper_rng = jax.random.split(rng)
  memory, compile_s = {}, {}
  for name, setup in setups.items():
    alt = ts.make_alternation_fn(setup)
    state = bilevel.init_bilevel_state(setup, params, batch_stats)
    lower_c, lower_s = common.compile_timed(alt.steps.lower_step, state, batches.pretext[0], rng)
    filled = alternation_cost.lower_stage(lower_c, state, batches.pretext, lower_rng)
    build_c, build_s = common.compile_timed(alt.steps.prepare_stage, filled, batches.hvp, rng)
    operator, lam = build_c(filled, batches.hvp, rng)
    step_c, step_s = common.compile_timed(alt.steps.upper_step, filled, operator, lam,
                                          batches.downstream_images[0],
                                          batches.downstream_labels[0], rng)
    compile_s[name] = lower_s + build_s + step_s
    memory[name] = common.peak_bytes(step_c) / MiB
    if setup.window_spec is not None and setup.solver == "mfac":
      memory["mfac window"] = mfac.window_bytes(filled.solver_state.gradient_window) / MiB
    pieces = {"build": build_c, "step": step_c, "setup": setup,
              "residual": alt.steps.residual}

    def lower(lower_c=lower_c, state=state):
      return alternation_cost.lower_stage(lower_c, state, batches.pretext, lower_rng)

    def upper(pieces=pieces, start=filled):
      return alternation_cost.pieces_upper_stage(pieces, start, batches.hvp,
                                                 batches.downstream_images,
                                                 batches.downstream_labels, upper_rng)
    contenders[f"{name}: lower stage"] = lower
    contenders[f"{name}: upper stage"] = upper
    contenders[f"{name}: alternation"] = lambda lower=lower, upper=upper: upper(start=lower())
  return memory, compile_s


def add_arguments(parser) -> None:
  alternation_cost.add_stage_arguments(parser)
  parser.add_argument("--solvers", default="",
                      help="comma-separated contenders, e.g. 'mfac' (default: every one of "
                           "solver_setups; the notes compare layerwise_cg and mfac).")


def main(argv: Optional[Sequence[str]] = None) -> List[common.Table]:
  """Runs the benchmark; returns (and prints, and records) its table."""
  args = common.parse_args(argv, __doc__, add_arguments,
                           default_repeats={"tiny": 1, "small": 3, "full": 5})
  size, tiny = args.size, args.base_size == "tiny"
  n_lower, n_upper, cg_iters = alternation_cost.stage_sizes(args)
  problem = common.build_problem(size, args.seed)
  base = common.make_setup(problem, solver="layerwise_cg", cg_iters=cg_iters,
                           lower_steps=n_lower, upper_steps=n_upper)
  setups = solver_setups(base)
  if args.solvers:
    by_key = {name.replace(" ", ""): name for name in setups}   # 'minres+mfac' too
    chosen = [by_key.get(name.replace(" ", "")) for name in args.solvers.split(",")]
    if None in chosen:
      raise SystemExit(f"--solvers {args.solvers!r}: choose from {sorted(setups)}.")
    setups = {name: setups[name] for name in chosen}
  batches = alternation_cost.make_batches(size, n_lower, n_upper, args.seed)
  rng = jax.random.PRNGKey(args.seed + 1)

  loss = common.pretext_loss_of_backbone(problem.task)
  views = common.make_views(batches.pretext[0], image_size=size.image_size, seed=args.seed,
                            augmented=not tiny)
  grad_args = (problem.params["backbone"], problem.params["pretext_head"],
               problem.batch_stats, views)
  grad_c, _ = common.compile_timed(jax.jit(jax.grad(loss)), *grad_args)
  p0 = alternation_cost.make_pieces(base)
  state0 = bilevel.init_bilevel_state(base, problem.params, problem.batch_stats)
  down_c, _ = common.compile_timed(p0["downstream"], state0, batches.downstream_images[0],
                                   batches.downstream_labels[0], rng)

  contenders = {"gradient": lambda: grad_c(*grad_args),
                "downstream": lambda: down_c(state0, batches.downstream_images[0],
                                             batches.downstream_labels[0], rng)}
  memory, compile_s = solver_contenders(setups, problem.params, problem.batch_stats,
                                        batches, rng, contenders)
  times = common.interleaved_timings(contenders, args.repeats)
  grad_t = times["gradient"]

  def grads(name):
    return common.paired_ratio(times[name], grad_t)

  rows = []
  for name in setups:
    rows.append([name, grads(f"{name}: upper stage") / n_upper,
                 grads(f"{name}: upper stage"), grads(f"{name}: lower stage"),
                 grads(f"{name}: alternation"), memory[name], compile_s[name]])
  d = grads("downstream") / 2.0
  notes = [
      f"{args.repeats} interleaved rounds after one warm-up round; medians of per-round "
      f"ratios to one pretext gradient ({common.median(grad_t):.4g} s). N_L = {n_lower}, "
      f"N_U = {n_upper}, {cg_iters} iterations; one downstream gradient d = {d:.2f}."]
  if "mfac" in setups:
    mfac_floor_s = times["mfac: lower stage"] + n_upper * times["downstream"]
    floor_ratio = common.paired_ratio(times["mfac: alternation"], mfac_floor_s)
    notes += [
        f"M-FAC alternation / its floor N_L·(lower step) + N_U·2d: {floor_ratio:.2f} "
        f"(target ≤ {MFAC_FLOOR_TARGET}: "
        f"{'met' if floor_ratio <= MFAC_FLOOR_TARGET else 'missed'}).",
        f"M-FAC window ({n_lower} gradients, float32): {memory['mfac window']:.3g} MiB, "
        "included in its upper step's arguments."]
  if "mfac" in setups and "layerwise_cg" in setups:
    speedup = common.paired_ratio(times["layerwise_cg: upper stage"], times["mfac: upper stage"])
    notes.append(f"Upper stage, layerwise_cg / mfac: {speedup:.1f}× (target ≥ "
                 f"{MFAC_SPEEDUP_TARGET}: {'met' if speedup >= MFAC_SPEEDUP_TARGET else 'missed'}).")
  notes.append("Operator solvers spend one more product per step on SolveInfo.residual, "
               "M-FAC two passes over its window: on the config.bissl.residual_every steps.")
  table = common.Table(
      title=f"Implicit-gradient solvers side by side, in pretext gradients — "
            f"{common.describe(size)}",
      columns=["Solver", "per upper step", "upper stage", "lower stage", "alternation",
               "upper-step memory MiB", "compile s"],
      rows=rows, notes=notes)
  return common.finish("solver_cost", [table], args)


if __name__ == "__main__":
  main()
