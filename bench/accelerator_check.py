"""The accelerator check: one command that measures what a GPU or TPU gives (docs/scale.md).

Given one accelerator, at the paper's size (ResNet-50, 96 px, pretext batch 2×1024,
downstream batch 256, N_L = 20, N_U = 8, 5 layer-wise CG iterations), in this order:

1. **One alternation with each driver**: the fused one (``stage_driver='fused'``, one
   program) and the per-step one, timed side by side in plain pretext steps (one
   SimCLR step: augment, gradient, clip, LARS), with the **M-FAC upper stage against
   layer-wise CG's** (BiSSLight's solver: no Hessian-vector product).
2. **Peak memory against the plan**: the allocator's running peak
   (``device.memory_stats()['peak_bytes_in_use']``) after those runs, against the
   largest compiled program's arguments + outputs + temporaries − aliases (XLA's
   memory analysis: the figure bench/paper_plan.py plans with). Read before step 4,
   whose large batches would set the peak.
3. **The Hessian-vector product in gradients**: the marginal product inside the
   5-iteration CG solve ((T(5) − T(1)) / 4, hessian_mode='linearize') over one
   pretext gradient.
4. **Pretext-step throughput** (images per second, each image giving two views) in
   float32 and in bfloat16 (``config.model.dtype``: bfloat16 compute, float32
   parameters, statistics and optimizer state), each at the largest batch that fits:
   the compiled memory of two probe batches gives a line, the batch under 90 % of the
   device's memory (a power of two, at most ``--max-batch``) is compiled and run, and
   halved while the device runs out of memory.

Every step checks the time budget (``--budget-s``, 8 minutes) and is recorded as
skipped when it would not fit. The tables go to docs/benchmarks/runs/accelerator_check.md
with the device, JAX version, command and date (``--no-record`` only prints).

Run, after the README's install, on the machine with the accelerator:
``python -m bench.accelerator_check``. ``--small`` (ResNet-18 ×1/4, 32 px) and
``--tiny`` (one block, 16 px: the test suite's CPU run) are for trying it.
"""
import dataclasses
import functools
import time
from typing import List, Optional, Sequence

import jax
import numpy as np

from bench import alternation_cost
from bench import common
from bench import hvp_cost
from bench import memory
from bench import paper_plan
from bench import solver_cost
from bissl_jax.core import alternation as ts
from bissl_jax.core import state as bilevel

MiB = 2.0 ** 20
BUDGET_S = 480.0
PROBE_BATCHES = {"tiny": 2, "small": 16, "full": 64}
MAX_BATCH = {"tiny": 8, "small": 256, "full": 4096}


def add_arguments(parser) -> None:
  alternation_cost.add_stage_arguments(parser)
  parser.add_argument("--budget-s", type=float, default=BUDGET_S,
                      help="stop starting new measurements after this many seconds.")
  parser.add_argument("--max-batch", type=int, default=None,
                      help="largest pretext batch tried for throughput (default 4096).")


def build_problem(size: common.Size, dtype: str, seed: int) -> common.Problem:
  """The model as a run config with ``config.model.dtype = dtype`` builds it, initialised
  (float32: the other benchmarks' problem, whose compiled programs it shares)."""
  if dtype == "float32":
    return common.build_problem(size, seed)
  setup = paper_plan.build_setup(size, dtype, 1, 1, 1)
  return common.init_problem(size, setup.model, setup.task, seed)


class Budget:
  """The time left; a step that would not fit is named in ``skipped``."""

  def __init__(self, seconds: float):
    self.deadline = time.perf_counter() + seconds
    self.skipped: List[str] = []

  def allows(self, what: str) -> bool:
    if time.perf_counter() < self.deadline:
      return True
    self.skipped.append(what)
    print(f"  skipped (time budget): {what}", flush=True)
    return False


def alternation_tables(problem, size, args, budget: Budget):
  """Steps 1 and 2: both drivers, M-FAC against layer-wise CG, peak against plan."""
  n_lower, n_upper, cg_iters = alternation_cost.stage_sizes(args)
  base = common.make_setup(problem, solver="layerwise_cg", cg_iters=cg_iters,
                           lower_steps=n_lower, upper_steps=n_upper)
  batches = alternation_cost.make_batches(size, n_lower, n_upper, args.seed)
  rng = jax.random.PRNGKey(args.seed + 1)
  state = bilevel.init_bilevel_state(base, problem.params, problem.batch_stats)
  plain = common.make_plain_step(problem)
  lower_params = common.lower_params_of(problem.params)
  plain_args = (lower_params, problem.batch_stats, plain.init_opt_state(lower_params),
                batches.pretext[0], rng)
  plain_c, _ = common.compile_timed(plain, *plain_args)
  contenders = {"plain": lambda: plain_c(*plain_args)}
  compile_s, plan = {}, {}

  fused = ts.make_alternation_fn(dataclasses.replace(base, stage_driver="fused")).fused
  if budget.allows("the fused alternation"):
    fused_c, compile_s["fused"] = common.compile_timed(fused, state, batches, rng)
    plan["fused alternation"] = common.peak_bytes(fused_c)
    contenders["fused"] = lambda: fused_c(state, batches, rng)
  setups = {"layerwise_cg": dataclasses.replace(base, stage_driver="per_step"),
            "mfac": dataclasses.replace(base, stage_driver="per_step", solver="mfac")}
  if budget.allows("the per-step alternation and the M-FAC upper stage"):
    memory_mib, more = solver_cost.solver_contenders(
        setups, problem.params, problem.batch_stats, batches, rng, contenders)
    compile_s.update(more)
    plan.update({f"per-step upper step ({k})": v * MiB for k, v in memory_mib.items()
                 if k in setups})
  times = common.interleaved_timings(contenders, args.repeats)
  unit = times["plain"]

  def in_steps(name):
    return common.median(times[name]), common.paired_ratio(times[name], unit)

  rows = [["plain pretext step (the unit)", "–", *in_steps("plain")]]
  for label, name, key in (("alternation, fused driver", "fused", "fused"),
                           ("alternation, per-step driver", "layerwise_cg: alternation",
                            "layerwise_cg"),
                           ("upper stage, layer-wise CG (per-step)", "layerwise_cg: upper stage",
                            None),
                           ("upper stage, M-FAC (per-step)", "mfac: upper stage", "mfac")):
    if name in times:
      rows.append([label, compile_s.get(key, "–") if key else "–", *in_steps(name)])
  notes = [f"N_L = {n_lower}, N_U = {n_upper}, {cg_iters} layer-wise CG iterations; "
           f"{args.repeats} interleaved rounds after one warm-up; 'plain steps' is the "
           "median over rounds of the time over the plain step's in the same round."]
  if "mfac: upper stage" in times:
    notes.append("M-FAC's upper stage is "
                 f"{common.paired_ratio(times['layerwise_cg: upper stage'], times['mfac: upper stage']):.2f}× "
                 "cheaper than layer-wise CG's (target ≥ 5, docs/solvers.md).")
  table = common.Table(title=f"One alternation per driver — {common.describe(size)}",
                       columns=["Run", "compile s", "seconds", "plain steps"],
                       rows=rows, notes=notes)
  return table, peak_table(plan)


def peak_table(plan: dict) -> common.Table:
  """Step 2: the allocator's peak so far against the largest planned program."""
  peak = memory.device_peak_bytes()
  rows = [[f"plan: {name}", value / MiB] for name, value in plan.items()]
  notes = ["Plan: XLA's compiled memory analysis of each program (arguments + outputs + "
           "temporaries − aliases, or its peak if larger)."]
  if peak is None:
    notes.append("No allocator peak on this backend (CPU): only the plan is shown.")
  else:
    rows.append(["measured: allocator peak after the runs above", peak / MiB])
    largest = max(plan.values()) if plan else float("nan")
    notes.append(f"Measured peak / largest planned program: {peak / largest:.2f}.")
  return common.Table(title="Peak memory against the plan (MiB)", columns=["Figure", "MiB"],
                      rows=rows, notes=notes)


def hvp_table(problem, size, args) -> common.Table:
  """Step 3: the marginal Hessian-vector product inside CG, in gradients."""
  images, _ = common.sample_batch(np.random.default_rng(args.seed), common.image_pool(size),
                                  (size.pretext_batch,))
  views = common.make_views(images, image_size=size.image_size, seed=args.seed,
                            augmented=size.name != "tiny")
  theta, head = problem.params["backbone"], problem.params["pretext_head"]
  call = (theta, hvp_cost.random_tangent(theta, args.seed), head, problem.batch_stats, views)
  fns = hvp_cost.build_functions(problem)
  grad_c, _ = common.compile_timed(fns["gradient"], theta, head, problem.batch_stats, views)
  contenders = {"gradient": lambda: grad_c(theta, head, problem.batch_stats, views)}
  for k in (1, 5):
    solve = jax.jit(functools.partial(fns["cg_solve"], iters=k, mode="linearize"))
    compiled, _ = common.compile_timed(solve, *call)
    contenders[f"cg{k}"] = functools.partial(compiled, *call)
  times = common.interleaved_timings(contenders, args.repeats)
  marginal = (times["cg5"] - times["cg1"]) / 4
  label = "marginal HVP inside CG, (T(5) − T(1)) / 4"
  rows = [["one pretext gradient (the unit)", common.median(times["gradient"]), 1.0],
          [label, common.median(marginal), common.paired_ratio(marginal, times["gradient"])]]
  return common.Table(title=f"Hessian-vector product in gradients — {common.describe(size)}",
                      columns=["Measure", "seconds", "gradients"], rows=rows,
                      notes=["A difference of two timings: it can be noisy (signed)."],
                      signed_rows=(label,))


def largest_batch(step, args_of, base: str, cap: int) -> int:
  """The largest power-of-two batch ≤ ``cap`` whose step plans under 90 % of the device
  memory, by a line through two probe batches' compiled memory (``cap`` on CPU)."""
  limit = _device_bytes()
  if limit is None:
    return cap
  b0 = PROBE_BATCHES[base]
  m0, m1 = (common.peak_bytes(step.lower(*args_of(b)).compile()) for b in (b0, 2 * b0))
  per_image = max((m1 - m0) / b0, 1.0)
  fits = (0.9 * limit - (m0 - per_image * b0)) / per_image
  batch = b0
  while batch * 2 <= min(cap, fits):
    batch *= 2
  return batch


def _device_bytes() -> Optional[int]:
  if jax.default_backend() == "cpu":
    return None
  try:
    return int(jax.devices()[0].memory_stats()["bytes_limit"])
  except Exception:  # pylint: disable=broad-except
    return None


def throughput_table(size, args, budget: Budget) -> common.Table:
  """Step 4: pretext-step images per second per dtype at the largest batch that fits."""
  rows = []
  cap = args.max_batch or MAX_BATCH[args.base_size]
  pool = common.image_pool(size)
  for dtype in ("float32", "bfloat16"):
    if not budget.allows(f"throughput in {dtype}"):
      continue
    problem = build_problem(size, dtype, args.seed)
    step = common.make_plain_step(problem)
    lower = common.lower_params_of(problem.params)
    opt = step.init_opt_state(lower)
    rng = jax.random.PRNGKey(args.seed)

    def args_of(b, problem=problem, lower=lower, opt=opt, rng=rng):
      images, _ = common.sample_batch(np.random.default_rng(b), pool, (b,))
      return lower, problem.batch_stats, opt, images, rng
    batch = largest_batch(step, args_of, args.base_size, cap)
    while True:
      try:
        call = args_of(batch)
        compiled, compile_s = common.compile_timed(step, *call)
        seconds = common.interleaved_timings({"step": lambda: compiled(*call)},
                                             args.repeats)["step"]
        break
      except jax.errors.JaxRuntimeError as err:  # out of memory: half the batch
        if "RESOURCE_EXHAUSTED" not in str(err) or batch <= 1:
          raise
        batch //= 2
    rows.append([dtype, batch, compile_s, common.median(seconds),
                 batch / common.median(seconds)])
  return common.Table(title=f"Pretext-step throughput — {common.describe(size)}",
                      columns=["dtype", "batch", "compile s", "seconds per step", "images/s"],
                      rows=rows, notes=["Images per second: each image gives two views."])


def main(argv: Optional[Sequence[str]] = None) -> List[common.Table]:
  """Runs the check; returns (and prints, and records) its tables."""
  args = common.parse_args(argv, __doc__, add_arguments,
                           default_repeats={"tiny": 1, "small": 3, "full": 3})
  budget = Budget(args.budget_s)
  size = args.size
  print(f"Accelerator check on {common.environment()['device']}, {common.describe(size)}",
        flush=True)
  problem = build_problem(size, "float32", args.seed)
  tables = list(alternation_tables(problem, size, args, budget))
  if budget.allows("the Hessian-vector product"):
    tables.append(hvp_table(problem, size, args))
  tables.append(throughput_table(size, args, budget))
  if budget.skipped:
    tables[0].notes.append("Skipped for the time budget: " + "; ".join(budget.skipped) + ".")
  tables = [t for t in tables if t.rows]
  return common.finish("accelerator_check", tables, args)


if __name__ == "__main__":
  main()
