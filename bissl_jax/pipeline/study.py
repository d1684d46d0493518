"""The few-label study: Only FT vs. BiSSL+FT (and other solvers) over a grid of cells.

A *cell* is one number of labelled downstream training images per class and one
seed. Every cell is an ordinary comparison (:func:`bissl_jax.pipeline.run`) with one
seed, in its own workdir, whose BiSSL variants are the other solvers; all cells of
one seed fine-tune and run BiSSL from the same pretext model, pretrained once per
seed (a ``stages='pretext'`` run). Layout::

  workdir/pretext/seed<s>/pretext/{ckpt,output}
  workdir/cells/lpc<L|all>/seed<s>/...      (the pipeline layout of runner.py)
  workdir/cells/lpc<L|all>/seed<s>/cell.json  (written last: the cell is finished)
  workdir/sensitivity/devices<D>/lpc<L>/seed<s>/...   (the same cell on D devices)
  workdir/study.json                         (every finished cell, for the report)

A killed study picks up where it stopped: a cell with ``cell.json`` is never run
again, and an unfinished one resumes inside its stages (the pipeline's checkpoints).
The sensitivity cells run the same cells on ``D`` simulated CPU devices (a second
process, beside the grid, with ``--xla_force_host_platform_device_count``): the
same computation with another summation order, so their drift is the
float-rounding noise floor.
The report (tables, plot) is :mod:`bissl_jax.pipeline.study_report`.
"""
import copy
import math
import os
import subprocess
import sys
import time
from typing import Callable, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np

from bissl_jax.pipeline import results as results_lib

ALL = 0  # labels_per_class value meaning every label of the training split
CELL_RECORD = "cell.json"
# Per-alternation BiSSL metrics summarised per cell (means over one alternation's
# upper steps, as logged in metrics.jsonl).
SOLVER_KEYS = ("cg_residual", "v_ig_norm", "v_norm", "cg_min_curvature", "theta_distance")


class Cell(NamedTuple):
  """One grid point: labels per class (``ALL``: every label), seed, device count."""
  labels_per_class: int
  seed: int
  devices: int = 1

  @property
  def name(self) -> str:
    labels = "all" if self.labels_per_class == ALL else str(self.labels_per_class)
    prefix = "cells" if self.devices == 1 else os.path.join("sensitivity",
                                                            f"devices{self.devices}")
    return os.path.join(prefix, f"lpc{labels}", f"seed{self.seed}")


def grid(study) -> List[Cell]:
  """The main cells, seed-major: every label count of seed 0 first, then seed 1, ..."""
  return [Cell(int(labels), int(seed)) for seed in study.seeds
          for labels in study.labels_per_class]


def sensitivity_cells(study) -> List[Cell]:
  """The cells rerun on ``study.sensitivity.devices`` devices (none when 0 or 1)."""
  s = study.sensitivity
  if int(s.devices) <= 1:
    return []
  return [Cell(int(s.labels_per_class), int(seed), int(s.devices)) for seed in s.seeds]


def pretext_output(workdir: str, seed: int) -> str:
  """Where the shared pretext model of ``seed`` is exported."""
  return os.path.join(workdir, "pretext", f"seed{seed}", "pretext", "output")


def epochs_for(steps: Optional[int], num_examples: int, batch_size: int,
               default: int) -> int:
  """At least ``default`` epochs and at least ``steps`` optimizer steps (None: ``default``).

  Few labels make short epochs: 50 images at batch 32 are one step. The step floor
  gives every cell a comparable number of updates; the epoch floor keeps the whole
  split's cell as long as the pipeline config's own run.
  """
  if steps is None:
    return int(default)
  per_epoch = num_examples // batch_size
  if per_epoch < 1:
    raise ValueError(f"{num_examples} labelled training images are fewer than the batch "
                     f"size {batch_size}: lower the downstream batch sizes of the study "
                     f"config or raise its smallest labels_per_class.")
  return max(int(default), math.ceil(int(steps) / per_epoch))


def train_size(train_labels, labels_per_class: int, seed: int) -> int:
  """Labelled training images of a cell."""
  from bissl_jax.pipeline.datasets import labels_per_class_subset  # pylint: disable=g-import-not-at-top
  if labels_per_class == ALL:
    return len(train_labels)
  return len(labels_per_class_subset(train_labels, labels_per_class, seed=seed))


def cell_config(config, cell: Cell, *, workdir: str, train_labels,
                variants: Optional[Sequence[str]] = None):
  """The pipeline config of ``cell``: one seed, its labels, the shared pretext model.

  ``variants`` names the entries of ``pipeline.bissl_variants`` the cell runs (None:
  all; a sensitivity cell: those of ``study.sensitivity.variants``).
  """
  study = config.study
  c = copy.deepcopy(config.pipeline)
  c.unlock()
  c.stages = "all"
  c.seed = cell.seed            # draws the labelled subset
  c.seeds = (cell.seed,)
  c.data.labels_per_class = None if cell.labels_per_class == ALL else cell.labels_per_class
  c.pretext.checkpoint = pretext_output(workdir, cell.seed)
  c.pretext.share_across_seeds = False
  n = train_size(train_labels, cell.labels_per_class, cell.seed)
  c.head_warmup.epochs = epochs_for(study.head_warmup_steps, n, c.head_warmup.batch_size,
                                    c.head_warmup.epochs)
  c.finetune.epochs = epochs_for(study.finetune_steps, n, c.finetune.batch_size,
                                 c.finetune.epochs)
  if cell.devices != 1:
    variants = study.sensitivity.variants
  if variants is not None:
    unknown = set(variants) - set(c.bissl_variants)
    if unknown:
      raise ValueError(f"study variants {sorted(unknown)} are not in "
                       f"config.pipeline.bissl_variants ({sorted(c.bissl_variants)}).")
    c.bissl_variants = {k: dict(v) for k, v in c.bissl_variants.items() if k in variants}
  return c


def variant_passes(study) -> List[Tuple[str, ...]]:
  """The variants of each pass over the grid: pass k runs those of passes 0..k.

  The first pass (Only FT and BiSSL+FT only, when ``study.variant_passes[0]`` is
  empty) gives every seed of the grid before any variant, so a study stopped
  early still has the main comparison.
  """
  passes, done = [], ()
  for names in study.variant_passes:
    done = done + tuple(n for n in names if n not in done)
    passes.append(done)
  return passes


def solver_stats(workdir: str) -> dict:
  """Per BiSSL pipeline of a cell: its per-alternation solver metrics from metrics.jsonl.

  Returns:
    ``{pipeline: {key: [value per alternation]}}`` for the keys of ``SOLVER_KEYS``
    (a resumed stage logs some alternations twice; the last record of each counts).
  """
  from bissl_jax.evaluation import plots  # pylint: disable=g-import-not-at-top
  path = os.path.join(workdir, "metrics.jsonl")
  per_stage = {}
  for record in plots.read_jsonl(path) if os.path.exists(path) else []:
    parts = str(record.get("stage", "")).split("/")
    if len(parts) == 2 and parts[1].startswith("seed") and (
        parts[0] == "bissl" or parts[0].startswith(results_lib.VARIANT_PREFIX)):
      per_stage.setdefault(parts[0], {})[int(record["step"])] = record
  return {pipeline: {key: [float(by_step[t].get(key, float("nan")))
                           for t in sorted(by_step)] for key in SOLVER_KEYS}
          for pipeline, by_step in per_stage.items()}


def run_cell(config, cell: Cell, workdir: str, *, train_labels,
             variants: Optional[Sequence[str]] = None,
             bissl_callback: Optional[Callable] = None) -> dict:
  """Runs (or resumes, or loads) one cell; returns its record (also ``cell.json``).

  A finished cell that lacks some of ``variants`` is rerun: the pipeline loads its
  finished stages and runs only the new variants.
  """
  from bissl_jax.pipeline import runner  # pylint: disable=g-import-not-at-top
  directory = os.path.join(workdir, cell.name)
  path = os.path.join(directory, CELL_RECORD)
  record = results_lib.read_json(path)
  c = cell_config(config, cell, workdir=workdir, train_labels=train_labels, variants=variants)
  wanted = sorted(c.bissl_variants)
  if record is not None and set(wanted) <= set(record["variants"]):
    return record
  results = runner.run(c, directory, bissl_callback=bissl_callback)
  record = {"labels_per_class": cell.labels_per_class, "seed": cell.seed,
            "devices": cell.devices, "metric": results["metric"], "variants": wanted,
            "train_examples": train_size(train_labels, cell.labels_per_class, cell.seed),
            "test": {p: rec["per_seed"][str(cell.seed)][results["metric"]]
                     for p, rec in results["pipelines"].items()},
            "labels": {p: rec["label"] for p, rec in results["pipelines"].items()},
            "solver": solver_stats(directory),
            "wall_time_s": results["wall_time_s"] + sum(results["resumed_wall_time_s"])}
  results_lib.write_json(path, record)
  return record


def pretrain_seed(config, workdir: str, seed: int) -> str:
  """The shared pretext model of ``seed`` (pretrained, resumed or already there)."""
  from bissl_jax.convert import stage_output  # pylint: disable=g-import-not-at-top
  from bissl_jax.pipeline import runner  # pylint: disable=g-import-not-at-top
  out = pretext_output(workdir, seed)
  if not stage_output.is_export(out):
    c = copy.deepcopy(config.pipeline)
    c.unlock()
    c.stages, c.seed, c.seeds = "pretext", seed, (seed,)
    c.pretext.checkpoint = None
    runner.run(c, os.path.dirname(os.path.dirname(out)))
  return out


def collect(workdir: str) -> list:
  """Every finished cell record under ``workdir`` (main grid and sensitivity)."""
  records = []
  for root, _, files in sorted(os.walk(workdir)):
    if CELL_RECORD in files:
      records.append(results_lib.read_json(os.path.join(root, CELL_RECORD)))
  return records


def run_cells(config, cells: Sequence[Cell], workdir: str, *,
              variants: Optional[Sequence[str]] = None,
              on_cell: Optional[Callable[[Cell, dict], None]] = None,
              bissl_callback: Optional[Callable] = None) -> list:
  """Runs ``cells`` in order in this process (pretext models first, as needed)."""
  from bissl_jax.pipeline.datasets import load_data  # pylint: disable=g-import-not-at-top
  pipeline = copy.deepcopy(config.pipeline)
  pipeline.unlock()
  pipeline.data.labels_per_class = None
  splits, _ = load_data(pipeline, need_pretext=False, need_downstream=True)
  train_labels = np.asarray(splits["train"].labels)
  records = []
  for cell in cells:
    before = results_lib.read_json(os.path.join(workdir, cell.name, CELL_RECORD))
    pretrain_seed(config, workdir, cell.seed)
    record = run_cell(config, cell, workdir, train_labels=train_labels, variants=variants,
                      bissl_callback=bissl_callback)
    records.append(record)
    if on_cell is not None and record != before:
      on_cell(cell, record)
  return records


def start_sensitivity_subprocess(argv: Sequence[str], devices: int,
                                 log_path: str) -> subprocess.Popen:
  """Starts this study command with ``--part=sensitivity`` on ``devices`` CPU devices.

  It runs beside the main grid (a second process, on the pretext models already
  there) and writes its progress to ``log_path``.
  """
  env = dict(os.environ)
  env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") +
                      f" --xla_force_host_platform_device_count={devices}").strip()
  env["JAX_PLATFORMS"] = "cpu"
  args = [a for a in argv if not a.startswith("--part")] + ["--part=sensitivity"]
  root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  log = open(log_path, "a")  # pylint: disable=consider-using-with  (the child owns it)
  return subprocess.Popen([sys.executable, "-m", "experiments.study"] + list(args), env=env,
                          cwd=root, stdout=log, stderr=subprocess.STDOUT)


def run_study(config, workdir: str, *, results_path: Optional[str] = None,
              part: str = "all", argv: Sequence[str] = (),
              bissl_callback: Optional[Callable] = None) -> list:
  """The whole study: the grid, then the sensitivity cells, then the report.

  Args:
    config: a study config (``configs/study_digits.py``): ``pipeline`` (the config of
      every cell) and ``study`` (the grid).
    workdir: the study directory (resumed if it holds one).
    results_path: the Markdown report (its plot goes next to it); None: none.
    part: 'all'; 'grid' (main cells only); 'sensitivity' (the worker of the
      sensitivity subprocess: this process must see the simulated devices);
      'report' (rewrite the report from the finished cells, nothing runs).
    argv: this command's flags, for the sensitivity subprocess.
    bissl_callback: passed to every BiSSL stage (tests interrupt with it).

  Returns:
    The records of every finished cell.
  """
  import jax  # pylint: disable=g-import-not-at-top
  from bissl_jax.pipeline import study_report  # pylint: disable=g-import-not-at-top
  from bissl_jax.runtime import mesh  # pylint: disable=g-import-not-at-top
  mesh.refuse_several_processes(
      "The study", "its grid is measured on one device and its sensitivity cells simulate "
      "several in a second process of its own")
  workdir = os.path.abspath(workdir)
  os.makedirs(workdir, exist_ok=True)
  started = time.time()

  def report(*_):
    if results_path:
      study_report.write_report(collect(workdir), results_path, config=config,
                                workdir=workdir)

  if part == "report":
    report()
    return collect(workdir)
  if part == "sensitivity":
    cells = sensitivity_cells(config.study)
    if cells and jax.device_count() != cells[0].devices:
      raise RuntimeError(f"--part=sensitivity needs {cells[0].devices} devices, this process "
                         f"has {jax.device_count()}; run it through the study command.")
    return run_cells(config, cells, workdir, bissl_callback=bissl_callback)
  if jax.device_count() != 1:
    raise RuntimeError(f"The study's main grid runs on 1 device; this process has "
                       f"{jax.device_count()}. Unset XLA_FLAGS' device count.")
  pending = [c for c in sensitivity_cells(config.study)
             if not os.path.exists(os.path.join(workdir, c.name, CELL_RECORD))]
  worker = None
  if part == "all" and pending:
    # Every pretext model first, so the sensitivity worker can start at once beside
    # the grid (it reads them; it never pretrains).
    for seed in sorted({c.seed for c in grid(config.study) + pending}):
      pretrain_seed(config, workdir, seed)
    worker = start_sensitivity_subprocess(argv, pending[0].devices,
                                          os.path.join(workdir, "sensitivity.log"))
  try:
    for variants in variant_passes(config.study):
      run_cells(config, grid(config.study), workdir, variants=variants, on_cell=report,
                bissl_callback=bissl_callback)
  finally:
    if worker is not None and worker.wait() != 0:
      print(f"The sensitivity cells stopped (exit status {worker.returncode}); see "
            f"{os.path.join(workdir, 'sensitivity.log')}. Rerun to resume them.", flush=True)
  report()
  records = collect(workdir)
  results_lib.write_json(os.path.join(workdir, "study.json"),
                         {"cells": records, "last_invocation_s": time.time() - started})
  return records
