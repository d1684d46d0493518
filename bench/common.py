"""Shared setup of the benchmarks: sizes, model/task/batch builders, timing, the record.

Every benchmark script has three sizes:

* ``--tiny``: a one-block ResNet at 16 px, only for the smoke test (seconds);
* ``--small``: ResNet-18 at a reduced width and 32 px, for a 2-core CPU;
* default (full): ResNet-50 at 96 px, pretext batch 1024, downstream batch 256, the
  paper's setting, meant for a GPU or TPU.

Timings on a shared machine drift, so contenders are timed *interleaved*: each round
runs every contender once, and ratios are medians of per-round ratios. Each script
prints its tables and, unless ``--no-record``, inserts them with the device, JAX
version, command and date into its dated records, ``docs/benchmarks/runs/NAME.md``,
between the markers ``<!-- records: NAME -->`` and ``<!-- end records: NAME -->``.
"""
import argparse
import dataclasses
import datetime
import functools
import math
import os
import platform
import sys
import time
from typing import Any, Callable, Dict, List, Mapping, NamedTuple, Optional, Sequence

import jax
import numpy as np
import optax

from bissl_jax.tasks import augment
from bissl_jax.models import resnet
from bissl_jax.core import optim
from bissl_jax.tasks import pretext

PyTree = Any

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUNS_DIR = os.path.join(REPO_ROOT, "docs", "benchmarks", "runs")
NUM_CLASSES = 10  # the digits


@dataclasses.dataclass(frozen=True)
class Size:
  """Model and batch sizes of one benchmark run.

  Attributes:
    name: 'tiny', 'small', 'full' or 'custom'.
    arch: 'resnet18', 'resnet50' or 'mini_resnet' (one basic block, for smoke tests).
    width: width multiplier of the base width 64.
    image_size: side of the square inputs.
    pretext_batch: images per pretext batch (each gives two views).
    downstream_batch: images per downstream batch.
  """
  name: str
  arch: str
  width: float
  image_size: int
  pretext_batch: int
  downstream_batch: int


SIZES = {
    "tiny": Size("tiny", "mini_resnet", 0.125, 16, 4, 4),
    "small": Size("small", "resnet18", 0.25, 32, 16, 16),
    "full": Size("full", "resnet50", 1.0, 96, 1024, 256),
}


def describe(size: Size) -> str:
  """A one-line description of a size, for table titles."""
  return (f"{size.arch} ×{size.width:g} width, {size.image_size} px, pretext batch "
          f"2×{size.pretext_batch}, downstream batch {size.downstream_batch}")


# ----------------------------------------------------------------------------- CLI

DEFAULT_REPEATS = {"tiny": 2, "small": 5, "full": 10}


def parse_args(argv: Optional[Sequence[str]], description: str,
               add_arguments: Optional[Callable[[argparse.ArgumentParser], None]] = None,
               default_repeats: Optional[Mapping[str, int]] = None) -> argparse.Namespace:
  """Parses the common flags (size, repeats, recording) plus script-specific ones.

  Args:
    argv: arguments without the program name (None: ``sys.argv[1:]``).
    description: the script's help text.
    add_arguments: adds script-specific flags to the parser.
    default_repeats: timing rounds per base size when ``--repeats`` is not given
      (default ``DEFAULT_REPEATS``).

  Returns:
    The namespace, with ``size`` (a :class:`Size`), ``base_size`` ('tiny', 'small' or
    'full': the size the overrides started from) and ``argv`` (the list) filled in.
  """
  argv = list(sys.argv[1:] if argv is None else argv)
  parser = argparse.ArgumentParser(description=description,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  group = parser.add_mutually_exclusive_group()
  group.add_argument("--small", action="store_true",
                     help="ResNet-18 at reduced width and 32 px (minutes on a 2-core CPU).")
  group.add_argument("--tiny", action="store_true",
                     help="a one-block ResNet at 16 px; for the smoke test only.")
  parser.add_argument("--arch", choices=["resnet18", "resnet50", "mini_resnet"])
  parser.add_argument("--width", type=float, help="width multiplier of the base width 64.")
  parser.add_argument("--image-size", type=int)
  parser.add_argument("--pretext-batch", type=int)
  parser.add_argument("--downstream-batch", type=int)
  parser.add_argument("--repeats", type=int, default=None,
                      help="timing rounds (medians are reported).")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--no-record", action="store_true",
                      help="print only; do not write to docs/benchmarks/runs/.")
  parser.add_argument("--doc", default=None,
                      help="the markdown file to record into (default: "
                           "docs/benchmarks/runs/SCRIPT.md).")
  if add_arguments is not None:
    add_arguments(parser)
  args = parser.parse_args(argv)
  base = SIZES["tiny" if args.tiny else "small" if args.small else "full"]
  overrides = {"arch": args.arch, "width": args.width, "image_size": args.image_size,
               "pretext_batch": args.pretext_batch, "downstream_batch": args.downstream_batch}
  overrides = {k: v for k, v in overrides.items() if v is not None}
  args.size = dataclasses.replace(base, name="custom", **overrides) if overrides else base
  args.base_size = base.name
  if args.repeats is None:
    args.repeats = dict(default_repeats or DEFAULT_REPEATS)[base.name]
  if args.repeats < 1:
    parser.error(f"--repeats must be >= 1; got {args.repeats}.")
  args.argv = argv
  return args


# ----------------------------------------------------------------------------- builders

class Problem(NamedTuple):
  """A model with its SimCLR task and initial variables."""
  size: Size
  model: resnet.BisslModel
  task: Any
  params: PyTree
  batch_stats: PyTree
  downstream: Any = None


def downstream_task(model, image_size: int):
  """The benches' downstream task: 10-way classification with its linear head."""
  from bissl_jax.tasks.downstream import classification  # pylint: disable=g-import-not-at-top
  return classification.Classification(model, image_size, num_classes=NUM_CLASSES)


def init_problem(size: Size, model, task, seed: int) -> "Problem":
  """A :class:`Problem` with every parameter group (the head is the downstream task's)."""
  from bissl_jax.core.params import init_params  # pylint: disable=g-import-not-at-top
  down = downstream_task(model, size.image_size)
  params, batch_stats = init_params(model, down, jax.random.PRNGKey(seed), size.image_size)
  return Problem(size, model, task, params, batch_stats, down)


def build_model(size: Size) -> resnet.BisslModel:
  """The BiSSL model bundle of a size (projector 256-256-256, 10-way head)."""
  if size.arch == "mini_resnet":
    backbone = resnet.ResNet(stage_sizes=(1,), block="basic",
                             width=max(1, int(round(64 * size.width))))
    base = resnet.build_model("resnet18")
    return dataclasses.replace(base, backbone=backbone)
  return resnet.build_model(size.arch, width_multiplier=size.width)


@functools.lru_cache(maxsize=4)
def build_problem(size: Size, seed: int = 0) -> Problem:
  """Builds the model, the SimCLR task and initial parameters for ``size`` (cached)."""
  model = build_model(size)
  task = pretext.make_pretext_task("simclr", model, image_size=size.image_size)
  return init_problem(size, model, task, seed)


def make_setup(problem: Problem, **overrides):
  """A ``BisslSetup`` for ``problem``: the configs' BiSSL defaults with ``overrides``."""
  from bissl_jax.core import state as bilevel
  from configs import common as config_common
  config = config_common.base_config()
  cfg = config.bissl.to_dict()
  # As the pipeline resolves them: the upper level starts from the head warm-up's values.
  cfg.update(upper_lr=config.head_warmup.lr, upper_weight_decay=config.head_warmup.weight_decay)
  cfg.update(overrides)
  return bilevel.BisslSetup.from_config(
      problem.model, problem.task, cfg,
      downstream=problem.downstream or downstream_task(problem.model, problem.size.image_size))


class ImagePool(NamedTuple):
  """uint8 images and int labels to draw batches from."""
  images: np.ndarray
  labels: np.ndarray


def image_pool(size: Size) -> ImagePool:
  """The digits training split at ``size.image_size`` (real images, bundled offline)."""
  return _digits_pool(size.image_size)


@functools.lru_cache(maxsize=4)
def _digits_pool(image_size: int) -> ImagePool:
  from bissl_jax.data import load_digits_splits  # pylint: disable=import-outside-toplevel
  train = load_digits_splits(image_size=image_size)["train"]
  return ImagePool(train.images, train.labels)


def sample_batch(rng: np.random.Generator, pool: ImagePool, shape: Sequence[int]):
  """Draws images (with replacement) shaped ``shape + (H, W, 3)`` and their labels."""
  idx = rng.integers(0, len(pool.images), size=tuple(shape))
  return pool.images[idx], pool.labels[idx]


_views_fn = jax.jit(augment.pretext_views, static_argnames=("size", "normalize_output"))


@jax.jit
def _plain_views(images):
  x = augment.normalize(augment.to_float_rgb(images))
  return x, x[:, :, ::-1, :]


def make_views(images: np.ndarray, *, image_size: int, seed: int = 0,
               augmented: bool = True):
  """The two pretext views of a uint8 batch, augmented once on device.

  ``augmented=False`` gives the normalised images and their mirror images instead:
  the smoke test (``--tiny``) uses it because compiling the augmentation takes
  several seconds on a CPU. Images must then already be ``image_size`` square.
  """
  if augmented:
    return _views_fn(jax.random.PRNGKey(seed), images, size=image_size)
  if images.shape[1:3] != (image_size, image_size):
    raise ValueError(f"Unaugmented views need {image_size}-px images; got {images.shape}.")
  return _plain_views(images)


def pretext_loss_of_backbone(task) -> Callable:
  """``(θ, φ_P, batch_stats, views) ↦ L_P(θ, φ_P)`` in training mode (batch statistics).

  Everything is an argument, so jitted callers pass the batch in rather than baking
  it into the program as a constant. BiSSL's Hessian is taken over θ with φ_P fixed.
  """
  def loss_fn(theta, head, batch_stats, views):
    return task.loss({"backbone": theta, "pretext_head": head}, batch_stats, views)[0]
  return loss_fn


def pretext_optimizer(learning_rate=1.0) -> optax.GradientTransformation:
  """Clip to norm 10, then LARS: the optimizer of BiSSL's lower level and of pretraining."""
  return optim.with_clipping(optim.lars(learning_rate))


def make_plain_step(problem: Problem, learning_rate: float = 1.0) -> Callable:
  """One plain SimCLR training step, jitted: augment, gradient, clip, LARS.

  This is the unit "one plain pretext step" of the alternation and memory benchmarks.
  The jitted function is cached per task and image size, so scripts run in one
  process share its compilation.

  Returns:
    ``step(lower_params, batch_stats, opt_state, images, rng) -> (params, stats,
    opt_state, loss)`` with ``lower_params = {'backbone', 'pretext_head'}``; its
    ``init_opt_state(lower_params)`` gives the optimizer state.
  """
  return _plain_step(problem.task, problem.size.image_size, float(learning_rate))


@functools.lru_cache(maxsize=8)
def _plain_step(task, image_size: int, learning_rate: float) -> Callable:
  del image_size  # the task's own prepare crops to its image size
  return task_step(task, pretext_optimizer(learning_rate))


def task_step(task, tx: optax.GradientTransformation) -> Callable:
  """One jitted step of any pretext task: ``task.prepare``, gradient, ``tx``.

  ``step(params, batch_stats, opt_state, images, rng) -> (params, stats, opt_state,
  loss)``; ``step.init_opt_state`` is ``tx.init``.
  """

  def step(lower_params, batch_stats, opt_state, images, rng):
    inputs = task.prepare(rng, images)
    (loss, aux), grads = jax.value_and_grad(task.loss, has_aux=True)(
        lower_params, batch_stats, inputs)
    updates, opt_state = tx.update(grads, opt_state, lower_params)
    return optax.apply_updates(lower_params, updates), aux["batch_stats"], opt_state, loss
  step = jax.jit(step)
  step.init_opt_state = tx.init
  return step


def lower_params_of(params: PyTree) -> PyTree:
  """``{'backbone', 'pretext_head'}`` of a full parameter tree."""
  return {"backbone": params["backbone"], "pretext_head": params["pretext_head"]}


def chained_products(matvec: Callable[[PyTree], PyTree], tangent: PyTree, count: int,
                     scale: float = 1e-2) -> PyTree:
  """``count`` dependent operator products ``v ← v + scale·A v``, unrolled.

  Each product depends on the previous one, as in CG, so XLA can neither batch nor
  merge them; ``scale`` keeps the iterate bounded.
  """
  for _ in range(count):
    tangent = jax.tree_util.tree_map(lambda a, b: b + scale * a, matvec(tangent), tangent)
  return tangent


# ----------------------------------------------------------------------------- timing

def block(tree: Any) -> Any:
  """Waits for every array in ``tree`` (JAX dispatch is asynchronous)."""
  return jax.block_until_ready(tree)


def live_bytes(stats) -> int:
  """A ``CompiledMemoryStats``'s live buffers: arguments + outputs + temporaries − aliases."""
  return (stats.argument_size_in_bytes + stats.output_size_in_bytes
          + stats.temp_size_in_bytes - stats.alias_size_in_bytes)


def peak_bytes(compiled) -> float:
  """A compiled program's memory: its live buffers or XLA's peak, whichever is larger."""
  stats = compiled.memory_analysis()
  return float(max(stats.peak_memory_in_bytes, live_bytes(stats)))


def compile_timed(jitted: Callable, *args, **kwargs):
  """Lowers and compiles ``jitted`` for ``args``; returns ``(compiled, seconds)``."""
  start = time.perf_counter()
  compiled = jitted.lower(*args, **kwargs).compile()
  return compiled, time.perf_counter() - start


def timed(thunk: Callable[[], Any]) -> float:
  """Wall seconds of one call of ``thunk`` including the wait for its results."""
  start = time.perf_counter()
  block(thunk())
  return time.perf_counter() - start


def interleaved_timings(contenders: Mapping[str, Callable[[], Any]], rounds: int,
                        warmup: int = 1) -> Dict[str, np.ndarray]:
  """Times every contender once per round, in turn, after ``warmup`` untimed rounds.

  Interleaving exposes all contenders to the same load on a shared machine, so
  per-round ratios are much steadier than ratios of separate medians.

  Returns:
    ``{name: seconds per round}``.
  """
  for _ in range(warmup):
    for thunk in contenders.values():
      block(thunk())
  out = {name: [] for name in contenders}
  for _ in range(rounds):
    for name, thunk in contenders.items():
      out[name].append(timed(thunk))
  return {name: np.asarray(times) for name, times in out.items()}


def median(values) -> float:
  """Median of a sequence of numbers as a Python float."""
  return float(np.median(np.asarray(values, np.float64)))


def paired_ratio(numerator: np.ndarray, denominator: np.ndarray) -> float:
  """Median over rounds of ``numerator[i] / denominator[i]``."""
  return median(np.asarray(numerator) / np.asarray(denominator))


# ----------------------------------------------------------------------------- tables

@dataclasses.dataclass
class Table:
  """A result table: a title, column names, rows (label first) and notes.

  ``signed_rows`` holds the labels of rows whose values may legitimately be zero or
  negative (a difference of two noisy timings, say); every other numeric cell of a
  valid table is finite and positive.
  """
  title: str
  columns: Sequence[str]
  rows: List[List[Any]]
  notes: List[str] = dataclasses.field(default_factory=list)
  signed_rows: Sequence[str] = ()

  def to_markdown(self) -> str:
    lines = [f"**{self.title}**", "",
             "| " + " | ".join(self.columns) + " |",
             "|" + "|".join("---" for _ in self.columns) + "|"]
    for row in self.rows:
      lines.append("| " + " | ".join(format_cell(c) for c in row) + " |")
    if self.notes:
      lines.append("")
      lines.extend(f"- {note}" for note in self.notes)
    return "\n".join(lines)

  def numeric_cells(self, *, include_signed: bool = True) -> List[float]:
    """Every numeric (non-bool) cell, optionally leaving out the ``signed_rows``."""
    return [float(cell) for row in self.rows
            if include_signed or row[0] not in self.signed_rows
            for cell in row[1:] if isinstance(cell, (int, float, np.number))
            and not isinstance(cell, (bool, np.bool_))]


def format_cell(cell: Any) -> str:
  """Three significant digits for floats; everything else via ``str``."""
  if isinstance(cell, (bool, np.bool_)):
    return str(bool(cell))
  if isinstance(cell, (float, np.floating)):
    value = float(cell)
    if not math.isfinite(value):
      return str(value)
    if value != 0 and (abs(value) >= 1e4 or abs(value) < 1e-3):
      return f"{value:.2e}"
    return f"{value:.3g}"
  return str(cell)


# ----------------------------------------------------------------------------- record

def environment() -> Dict[str, str]:
  """Device, versions, CPU load and date of this run."""
  devices = jax.devices()
  kind = devices[0].device_kind
  device = f"{len(devices)}× {jax.default_backend()} ({kind})"
  if jax.default_backend() == "cpu":
    device += f", {os.cpu_count()} CPU cores, {cpu_model()}"
  load = ", ".join(f"{x:.1f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"
  import jaxlib  # pylint: disable=import-outside-toplevel
  return {"device": device, "jax": f"jax {jax.__version__}, jaxlib {jaxlib.__version__}",
          "load": load, "python": platform.python_version(),
          "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}


def cpu_model() -> str:
  """The CPU's model name from /proc/cpuinfo, or the platform's processor string."""
  try:
    with open("/proc/cpuinfo", encoding="utf-8") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or "unknown CPU"


def render_record(script: str, tables: Sequence[Table], argv: Sequence[str],
                  env: Mapping[str, str]) -> str:
  """The markdown block of one run: a header line, the environment and the tables."""
  command = " ".join(["python -m", f"bench.{script}", *argv])
  head = [f"#### Run of {env['date']}", "",
          f"- command: `{command}`",
          f"- device: {env['device']}",
          f"- {env['jax']}, Python {env['python']}",
          f"- load average at the end of the run (1, 5, 15 min): {env['load']}"]
  return "\n".join(head) + "\n\n" + "\n\n".join(t.to_markdown() for t in tables) + "\n"


def record(script: str, tables: Sequence[Table], argv: Sequence[str],
           doc_path: Optional[str] = None) -> None:
  """Inserts a run's tables into ``doc_path`` (default: the script's dated records,
  ``docs/benchmarks/runs/SCRIPT.md``) in the script's section.

  The block goes just before ``<!-- end records: SCRIPT -->``; when the markers are
  missing, a new section with both markers is appended at the end of the file.
  """
  doc_path = doc_path or os.path.join(RUNS_DIR, f"{script}.md")
  block_md = render_record(script, tables, argv, environment())
  start, end = f"<!-- records: {script} -->", f"<!-- end records: {script} -->"
  text = ""
  if os.path.exists(doc_path):
    with open(doc_path, encoding="utf-8") as f:
      text = f.read()
  if start in text and end in text:
    cut = text.index(end)
    text = text[:cut].rstrip("\n") + "\n\n" + block_md + "\n" + text[cut:]
  else:
    text = (text.rstrip("\n") + "\n\n" if text else "") + (
        f"## Recorded runs: {script}\n\n{start}\n\n{block_md}\n{end}\n")
  with open(doc_path, "w", encoding="utf-8") as f:
    f.write(text)


def finish(script: str, tables: Sequence[Table], args: argparse.Namespace) -> List[Table]:
  """Prints the tables and records them unless ``--no-record``; returns them."""
  for table in tables:
    print(table.to_markdown(), end="\n\n", flush=True)
  if not args.no_record:
    record(script, tables, args.argv, args.doc)
    print(f"Recorded in {args.doc or os.path.join(RUNS_DIR, script + '.md')}.")
  return list(tables)
