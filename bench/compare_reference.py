"""bissl_jax against the reference PyTorch BiSSL: one alternation and its parts, side by side.

Both implementations run the same model (ResNet-18 at width 64 with the CIFAR stem
at ``--small``; ResNet-50 at full size), the same SimCLR objective, the same batches
and the paper's alternation: N_L = 20 lower steps, then an upper stage of N_U = 8
steps, each with a 5-iteration layer-wise CG solve of ``(I + H/(λ+δ)) x = v`` with
λ = 0.001 and δ = 10 (``config.bissl.lam``, ``config.bissl.damping``,
``config.bissl.cg_iters``). Contenders:

* one alternation: the reference's ``ClassificationBiSSLTrainer.train_one_epoch``;
  bissl_jax's ``train_state.make_alternation_fn`` with the paper's solver
  (``layerwise_cg``) and with ``mfac`` (BiSSLight: no Hessian);
* its parts: one lower step, one upper step, one implicit solve and one pretext
  gradient (``∇_θ L_P`` of the backbone).

The reference runs from the user's checkout (``--reference PATH``, public:
NIPS25-16372/NIPS25_16372_BiSSL) in a worker process (``bench/reference_worker.py``)
with its own interpreter (``--reference-python``: one that has torch, torchvision and
timm); nothing of it is copied here. Without ``--reference`` the bench says so and
stops. Rounds alternate between the two processes, each contender once per round,
and ratios are medians of per-round ratios.

Run: ``python -m bench.compare_reference --small --reference /path/to/NIPS25_16372_BiSSL
--reference-python /path/to/venv/bin/python``.
"""
import dataclasses
import os
import sys
import tempfile
from typing import List, Optional, Sequence

import jax
import numpy as np

from bench import alternation_cost
from bench import common
from bench import worker_protocol
from bissl_jax.tasks import augment
from bissl_jax.core import alternation as ts
from bissl_jax.core import state as bilevel
from bissl_jax.runtime import cpu_kernels
from bissl_jax.models import resnet
from bissl_jax.tasks import pretext as pretext_lib
from configs import common as config_common

ALTERNATION_TARGET = 1.5   # reference / bissl_jax, the paper's solver
MFAC_TARGET = 5.0          # reference CG alternation / bissl_jax mfac alternation
GRADIENT_TARGET = 1.0      # reference gradient / bissl_jax gradient (no slower)

SKIP_MESSAGE = ("compare_reference: no reference checkout given; skipped. Pass --reference "
                "PATH (a checkout of NIPS25-16372/NIPS25_16372_BiSSL) and --reference-python "
                "(an interpreter with torch, torchvision, timm and typed-argument-parser).")


def add_arguments(parser) -> None:
  alternation_cost.add_stage_arguments(parser)
  parser.add_argument("--reference", default=None,
                      help="path of a checkout of the reference BiSSL (PyTorch).")
  parser.add_argument("--reference-python", "--reference_python", dest="reference_python",
                      default=None, help="the interpreter that runs the reference "
                      "(default: this one).")
  parser.add_argument("--reference-threads", type=int, default=0,
                      help="torch.set_num_threads for the reference (0: torch's default). "
                           "On a CPU that other jobs load, PyTorch's OpenMP threads can run "
                           "far slower than one thread would.")
  parser.add_argument("--reference-device", default=None,
                      help="torch device of the reference (default: cuda when JAX runs on a "
                           "GPU, else cpu).")
  parser.add_argument("--cifar-stem", choices=["auto", "on", "off"], default="auto",
                      help="3×3/1 stem without max-pool (auto: on at 32 px or less).")
  parser.add_argument("--no-mfac", action="store_true", help="leave out the mfac alternation.")
  parser.add_argument("--cpu-kernels", choices=cpu_kernels.KERNELS, default=None,
                      help="bissl_jax's XLA:CPU kernels (config.model.cpu_kernels; default: "
                           "the library's, as bissl-jax run sets them; docs/benchmarks/cpu_conv.md).")


def compare_size(args) -> common.Size:
  """``--small`` here is ResNet-18 at full width (64), unless ``--width`` says otherwise."""
  size = args.size
  if args.base_size == "small" and "--width" not in " ".join(args.argv):
    size = dataclasses.replace(size, width=1.0)
  return size


def uses_cifar_stem(args, size: common.Size) -> bool:
  return args.cifar_stem == "on" or (args.cifar_stem == "auto" and size.image_size <= 32)


def build_problem(size: common.Size, cifar_stem: bool, seed: int) -> common.Problem:
  """As ``common.build_problem``, with the stem chosen here."""
  model = resnet.build_model(size.arch, width_multiplier=size.width, cifar_stem=cifar_stem)
  task = pretext_lib.make_pretext_task("simclr", model, image_size=size.image_size)
  return common.init_problem(size, model, task, seed)


def write_reference_batches(path: str, batches: bilevel.AlternationBatches, size: common.Size,
                            seed: int) -> None:
  """The same images for the reference: augmented views once, normalised downstream images."""
  views = [common.make_views(b, image_size=size.image_size, seed=seed + i)
           for i, b in enumerate(batches.pretext)]
  hvp = common.make_views(batches.hvp, image_size=size.image_size, seed=seed + 1000)
  down = jax.jit(lambda x: augment.normalize(augment.to_float_rgb(x)))
  np.savez(path,
           pretext_v1=np.stack([np.asarray(v[0]) for v in views]),
           pretext_v2=np.stack([np.asarray(v[1]) for v in views]),
           hvp_v1=np.asarray(hvp[0]), hvp_v2=np.asarray(hvp[1]),
           down_images=np.stack([np.asarray(down(x)) for x in batches.downstream_images]),
           down_labels=np.asarray(batches.downstream_labels),
           num_classes=common.NUM_CLASSES)


def start_reference(args, size, cifar_stem, setup, batches_path) -> worker_protocol.Worker:
  python = args.reference_python or sys.executable
  command = [python, "-m", "bench.reference_worker", "--reference", args.reference,
             "--batches", batches_path, "--arch", size.arch,
             "--lower-steps", str(setup.lower_steps), "--upper-steps", str(setup.upper_steps),
             "--cg-iters", str(setup.cg_iters), "--lam", str(setup.lam),
             "--damping", str(setup.damping), "--seed", str(args.seed),
             "--cifar-stem", str(int(cifar_stem)), "--threads", str(args.reference_threads),
             "--device", args.reference_device or ("cuda" if jax.default_backend() == "gpu"
                                                   else "cpu")]
  # The worker imports only bench.worker_protocol from this repository.
  return worker_protocol.Worker(command)


def jax_contenders(problem, setup, batches, rng, include_mfac: bool):
  """bissl_jax's contenders, compiled (and run once) before timing."""
  size = problem.size
  per_step = alternation_cost.per_step_setup(setup)
  alt = alternation_cost.library_alternation(per_step)  # its jitted pieces time the parts
  pieces = alternation_cost.make_pieces(setup)
  # The alternation runs the library's own driver: per step on CPU ('auto'), one jit
  # per alternation elsewhere.
  full_setup = per_step if setup.per_step else setup
  full_alt = alternation_cost.library_alternation(full_setup)
  state = bilevel.init_bilevel_state(per_step, problem.params, problem.batch_stats)
  pre0, hvp = batches.pretext[0], batches.hvp
  images, labels = batches.downstream_images[0], batches.downstream_labels[0]

  loss = common.pretext_loss_of_backbone(problem.task)
  views = common.make_views(pre0, image_size=size.image_size, seed=0)
  grad_args = (problem.params["backbone"], problem.params["pretext_head"], problem.batch_stats,
               views)
  grad_c, _ = common.compile_timed(jax.jit(jax.grad(loss)), *grad_args)
  operator, lam = common.block(alt.steps.prepare_stage(state, hvp, rng))
  augment_c = jax.jit(problem.task.prepare)
  v = state.lower.params["backbone"]
  # The steps donate their input state (as in the driver): each timed call continues
  # from the previous call's output, a state of its own.
  owned = {"lower": ts.copy_state(state), "upper": ts.copy_state(state)}

  def chained(level, step, *args):
    owned[level], metrics = step(owned[level], *args)[:2]
    return owned[level], metrics

  out = {
      "gradient": lambda: grad_c(*grad_args),
      "lower step": lambda: chained("lower", alt.steps.lower_step, pre0, rng),
      "operator build": lambda: alt.steps.prepare_stage(state, hvp, rng),
      # The two augmented views the lower step makes on device (the reference's
      # lower steps read them ready-made): how much of the lower step is not gradient.
      "augmentation": lambda: augment_c(rng, pre0),
      "upper step": lambda: chained("upper", alt.steps.upper_step, operator, lam, images,
                                    labels, rng),
      "solve": lambda: pieces["solve"](state, operator, lam, v),
      "alternation": lambda: full_alt(state, batches, rng),
  }
  if include_mfac:
    mfac_setup = dataclasses.replace(full_setup, solver="mfac")
    mfac_alt = alternation_cost.library_alternation(mfac_setup)
    mfac_state = bilevel.init_bilevel_state(mfac_setup, problem.params, problem.batch_stats)
    out["mfac alternation"] = lambda: mfac_alt(mfac_state, batches, rng)
  for thunk in out.values():  # compile, first run
    common.block(thunk())
  return out


def local(thunk):
  return lambda: common.timed(thunk)


def main(argv: Optional[Sequence[str]] = None) -> List[common.Table]:
  """Runs the comparison; returns (prints, records) its tables, or [] when skipped."""
  args = common.parse_args(argv, __doc__, add_arguments,
                           default_repeats={"tiny": 1, "small": 3, "full": 5})
  if not args.reference:
    print(SKIP_MESSAGE)
    return []
  kernels = args.cpu_kernels or config_common.base_config().model.cpu_kernels
  print(f"bissl_jax CPU kernels {kernels!r}: {cpu_kernels.apply(kernels)}", flush=True)
  if not os.path.isdir(os.path.join(args.reference, "source", "bissl")):
    raise SystemExit(f"compare_reference: {args.reference!r} is not a checkout of the "
                     "reference BiSSL (no source/bissl in it); pass the repository's root.")
  if args.base_size == "tiny" or args.size.arch == "mini_resnet":
    raise SystemExit("compare_reference: the reference builds only resnet18/resnet50 "
                     "(timm); use --small or the full size.")
  size = compare_size(args)
  cifar_stem = uses_cifar_stem(args, size)
  n_lower, n_upper, cg_iters = alternation_cost.stage_sizes(args)
  problem = build_problem(size, cifar_stem, args.seed)
  setup = common.make_setup(problem, solver="layerwise_cg", cg_iters=cg_iters,
                            lower_steps=n_lower, upper_steps=n_upper)
  batches = alternation_cost.make_batches(size, n_lower, n_upper, args.seed)
  rng = jax.random.PRNGKey(args.seed + 1)

  with tempfile.TemporaryDirectory() as tmp:
    batches_path = os.path.join(tmp, "batches.npz")
    write_reference_batches(batches_path, batches, size, args.seed)
    ref = start_reference(args, size, cifar_stem, setup, batches_path)
    try:
      print(f"reference worker: {ref.info}", flush=True)
      ours = jax_contenders(problem, setup, batches, rng, include_mfac=not args.no_mfac)
      for name in ("gradient", "lower step", "upper step", "solve"):
        ref.seconds(name)  # warm-up: allocator, autograd caches
      parts = ["gradient", "lower step", "upper step", "solve", "alternation"]
      contenders = {}
      for name in parts:
        contenders[f"reference {name}"] = (lambda n=name: ref.seconds(n))
        contenders[f"bissl_jax {name}"] = local(ours[name])
      contenders["bissl_jax operator build"] = local(ours["operator build"])
      contenders["bissl_jax augmentation"] = local(ours["augmentation"])
      if "mfac alternation" in ours:
        contenders["bissl_jax mfac alternation"] = local(ours["mfac alternation"])
      times = worker_protocol.interleaved_seconds(contenders, args.repeats)
      ref_info = ref.info
    finally:
      ref.close()
  return common.finish("compare_reference",
                       tables(times, size, cifar_stem, setup, ref_info, args), args)


def tables(times, size, cifar_stem, setup, ref_info, args) -> List[common.Table]:
  t = {k: np.asarray(v) for k, v in times.items()}
  rows = []
  for name in ["gradient", "lower step", "upper step", "solve", "alternation"]:
    r, j = t[f"reference {name}"], t[f"bissl_jax {name}"]
    rows.append([name, common.median(r), common.median(j), common.paired_ratio(r, j)])
  rows.append(["operator build (once per upper stage)", "–",
               common.median(t["bissl_jax operator build"]), "–"])
  rows.append(["augmentation (inside bissl_jax's lower step)", "–",
               common.median(t["bissl_jax augmentation"]), "–"])
  verdict = lambda x, target: "met" if x >= target else f"missed by {target / x:.2f}×"
  alt_ratio = common.paired_ratio(t["reference alternation"], t["bissl_jax alternation"])
  grad_ratio = common.paired_ratio(t["reference gradient"], t["bissl_jax gradient"])
  notes = [
      f"{args.repeats} interleaved rounds (reference and bissl_jax alternate, each contender "
      "once per round) after a warm-up of every part; medians; the ratio column is the "
      "median of per-round reference / bissl_jax.",
      f"N_L = {setup.lower_steps}, N_U = {setup.upper_steps}, {setup.cg_iters} layer-wise CG "
      f"iterations, λ = {setup.lam:g}, δ = {setup.damping:g}. bissl_jax: library defaults "
      f"({'per-step' if setup.per_step else 'fused'} stage driver, residual diagnostic every "
      f"{setup.residual_every} step(s): one more Hessian-vector product per checked step, "
      "included in the alternation; the timed upper step, the run's first, is "
      f"{'a checked' if setup.residual_every == 1 else 'an unchecked'} one, and the timed "
      "solve always checks; "
      f"XLA:CPU kernels {cpu_kernels.in_effect()!r}).",
      f"Reference: torch {ref_info.get('torch')}, torchvision {ref_info.get('torchvision')}, "
      f"{ref_info.get('threads')} threads, {ref_info.get('backbone_parameters'):,} backbone "
      "parameters. Its lower steps read pre-augmented views from memory (no data loader "
      "work), while bissl_jax's augment inside the step.",
      f"Target: alternation ≥ {ALTERNATION_TARGET}× faster than the reference: "
      f"{alt_ratio:.2f}× ({verdict(alt_ratio, ALTERNATION_TARGET)}).",
      f"Target: pretext gradient no slower than PyTorch's: {grad_ratio:.2f}× "
      f"({verdict(grad_ratio, GRADIENT_TARGET)}).",
  ]
  stem = "CIFAR stem" if cifar_stem else "ImageNet stem"
  out = [common.Table(
      title=f"Reference PyTorch BiSSL vs bissl_jax, seconds — {common.describe(size)}, {stem}",
      columns=["part", "reference s", "bissl_jax s", "reference / bissl_jax"],
      rows=rows, notes=notes)]
  if "bissl_jax mfac alternation" in t:
    m = t["bissl_jax mfac alternation"]
    ratio = common.paired_ratio(t["reference alternation"], m)
    out.append(common.Table(
        title="bissl_jax mfac alternation vs the reference's CG alternation",
        columns=["contender", "seconds", "reference CG / contender"],
        rows=[["reference, layer-wise CG", common.median(t["reference alternation"]), 1.0],
              ["bissl_jax, layerwise_cg", common.median(t["bissl_jax alternation"]), alt_ratio],
              ["bissl_jax, mfac", common.median(m), ratio]],
        notes=[f"Target: mfac ≥ {MFAC_TARGET}× faster than the reference's CG alternation: "
               f"{ratio:.2f}× ({verdict(ratio, MFAC_TARGET)})."]))
  return out


if __name__ == "__main__":
  main()
