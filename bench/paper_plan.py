"""The paper-size memory and FLOP plan, compiled without an accelerator (BiSSL paper §4.2).

The paper's setup (ResNet-50, 96 px, SimCLR with a pretext batch of 2×1024,
downstream batch 256, N_L = 20, N_U = 8, 5 layer-wise CG iterations) is *lowered and
compiled* for a data-parallel mesh of ``--devices`` devices (8 by default; on a CPU,
XLA simulates them with ``--xla_force_host_platform_device_count``, set here before
JAX starts). No input is allocated: every argument is a ``jax.ShapeDtypeStruct``
with its sharding (the state replicated, the batches split over ``'data'``).

The programs are the library's own: the model from ``pipeline.context.build_model``,
the state from ``core.state.init_bilevel_state`` (shapes only, ``jax.eval_shape``),
and the per-step driver's jitted lower step, operator build, upper step and deferred
residual check (``core.alternation.step_functions``, CG iterations unrolled as on
CPU). The fused driver's whole alternation (``stage_driver='fused'`` with
``lax.scan`` loops, the accelerator program) is compiled for its memory only:
XLA's cost analysis counts a loop body once, not once per trip, so its FLOPs would
undercount. The alternation's FLOPs are therefore the per-step programs' FLOPs
times their calls: N_L lower steps, one operator build, N_U upper steps and the
residual checks of ``config.bissl.residual_every``.

Per device, from ``compiled.memory_analysis()``: argument (state and batch shard),
output, temp (activations and scratch) bytes; from ``compiled.cost_analysis()``:
FLOPs. The unit of the FLOP column is one pretext gradient (``∇`` of the SimCLR loss
over backbone and pretext head, views given) at the same size. With ``--reference
PATH`` (a checkout of the reference PyTorch BiSSL) the same alternation's FLOPs are
counted for the reference by ``bench.reference_flops`` and compared.

Dated records: ``docs/benchmarks/runs/paper_plan.md``. Run: ``python -m bench.paper_plan`` (the full size; minutes per program on a 2-core
CPU), ``--small`` or ``--tiny`` to try it.
"""
import os
import sys

if __name__ == "__main__" and "--xla_force_host_platform_device_count" not in os.environ.get(
    "XLA_FLAGS", ""):  # before JAX starts: the simulated devices of the mesh
  _count = next((a.split("=", 1)[1] for a in sys.argv if a.startswith("--devices=")), "8")
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                             + f" --xla_force_host_platform_device_count={_count}").strip()

# pylint: disable=wrong-import-position
import dataclasses
import subprocess
import time
from typing import Dict, List, Optional, Sequence

import jax
import numpy as np

from bench import alternation_cost
from bench import common
from bench import memory
from bissl_jax.core import alternation as ts
from bissl_jax.core import params as params_lib
from bissl_jax.core import state as bilevel
from bissl_jax.pipeline import context
from bissl_jax.runtime import mesh as parallel
from bissl_jax.tasks import pretext as pretext_lib
from configs import common as config_common

MiB = 2.0**20


def add_arguments(parser) -> None:
  alternation_cost.add_stage_arguments(parser)
  parser.add_argument("--devices", type=int, default=8,
                      help="devices of the data-parallel mesh (simulated on a CPU).")
  parser.add_argument("--dtypes", default="float32,bfloat16",
                      help="comma-separated config.model.dtype values.")
  parser.add_argument("--no-fused", action="store_true",
                      help="leave out the fused driver's whole alternation.")
  parser.add_argument("--reference", default=None,
                      help="a checkout of the reference PyTorch BiSSL: count its FLOPs too.")


@dataclasses.dataclass
class Program:
  """One compiled program: per-device memory, FLOPs and compile seconds."""
  name: str
  calls: int           # per alternation (0: not part of the FLOP sum)
  compiled: object
  seconds: float

  @property
  def flops(self) -> float:
    cost = self.compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost.get("flops", 0.0))


def build_setup(size: common.Size, dtype: str, n_lower: int, n_upper: int, cg_iters: int
                ) -> bilevel.BisslSetup:
  """The BiSSL setup of the plan: the model as a run config builds it, shapes only."""
  config = config_common.base_config()
  mini = size.arch == "mini_resnet"  # the smoke test's one-block network
  config.model.arch = "resnet18" if mini else size.arch
  config.model.width_multiplier = size.width
  config.model.dtype = dtype
  config.data.image_size = size.image_size
  config.pretext.task = "simclr"
  model = context.build_model(config)
  if mini:
    backbone = dataclasses.replace(common.build_model(size).backbone, dtype=model.backbone.dtype)
    model = dataclasses.replace(model, backbone=backbone)
  task = pretext_lib.make_pretext_task("simclr", model, image_size=size.image_size)
  problem = common.Problem(size, model, task, None, None,
                           common.downstream_task(model, size.image_size))
  return common.make_setup(problem, solver="layerwise_cg", cg_iters=cg_iters,
                           lower_steps=n_lower, upper_steps=n_upper, stage_driver="per_step")


def abstract(tree, sharding):
  """``tree``'s shapes as ``ShapeDtypeStruct``s placed with ``sharding`` (one or a tree)."""
  if isinstance(sharding, jax.sharding.Sharding):
    return jax.tree_util.tree_map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree)
  return jax.tree_util.tree_map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, sharding)


def abstract_state(setup: bilevel.BisslSetup, rep) -> bilevel.BilevelState:
  """The replicated BiSSL state's shapes (``init_params``, ``init_bilevel_state``)."""
  image_size = setup.task.image_size

  def init():
    params, stats = params_lib.init_params(setup.model, setup.downstream,
                                           jax.random.PRNGKey(0), image_size)
    return bilevel.init_bilevel_state(setup, params, stats)
  return abstract(jax.eval_shape(init), rep)


def tree_bytes(tree) -> int:
  return sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize
             for x in jax.tree_util.tree_leaves(tree))


def compile_program(name: str, calls: int, jitted, *args) -> Program:
  print(f"  compiling {name} ...", flush=True)
  compiled, seconds = common.compile_timed(jitted, *args)
  program = Program(name, calls, compiled, seconds)
  stats = compiled.memory_analysis()
  # Each program's figures as soon as it is compiled: a long plan that stops early
  # still leaves them in its log.
  print(f"  compiled {name} in {seconds:.0f} s: args {stats.argument_size_in_bytes / MiB:.1f} "
        f"MiB, out {stats.output_size_in_bytes / MiB:.1f} MiB, temp "
        f"{stats.temp_size_in_bytes / MiB:.1f} MiB, alias {stats.alias_size_in_bytes / MiB:.1f} "
        f"MiB, {program.flops / 1e9:.6g} GFLOP per device", flush=True)
  return program


def compile_programs(setup: bilevel.BisslSetup, mesh, size: common.Size, fused: bool):
  """Compiles the plan's programs for one setup; nothing is run or allocated.

  Returns:
    ``({name: Program}, the abstract state)``.
  """
  rep, batch0, batch1 = (parallel.replicated(mesh), parallel.batch_sharding(mesh, 0),
                         parallel.batch_sharding(mesh, 1))
  n_lower, n_upper = setup.lower_steps, setup.upper_steps
  side = size.image_size
  state = abstract_state(setup, rep)
  key = abstract(jax.eval_shape(lambda: jax.random.PRNGKey(0)), rep)
  images = lambda lead, sharding: jax.ShapeDtypeStruct((*lead, side, side, 3), np.uint8,
                                                       sharding=sharding)
  pretext1, hvp = images((size.pretext_batch,), batch0), images((size.pretext_batch,), batch0)
  down = images((size.downstream_batch,), batch0)
  labels = jax.ShapeDtypeStruct((size.downstream_batch,), np.int32, sharding=batch0)
  out = {}

  # The unit: one gradient of the pretext loss, the two views given.
  views = abstract(jax.eval_shape(setup.task.prepare, key, pretext1), batch0)
  loss = common.pretext_loss_of_backbone(setup.task)
  lower = state.lower
  out["gradient"] = compile_program(
      "pretext gradient (the unit)", 0, jax.jit(jax.grad(loss, argnums=(0, 1))),
      lower.params["backbone"], lower.params["pretext_head"], lower.batch_stats, views)

  steps = ts.step_functions(setup, mesh)
  out["lower"] = compile_program("lower step", n_lower, steps.lower_step, state, pretext1, key)
  out["build"] = compile_program("operator build (linearize)", 1, steps.prepare_stage,
                                 state, hvp, key)
  operator = abstract(jax.eval_shape(steps.prepare_stage, state, hvp, key),
                      out["build"].compiled.output_shardings)
  operator, lam = operator
  step_args = (state, operator, lam, down, labels, key)
  out["upper"] = compile_program(f"upper step ({setup.cg_iters} CG iterations)", n_upper,
                                 steps.upper_step, *step_args)
  if setup.residual_policy.deferred:
    _, metrics, system = abstract(jax.eval_shape(steps.upper_step, *step_args), rep)
    checks = sum(bool(setup.residual_policy.due(i)) for i in range(n_upper))
    out["residual"] = compile_program("residual check (one product)", checks, steps.residual,
                                      state, operator, lam, system, metrics["upper_nonfinite"])
  if fused:
    fused_setup = dataclasses.replace(setup, stage_driver="fused", unroll=False)
    alt = ts.make_alternation_fn(fused_setup, mesh, donate=True)
    batches = bilevel.AlternationBatches(
        pretext=images((n_lower, size.pretext_batch), batch1), hvp=hvp,
        downstream_images=images((n_upper, size.downstream_batch), batch1),
        downstream_labels=jax.ShapeDtypeStruct((n_upper, size.downstream_batch), np.int32,
                                               sharding=batch1))
    out["fused"] = compile_program("fused alternation (lax.scan)", 0, alt.fused, state,
                                   batches, key)
  return out, state


def state_rows(state: bilevel.BilevelState) -> List[list]:
  """Bytes per device of the replicated state, by part (exact on any backend)."""
  parts = [("lower params θ_P, φ_P", state.lower.params),
           ("lower optimizer state (LARS)", state.lower.opt_state),
           ("upper params θ_D, φ_D", state.upper.params),
           ("upper optimizer state (SGD)", state.upper.opt_state),
           ("BatchNorm statistics (both levels)", (state.lower.batch_stats,
                                                   state.upper.batch_stats)),
           ("solver state, BYOL target, step counters", (
               state.target, state.solver_state, state.lower.step, state.upper.step,
               state.alternation))]
  rows = [[label, tree_bytes(tree) / MiB] for label, tree in parts]
  rows.append(["whole state", tree_bytes(state) / MiB])
  return rows


def plan_tables(per_dtype: Dict[str, tuple], size: common.Size, devices: int, setup,
                reference: Optional[dict]) -> List[common.Table]:
  """The memory, state and FLOP tables of every dtype."""
  desc = (f"{common.describe(size)}; {devices} devices, per device; N_L = {setup.lower_steps}, "
          f"N_U = {setup.upper_steps}, {setup.cg_iters} layer-wise CG iterations")
  mem_rows, flop_rows, state_table_rows = [], [], []
  for dtype, (programs, state) in per_dtype.items():
    unit = None
    for prog in programs.values():
      row = memory.memory_row(f"{dtype}: {prog.name}", prog.compiled.memory_analysis(), unit)
      unit = unit or row[6] * MiB
      mem_rows.append(row[:4] + row[5:7] + [prog.seconds])
    grad = programs["gradient"].flops
    total = 0.0
    for key, prog in programs.items():
      if key == "fused":
        continue
      calls = prog.calls or 1
      part = prog.flops * prog.calls
      total += part
      flop_rows.append([f"{dtype}: {prog.name}", calls if prog.calls else "–", prog.flops,
                        prog.flops * devices, prog.flops / grad,
                        part / grad if prog.calls else "–"])
    flop_rows.append([f"{dtype}: one alternation (sum of the above)", "–", total,
                      total * devices, total / grad, total / grad])
    if reference is not None:
      ref_total, ref_grad = reference["alternation"], reference["gradient"]
      flop_rows.append([f"{dtype}: reference PyTorch BiSSL, the same alternation", "–",
                        ref_total / devices, ref_total, "–", ref_total / ref_grad])
      flop_rows.append([f"{dtype}: reference / bissl_jax (FLOPs; gradient-equivalents)", "–",
                        "–", ref_total / (total * devices), "–",
                        (ref_total / ref_grad) / (total / grad)])
    if not state_table_rows:
      state_table_rows = state_rows(state)
  notes_mem = [
      "MiB per device from CompiledMemoryStats of the compiled (not run) program; "
      "'args + out + temp − alias' is its live-buffer total, 'peak' the larger of that and "
      "XLA's peak_memory_in_bytes.",
      "Argument bytes (the replicated state, the batch shard, the operator's stored "
      "residuals for an upper step) are set by shapes and carry over to a GPU or TPU. Temp "
      "bytes are XLA:CPU's buffer assignment: a GPU or TPU backend fuses and schedules "
      "differently, so they are an estimate there, not a measurement.",
  ]
  if jax.default_backend() == "cpu":
    notes_mem.append(f"Compiled on {jax.device_count()} simulated CPU devices "
                     f"(XLA_FLAGS --xla_force_host_platform_device_count); "
                     f"jax_disable_most_optimizations={jax.config.values['jax_disable_most_optimizations']}.")
  notes_flops = [
      "FLOPs per device from compiled.cost_analysis() of the SPMD-partitioned program; "
      "'all devices' multiplies by the mesh size. Gradient-equivalents divide by the "
      "pretext gradient's FLOPs at the same size and dtype (cost analysis counts a "
      "bfloat16 FLOP as a FLOP).",
      "The alternation is the per-step programs times their calls; the fused driver's "
      "program is left out of the sum because cost analysis counts a loop body once.",
  ]
  if reference is not None:
    notes_flops.append(reference["note"])
  return [
      common.Table(title=f"Compiled memory per device — {desc}",
                   columns=["program", "args MiB", "out MiB", "temp MiB",
                            "args + out + temp − alias MiB", "peak MiB", "compile s"],
                   rows=mem_rows, notes=notes_mem),
      common.Table(title="The replicated BiSSL state per device, by part (from its shapes)",
                   columns=["part", "MiB"], rows=state_table_rows,
                   notes=["Both levels' parameters, optimizer states and statistics are held "
                          "on every device (data parallelism); float32 in either dtype."]),
      common.Table(title=f"FLOPs — {desc}",
                   columns=["program", "calls per alternation", "GFLOP per device",
                            "GFLOP all devices", "pretext gradients per call",
                            "pretext gradients per alternation"],
                   rows=[r[:2] + [r[2] / 1e9 if isinstance(r[2], float) else r[2],
                                  r[3] / 1e9 if isinstance(r[3], float) else r[3]] + r[4:]
                         if " / bissl_jax" not in str(r[0]) else r
                         for r in flop_rows],
                   notes=notes_flops),
  ]


def reexec_with_devices(args) -> None:
  """Runs this script again in a process that starts JAX with ``--devices`` CPU devices."""
  env = dict(os.environ)
  env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count="
                      f"{args.devices}").strip()
  command = [sys.executable, "-m", "bench.paper_plan", *args.argv]
  print(f"paper_plan: {jax.device_count()} device(s) here; rerunning with {args.devices} "
        "simulated CPU devices.", flush=True)
  result = subprocess.run(command, env=env, cwd=common.REPO_ROOT, check=False)
  if result.returncode:
    raise SystemExit(result.returncode)


def main(argv: Optional[Sequence[str]] = None) -> List[common.Table]:
  """Compiles the plan; returns (prints, records) its tables ([] when rerun in a subprocess)."""
  args = common.parse_args(argv, __doc__, add_arguments)
  if args.devices < 1:
    raise SystemExit(f"paper_plan: --devices must be >= 1; got {args.devices}.")
  size = args.size
  for name, batch in (("pretext", size.pretext_batch), ("downstream", size.downstream_batch)):
    if batch % args.devices:
      raise SystemExit(f"paper_plan: the {name} batch {batch} does not split over "
                       f"{args.devices} devices; choose a multiple.")
  if jax.device_count() < args.devices:
    if jax.default_backend() != "cpu":
      raise SystemExit(f"paper_plan: {jax.device_count()} {jax.default_backend()} devices "
                       f"here; pass --devices {jax.device_count()} or fewer.")
    reexec_with_devices(args)
    return []
  n_lower, n_upper, cg_iters = alternation_cost.stage_sizes(args)
  reference = None
  if args.reference:  # first: it is quick (meta device) and checks the path
    from bench import reference_flops  # pylint: disable=import-outside-toplevel
    reference = reference_flops.count(args.reference, size, n_lower, n_upper, cg_iters)
  mesh = parallel.make_mesh(jax.devices()[:args.devices])
  start = time.perf_counter()
  per_dtype, setup = {}, None
  for dtype in [d.strip() for d in args.dtypes.split(",") if d.strip()]:
    print(f"paper_plan: {dtype}", flush=True)
    setup = build_setup(size, dtype, n_lower, n_upper, cg_iters)
    per_dtype[dtype] = compile_programs(setup, mesh, size, fused=not args.no_fused)
  tables = plan_tables(per_dtype, size, args.devices, setup, reference)
  tables[0].notes.append(f"Whole plan: {time.perf_counter() - start:.0f} s of lowering and "
                         "compiling.")
  return common.finish("paper_plan", tables, args)


if __name__ == "__main__":
  main()
