"""Cost of one GeSSL outer step in plain SimCLR steps, and its compiled memory.

Contenders, all on the same pretext batch of N images:

* the plain SimCLR step of :func:`bench.common.make_plain_step` (augment, gradient,
  clip, LARS): the unit;
* one GeSSL outer step (SimCLR + GeSSL, :class:`bissl_jax.tasks.pretext.gessl.GeSSL`): augment A = 2
  views, the base loss, n tasks of B = N/n images, K inner SGD steps differentiated
  through (second order) and λ−1 = 9 target steps, then SGD (momentum 0.9, wd 1e-4),
  for K = 1 and K = 5 (``--ks``); ``--first-order`` adds the first-order variants.

Times are medians of interleaved rounds (``bench.common``); memory comes from XLA's
compiled memory analysis (``CompiledMemoryStats``: peak = max(peak_memory_in_bytes,
arguments + outputs + temporaries − aliases)). On XLA:CPU the inner loops are
unrolled (the loop cliff), on GPU/TPU they are ``lax`` loops.

Run: ``python -m bench.gessl_cost --small`` (records into ``docs/gessl.md``; add
``--no-record`` to only print).
"""
import functools
import os
from typing import List, Optional, Sequence

import jax
import numpy as np

from bench import common
from bissl_jax.tasks.pretext import gessl

MiB = 2.0**20
DOC_PATH = os.path.join(common.REPO_ROOT, "docs", "gessl.md")


def add_arguments(parser) -> None:
  parser.add_argument("--ks", default="1,5", help="comma-separated K values (default 1,5).")
  parser.add_argument("--lam", type=int, default=10, help="GeSSL's λ (default 10).")
  parser.add_argument("--n-tasks", type=int, default=None,
                      help="tasks per step (default: 8 if the batch allows B >= 16, else 2).")
  parser.add_argument("--task-batching", default="vmap", choices=gessl.TASK_BATCHING,
                      help="run the n tasks side by side (vmap) or in a loop.")
  parser.add_argument("--first-order", action="store_true",
                      help="also time the first-order variants.")
  parser.set_defaults(doc=DOC_PATH)


def default_n_tasks(batch: int) -> int:
  """The paper's n = 8 when each task keeps at least its B = 16 images, else 2, else 1."""
  for n in (8, 2, 1):
    if batch % n == 0 and batch // n >= (16 if n == 8 else 2):
      return n
  raise ValueError(f"A pretext batch of {batch} images cannot form tasks of >= 2 images.")


def make_gessl_step(task: gessl.GeSSL, learning_rate: float = 0.05):
  """One jitted GeSSL outer step: ``(params, stats, opt_state, images, rng) -> (..., loss)``."""
  return common.task_step(task, gessl.gessl_optimizer(learning_rate))


def main(argv: Optional[Sequence[str]] = None) -> List[common.Table]:
  """Runs the benchmark; returns (and prints, and records) its tables."""
  args = common.parse_args(argv, __doc__, add_arguments,
                           default_repeats={"tiny": 1, "small": 3, "full": 5})
  size = args.size
  batch = size.pretext_batch
  n_tasks = args.n_tasks or default_n_tasks(batch)
  if batch % n_tasks:
    raise SystemExit(f"--n-tasks={n_tasks} must divide the pretext batch {batch}.")
  ks = [int(k) for k in args.ks.split(",") if k.strip()]
  problem = common.build_problem(size, args.seed)
  rng = jax.random.PRNGKey(args.seed + 1)
  images, _ = common.sample_batch(np.random.default_rng(args.seed), common.image_pool(size),
                                  (batch,))

  lower = common.lower_params_of(problem.params)
  plain = common.make_plain_step(problem)
  plain_args = (lower, problem.batch_stats, plain.init_opt_state(lower), images, rng)
  plain_c, plain_compile = common.compile_timed(plain, *plain_args)

  variants = [(k, False) for k in ks] + ([(k, True) for k in ks] if args.first_order else [])
  contenders = {"plain SimCLR step": functools.partial(plain_c, *plain_args)}
  compile_s = {"plain SimCLR step": plain_compile}
  memory = {"plain SimCLR step": common.peak_bytes(plain_c)}
  for k, first_order in variants:
    name = f"GeSSL K={k}, λ={args.lam}" + (", first order" if first_order else "")
    task = gessl.GeSSL(base=problem.task, classes_per_task=batch // n_tasks, n_tasks=n_tasks,
                       K=k, lam=args.lam, first_order=first_order,
                       image_size=size.image_size, task_batching=args.task_batching)
    params = task.init_head(jax.random.PRNGKey(args.seed + 2), lower)
    step = make_gessl_step(task)
    step_args = (params, problem.batch_stats, step.init_opt_state(params), images, rng)
    compiled, compile_s[name] = common.compile_timed(step, *step_args)
    memory[name] = common.peak_bytes(compiled)
    contenders[name] = functools.partial(compiled, *step_args)

  times = common.interleaved_timings(contenders, args.repeats)
  unit = times["plain SimCLR step"]
  setting = (f"{common.describe(size)}; GeSSL: n = {n_tasks} tasks of B = {batch // n_tasks} "
             f"images ({args.task_batching}), A = 2 views, inner lr 0.1, all parameters "
             "adapted")
  cost = common.Table(
      title=f"One GeSSL outer step in plain SimCLR steps ({setting})",
      columns=["program", "step (ms)", "plain SimCLR steps", "compile (s)"],
      rows=[[name, 1e3 * common.median(t), common.paired_ratio(t, unit), compile_s[name]]
            for name, t in times.items()],
      notes=[f"medians of {args.repeats} interleaved rounds after one warm-up round",
             "the plain step is LARS with clipping, the GeSSL step SGD (Appendix C); the "
             "optimizer update is a negligible part of either"])
  unit_mem = memory["plain SimCLR step"]
  mem = common.Table(
      title=f"Compiled peak memory ({setting})",
      columns=["program", "peak (MiB)", "× plain step"],
      rows=[[name, m / MiB, m / unit_mem] for name, m in memory.items()],
      notes=["XLA compiled memory analysis: max(peak, arguments + outputs + temporaries "
             "- aliases)"])
  return common.finish("gessl_cost", [cost, mem], args)


if __name__ == "__main__":
  main()
