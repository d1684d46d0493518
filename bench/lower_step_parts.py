"""Where a lower step's time goes beyond its pretext gradient.

The target (docs/benchmarks.md) is a lower step within 1.05× of the pretext gradient
that ``bench/compare_reference.py`` times: ``∇_θ L_P`` of the backbone alone, on two
views made beforehand. The library's lower step (:func:`bissl_jax.core.lower.lower_step`,
compiled and donated as the per-step driver compiles it) does more, and this bench
times each addition side by side, at compare_reference's size (ResNet-18 at width 64,
CIFAR stem, 2×16 images of 32 px at ``--small``):

* ``gradient``: compare_reference's gradient (the unit);
* ``gradient part``: what the lower step does before its update: the two views
  augmented on device, the gradient of pretext loss + proximal term with respect to
  every trainable leaf (backbone and pretext head), the new BatchNorm statistics;
* ``optimizer update``: gradient clipping and LARS over the whole parameter tree, the
  update applied (one jit, donated as in the step);
* ``lower step``: the library's compiled lower step, with its metrics (losses, the
  gradient norm, the non-finite flag over loss, gradient norm and parameters).

Run: ``python -m bench.lower_step_parts --small``.
"""
import functools
from typing import List, Optional, Sequence

import jax
import optax

from bench import alternation_cost
from bench import common
from bench import compare_reference
from bissl_jax.core import alternation as ts
from bissl_jax.core import lower as lower_lib
from bissl_jax.core import state as bilevel
from bissl_jax.runtime import cpu_kernels
from bissl_jax.runtime import mesh as parallel
from configs import common as config_common

TARGET = 1.05  # lower step / gradient


def add_arguments(parser) -> None:
  alternation_cost.add_stage_arguments(parser)  # N_L and N_U enter the LR schedules
  parser.add_argument("--cifar-stem", choices=["auto", "on", "off"], default="auto",
                      help="3×3/1 stem without max-pool (auto: on at 32 px or less).")


def gradient_part(setup: bilevel.BisslSetup, state: bilevel.BilevelState, images, rng):
  """The lower step up to its gradient (as :func:`lower_step` without a window)."""
  inputs = setup.task.prepare(rng, images)
  (loss, _, aux), grads = lower_lib.lower_gradients(
      setup, state, lower_lib.lower_split(setup, state), inputs,
      bilevel.current_lam(setup, state))
  return grads, aux["batch_stats"], loss


def contenders(size: common.Size, cifar_stem: bool, args):
  seed = args.seed
  problem = (common.build_problem(size, seed) if size.arch == "mini_resnet"  # --tiny
             else compare_reference.build_problem(size, cifar_stem, seed))
  n_lower, n_upper, cg_iters = alternation_cost.stage_sizes(args)
  # The setup of the other benches' alternation: its compiled lower step is theirs.
  setup = alternation_cost.per_step_setup(common.make_setup(
      problem, solver="layerwise_cg", cg_iters=cg_iters, lower_steps=n_lower,
      upper_steps=n_upper))
  batches = alternation_cost.make_batches(size, n_lower, n_upper, seed)
  rng = jax.random.PRNGKey(seed + 1)
  state = bilevel.init_bilevel_state(setup, problem.params, problem.batch_stats)
  images = batches.pretext[0]

  loss = common.pretext_loss_of_backbone(problem.task)
  views = common.make_views(images, image_size=size.image_size, seed=seed)
  grad_args = (problem.params["backbone"], problem.params["pretext_head"],
               problem.batch_stats, views)
  grad_c, _ = common.compile_timed(jax.jit(jax.grad(loss)), *grad_args)
  part_c, _ = common.compile_timed(jax.jit(functools.partial(gradient_part, setup)),
                                   state, images, rng)
  grads = jax.tree_util.tree_map(lambda p: 1e-3 * p, state.lower.params)
  tx = setup.lower_optimizer(state.lower.params)

  def update(params, opt_state, g):
    updates, opt_state = tx.update(g, opt_state, params)
    return optax.apply_updates(params, updates), opt_state
  update_c = jax.jit(update, donate_argnums=(0, 1))
  steps = ts.step_functions(setup, parallel.make_mesh())
  # Donating calls continue from their previous output, each on buffers of its own.
  owned = {"opt": ts.copy_state((state.lower.params, state.lower.opt_state)),
           "step": ts.copy_state(state)}

  def run_update():
    owned["opt"] = update_c(*owned["opt"], grads)
    return owned["opt"]

  def run_step():
    owned["step"], metrics = steps.lower_step(owned["step"], images, rng)
    return owned["step"], metrics
  out = {"gradient": lambda: grad_c(*grad_args),
         "gradient part": lambda: part_c(state, images, rng),
         "optimizer update": run_update,
         "lower step": run_step}
  for thunk in out.values():  # compile, first run
    common.block(thunk())
  return out


def main(argv: Optional[Sequence[str]] = None) -> List[common.Table]:
  """Times the parts; returns (prints, records) the table."""
  args = common.parse_args(argv, __doc__, add_arguments,
                           default_repeats={"tiny": 1, "small": 7, "full": 5})
  kernels = config_common.base_config().model.cpu_kernels
  print(f"bissl_jax CPU kernels {kernels!r}: {cpu_kernels.apply(kernels)}", flush=True)
  size = args.size
  if size.arch != "mini_resnet":
    size = compare_reference.compare_size(args)
  # --tiny's one-block network has its own stem; the ResNets take compare_reference's.
  cifar_stem = size.arch != "mini_resnet" and compare_reference.uses_cifar_stem(args, size)
  times = common.interleaved_timings(contenders(size, cifar_stem, args), args.repeats)
  unit = times["gradient"]
  rows = [[name, common.median(t), common.paired_ratio(t, unit)] for name, t in times.items()]
  ratio = common.paired_ratio(times["lower step"], unit)
  verdict = "met" if ratio <= TARGET else f"missed by {ratio / TARGET:.2f}×"
  notes = [f"{args.repeats} interleaved rounds after one warm-up; medians; 'gradients' is the "
           "median of per-round ratios to the gradient.",
           "gradient: ∇_θ L_P of the backbone on two views made beforehand "
           "(compare_reference's). gradient part: augmentation on device, the gradient of "
           "L_P + proximal term for backbone and pretext head, the new BatchNorm "
           "statistics. optimizer update: clipping and LARS over the tree, applied, donated.",
           f"XLA:CPU kernels {cpu_kernels.in_effect()!r}.",
           f"Target: lower step ≤ {TARGET}× the gradient: {ratio:.2f}× ({verdict})."]
  stem = ("one-block stem" if size.arch == "mini_resnet"
          else "CIFAR stem" if cifar_stem else "ImageNet stem")
  table = common.Table(title=f"A lower step's parts — {common.describe(size)}, {stem}",
                       columns=["part", "seconds", "gradients"], rows=rows, notes=notes)
  return common.finish("lower_step_parts", [table], args)


if __name__ == "__main__":
  main()
