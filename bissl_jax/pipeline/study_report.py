"""The study's report: ``results.md`` tables, the verdicts and the accuracy plot.

Everything here is computed from the finished cell records of
:mod:`bissl_jax.pipeline.study` (``cell.json``), so the report can be rewritten at
any time, also while the study still runs (it then says how many seeds each cell has).
"""
import datetime
import os
import platform
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from bissl_jax.evaluation.metrics import paired_difference, summarize
from bissl_jax.pipeline import study_data
from bissl_jax.pipeline.study import ALL, SOLVER_KEYS

BASELINE = "baseline"


def _labels_name(labels: int) -> str:
  return "all" if labels == ALL else str(labels)


def _order(pipelines) -> List[str]:
  """Only FT, BiSSL+FT (the paper's solver), then the variants by name."""
  return sorted(set(pipelines), key=lambda p: (p != BASELINE, p != "bissl", p))


def by_cell(records: Sequence[Mapping], devices: int = 1) -> Dict[int, Dict[int, Mapping]]:
  """``{labels_per_class: {seed: record}}`` of the records on ``devices`` devices."""
  out: Dict[int, Dict[int, Mapping]] = {}
  for r in records:
    if int(r.get("devices", 1)) == devices:
      out.setdefault(int(r["labels_per_class"]), {})[int(r["seed"])] = r
  return out


def _label_sort(labels: int) -> float:
  return float("inf") if labels == ALL else labels


def accuracy_table(cells: Mapping[int, Mapping[int, Mapping]]) -> Dict[int, Dict[str, dict]]:
  """``{labels: {pipeline: summarize(test accuracies over seeds)}}``."""
  out = {}
  for labels, seeds in cells.items():
    pipelines = _order(p for r in seeds.values() for p in r["test"])
    out[labels] = {p: summarize([r["test"][p] for r in seeds.values() if p in r["test"]])
                   for p in pipelines}
  return out


def paired_table(cells: Mapping[int, Mapping[int, Mapping]]) -> Dict[int, Dict[str, dict]]:
  """``{labels: {pipeline: paired_difference(pipeline, Only FT over seeds)}}``."""
  out = {}
  for labels, seeds in cells.items():
    rows = [r for _, r in sorted(seeds.items())]
    out[labels] = {}
    for p in _order(p for r in rows for p in r["test"]):
      if p == BASELINE:
        continue
      pairs = [(r["test"][p], r["test"][BASELINE]) for r in rows
               if p in r["test"] and BASELINE in r["test"]]
      if pairs:
        out[labels][p] = paired_difference([a for a, _ in pairs], [b for _, b in pairs])
  return out


def solver_table(records: Sequence[Mapping]) -> Dict[str, dict]:
  """Per BiSSL pipeline, the solver metrics over every alternation of every main cell."""
  values: Dict[str, Dict[str, list]] = {}
  for r in records:
    if int(r.get("devices", 1)) != 1:
      continue
    for pipeline, series in r["solver"].items():
      acc = values.setdefault(pipeline, {k: [] for k in ("res", "ratio", "curv", "dist")})
      res = np.asarray(series["cg_residual"], np.float64)
      acc["res"] += list(res)
      acc["ratio"] += list(np.asarray(series["v_ig_norm"]) / np.asarray(series["v_norm"]))
      acc["curv"] += list(series["cg_min_curvature"])
      acc["dist"].append(series["theta_distance"][-1])
  out = {}
  for pipeline, acc in values.items():
    res = np.asarray(acc["res"], np.float64)
    finite = res[np.isfinite(res)]
    out[pipeline] = {
        "alternations": int(res.size),
        "residual_median": float(np.median(finite)) if finite.size else float("nan"),
        "residual_p90": float(np.percentile(finite, 90)) if finite.size else float("nan"),
        "residual_max": float(np.max(finite)) if finite.size else float("nan"),
        "share_above_1": float(np.mean(finite > 1.0)) if finite.size else float("nan"),
        "ratio_median": float(np.nanmedian(acc["ratio"])),
        "min_curvature": float(np.nanmin(acc["curv"])) if len(acc["curv"]) else float("nan"),
        "theta_distance": float(np.mean(acc["dist"]))}
  return out


def sensitivity_table(records: Sequence[Mapping]) -> Tuple[int, Dict[int, Dict[str, dict]]]:
  """Drift between the main cells and their reruns on more devices.

  Returns:
    ``(devices, {labels: {pipeline: {'mean_abs', 'max_abs', 'n'}}})`` of
    ``|acc(devices) − acc(1 device)|`` over the seeds both have; ``(0, {})`` without
    sensitivity cells.
  """
  devices = sorted({int(r.get("devices", 1)) for r in records} - {1})
  if not devices:
    return 0, {}
  main, other = by_cell(records, 1), by_cell(records, devices[0])
  out = {}
  for labels, seeds in other.items():
    out[labels] = {}
    for p in _order(p for r in seeds.values() for p in r["test"]):
      diffs = [abs(r["test"][p] - main[labels][s]["test"][p]) for s, r in seeds.items()
               if s in main.get(labels, {}) and p in main[labels][s]["test"]]
      if diffs:
        out[labels][p] = {"mean_abs": float(np.mean(diffs)), "max_abs": float(np.max(diffs)),
                          "n": len(diffs)}
  return devices[0], out


def verdict(diff: Mapping) -> str:
  """Plain words for a paired difference and its 95% interval."""
  if diff["n"] < 2 or not np.isfinite(diff["low"]):
    return "too few seeds"
  if diff["low"] > 0:
    return "better"
  if diff["high"] < 0:
    return "worse"
  return "no detectable difference"


def _pct(x: float) -> str:
  return f"{100 * x:.1f}"


def _fmt(x: float, digits: int = 3) -> str:
  return "n/a" if not np.isfinite(x) else f"{x:.{digits}g}"


def _percent(share: float) -> str:
  """A share as a percentage with two significant digits, never in exponent form."""
  if not np.isfinite(share):
    return "n/a"
  value = 100 * share
  return f"{value:.0f}%" if value >= 10 else f"{value:.2g}%"


def _machine() -> str:
  model = platform.processor() or platform.machine()
  try:
    with open("/proc/cpuinfo") as f:
      model = next(l.split(":", 1)[1].strip() for l in f if l.startswith("model name"))
  except (OSError, StopIteration):
    pass
  return f"{model}, {os.cpu_count()} cores"


def to_markdown(records: Sequence[Mapping], *, config=None, plot_name: Optional[str] = None,
                command: str = "python -m experiments.study --config=configs/study_digits.py"
                ) -> str:
  """The whole report as Markdown (see the module docstring)."""
  cells = by_cell(records, 1)
  labels_sorted = sorted(cells, key=_label_sort)
  acc = accuracy_table(cells)
  paired = paired_table(cells)
  names = {p: lab for r in records for p, lab in r["labels"].items()}
  pipelines = _order(names)
  devices, drift = sensitivity_table(records)
  sens_cells = by_cell(records, devices) if devices else {}
  solver = solver_table(records)
  lines = _title_lines(records, sens_cells, command)
  if config is not None:
    lines += _setup_lines(records, config)
  lines += _accuracy_lines(labels_sorted, acc, names, pipelines)
  lines += _paired_lines(labels_sorted, paired, paired_table(sens_cells), names, pipelines,
                         devices)
  if drift:
    lines += _drift_lines(drift, names, devices)
  if solver:
    lines += _solver_lines(solver, names, pipelines)
  if plot_name:
    lines += [f"![Test accuracy against labels per class]({plot_name})", "",
              "Test top-1 against labelled images per class (log scale; 'all' is the "
              "whole training split), mean over seeds with a ±1 std band.", ""]
  lines += ["## What this says", ""] + summary_lines(
      labels_sorted, paired, names, drift, devices)
  if solver:
    lines.append(_residual_share_line(solver, names, pipelines, config))
  if config is not None:
    lines += _incomplete_lines(acc, names, config)
  lines.append("")
  return "\n".join(lines + _reproducing_lines())


def _title_lines(records, sens_cells, command) -> List[str]:
  wall = sum(float(r.get("wall_time_s", 0.0)) for r in records)
  load = " / ".join(f"{x:.2f}" for x in os.getloadavg())
  return [
      "# Does BiSSL help on the digits, and when?",
      "",
      f"Produced by `{command}` on {datetime.date.today().isoformat()} on this machine "
      f"({_machine()}; load average {load} when this page was written). "
      f"{len([r for r in records if int(r.get('devices', 1)) == 1])} grid cells and "
      f"{sum(len(s) for s in sens_cells.values())} sensitivity cells finished, "
      f"{wall / 60:.0f} min of cell wall time (pretext pretraining excluded).",
      ""]


def _setup_lines(records, config) -> List[str]:
  p = config.pipeline
  full = max((int(r["train_examples"]) for r in records
              if int(r["labels_per_class"]) == ALL), default="all")
  variants = ", ".join(f"`{k}` ({', '.join(f'{a}={b}' for a, b in v.items())})"
                       for k, v in p.bissl_variants.items())
  return [
      "**Setup.** Downstream and pretext data: scikit-learn's digits at "
      f"{p.data.image_size} px ({full} training images; validation and test are "
      "the fixed stratified splits of `data.split_seed`). Every seed "
      f"pretrains one SimCLR model ({p.pretext.epochs} epochs on all {full} training "
      "images, no labels; BatchNorm "
      f"`{p.pretext.bn_grouping}`), which every cell and method of that seed starts "
      "from. A cell keeps *L* labelled training images per class (drawn with the seed; "
      "the subsets of one seed are nested); validation (best fine-tuning epoch) and "
      f"test are the full splits. ResNet-18 at width {p.model.width_multiplier}. Head "
      f"warm-up ≥ {config.study.head_warmup_steps} steps and ≥ {p.head_warmup.epochs:g} "
      f"epochs, fine-tuning ≥ {config.study.finetune_steps} steps and ≥ "
      f"{p.finetune.epochs:g} epochs (few labels make one-step epochs), batch "
      f"{p.finetune.batch_size}, LR {p.finetune.lr}, weight decay "
      f"{p.finetune.weight_decay} for every method. BiSSL: T={p.bissl.alternations} "
      f"alternations of N_L={p.bissl.lower_steps} lower and N_U={p.bissl.upper_steps} "
      f"upper steps, {p.bissl.cg_iters} solver iterations, λ={p.bissl.lam}, "
      f"δ={p.bissl.damping}. BiSSL+FT uses `{p.bissl.solver}` (the paper's); the "
      f"other rows change only the hypergradient (its solver, preconditioner or upper-level "
      f"method): {variants}.",
      ""]


def _accuracy_lines(labels_sorted, acc, names, pipelines) -> List[str]:
  lines = []
  lines += ["## Test top-1 accuracy (%), mean ± std over seeds", ""]
  header = ["Labels per class"] + [names[p] for p in pipelines] + ["Seeds"]
  lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  for labels in labels_sorted:
    row = [_labels_name(labels)]
    most = max(s["n"] for s in acc[labels].values())
    for p in pipelines:
      s = acc[labels].get(p)
      fewer = f" (n={s['n']})" if s and s["n"] < most else ""
      row.append(f"{_pct(s['mean'])} ± {_pct(s['std'])}{fewer}" if s else "")
    row.append(str(most))
    lines.append("| " + " | ".join(row) + " |")
  return lines


def _paired_lines(labels_sorted, paired, sens_paired, names, pipelines, devices
                  ) -> List[str]:
  lines = ["", "## Paired difference vs. Only FT (percentage points)", "",
            "Paired by seed (the same pretext model, labelled subset, head initialisation "
            "and data order): mean of (method − Only FT), its 95% confidence interval "
            "(t distribution, n − 1 degrees of freedom), the seeds where the method won, "
            "and the verdict (an interval that contains 0 means no detectable difference).",
            ""]
  others = [p for p in pipelines if p != BASELINE]
  header = ["Labels per class"] + [names[p] for p in others]
  lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]

  def paired_row(title, table):
    row = [title]
    for p in others:
      d = table.get(p)
      interval = (f"[{100 * d['low']:+.1f}, {100 * d['high']:+.1f}]"
                  if d and np.isfinite(d["low"]) else "[n/a]")
      row.append(f"{100 * d['mean']:+.1f} {interval} {d['wins']}/{d['n']} {verdict(d)}"
                 if d else "")
    return "| " + " | ".join(row) + " |"

  for labels in labels_sorted:
    lines.append(paired_row(_labels_name(labels), paired[labels]))
  for labels in sorted(sens_paired, key=_label_sort):
    lines.append(paired_row(f"{_labels_name(labels)}, on {devices} simulated devices",
                            sens_paired[labels]))
  lines.append("")
  return lines


def _drift_lines(drift, names, devices) -> List[str]:
  lines = ["## Noise floor: the same cells with another float rounding", "",
            f"The cells below were rerun on {devices} simulated CPU devices "
            f"(`XLA_FLAGS=--xla_force_host_platform_device_count={devices}`: the same "
            "batches, random numbers and global-batch BatchNorm statistics, only the "
            "summation order of the data-parallel reductions differs), from the same "
            "pretext models. |accuracy on "
            f"{devices} devices − accuracy on 1 device| per seed, in percentage points:",
            ""]
  header = ["Labels per class"] + [names[p] for p in _order(
      p for t in drift.values() for p in t)]
  lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  for labels, table in sorted(drift.items(), key=lambda kv: _label_sort(kv[0])):
    row = [_labels_name(labels)] + [
        f"mean {_pct(d['mean_abs'])}, max {_pct(d['max_abs'])} (n={d['n']})"
        for _, d in sorted(table.items(), key=lambda kv: _order(table).index(kv[0]))]
    lines.append("| " + " | ".join(row) + " |")
  lines.append("")
  return lines


def _solver_lines(solver, names, pipelines) -> List[str]:
  lines = ["## Implicit-gradient solves per method", "",
            "Over every alternation of every grid cell: the relative residual "
            "‖A·v_IG − v‖/‖v‖ of the solve (mean over an alternation's upper steps; "
            "above 1 the solution is further from solving the system than 0 is), "
            "‖v_IG‖/‖v‖, the smallest curvature p·Ap/p·p the solver met (negative: "
            "the damped operator is indefinite there) and the final ‖θ_P − θ_D‖.",
            "",
            "| Method | Alternations | Residual median | p90 | max | Share > 1 | "
            "‖v_IG‖/‖v‖ median | Min curvature | ‖θ_P − θ_D‖ |",
            "|---|---|---|---|---|---|---|---|---|"]
  for p in [p for p in pipelines if p in solver]:
    s = solver[p]
    lines.append(f"| {names[p]} | {s['alternations']} | {_fmt(s['residual_median'])} | "
                 f"{_fmt(s['residual_p90'])} | {_fmt(s['residual_max'])} | "
                 f"{_percent(s['share_above_1'])} | {_fmt(s['ratio_median'])} | "
                 f"{_fmt(s['min_curvature'])} | {_fmt(s['theta_distance'])} |")
  lines += ["", "For every operator solver (layer-wise CG, CG, MINRES with or without a "
            "preconditioner, Neumann, first order) the residual is against the damped "
            "Hessian system of the paper. M-FAC, K-FAC and EK-FAC solve another system "
            "exactly (their curvature model: the empirical Fisher of M-FAC's stored "
            "pretext gradients, K-FAC's Kronecker-factored blocks), so their residual, "
            "against that model, is ~0 by construction and says nothing about the "
            "Hessian; first order returns v itself, so its residual is ‖A·v − v‖/‖v‖, "
            "how far the Hessian term moves the solution; the penalty method solves no "
            "system.",
            ""]
  return lines


def hessian_system_pipelines(pipelines, config=None) -> List[str]:
  """The pipelines whose solve is of the damped Hessian system (an operator solver
  other than first order, under the implicit upper method): those a residual above 1
  says something about. Read from the config's variants when given, else from the
  pipeline names (``bissl_<variant>``, the variant named after its solver)."""
  from bissl_jax.implicit.solvers import REGISTRY  # pylint: disable=g-import-not-at-top
  out = []
  for p in pipelines:
    if p != "bissl" and not p.startswith("bissl_"):
      continue
    variant = p[len("bissl_"):]
    if config is not None:
      settings = dict(config.pipeline.bissl.to_dict())
      settings.update(dict(config.pipeline.bissl_variants.get(variant, {})) if variant
                      else {})
    else:
      settings = {"solver": variant if variant in REGISTRY else "layerwise_cg",
                  "upper_method": "penalty" if variant == "penalty" else "implicit"}
    solver = settings.get("solver", "layerwise_cg")
    if (settings.get("upper_method", "implicit") == "implicit" and solver != "first_order"
        and solver in REGISTRY and REGISTRY[solver].needs == "operator"):
      out.append(p)
  return out


def _residual_share_line(solver, names, pipelines, config=None) -> str:
  shares = ", ".join(f"{names[p]} {100 * solver[p]['share_above_1']:.0f}% (median "
                     f"{_fmt(solver[p]['residual_median'])})"
                     for p in hessian_system_pipelines(pipelines, config) if p in solver)
  return (f"- Share of alternations whose solve of the damped Hessian system ends with a "
          f"relative residual above 1 (v_IG further from the solution than 0): {shares}.")


def _incomplete_lines(acc, names, config) -> List[str]:
  lines = []
  seeds = len(config.study.seeds)
  short = sorted({names[p] for t in acc.values() for p, st in t.items() if st["n"] < seeds})
  missing = sorted(set(config.pipeline.bissl_variants) - {
      p[len("bissl_"):] for p in names if p.startswith("bissl_")})
  if short:
    lines.append(f"- Stopped before every cell had all {seeds} seeds: "
                 f"{', '.join(short)} (their n is given above).")
  if missing:
    lines.append(f"- Configured but not run (the study was stopped first): "
                 f"{', '.join(missing)}.")
  return lines


def _reproducing_lines() -> List[str]:
  return [
      "## Reproducing it", "",
      "Rerunning the command resumes: a finished cell (`cell.json`) is loaded, an "
      "unfinished one continues from its stage checkpoints. On one machine and backend "
      "the same config and seed give the same bits, across reruns and across "
      "kill-and-resume: `tests/pipeline/test_study.py` stops a study in the middle of a BiSSL "
      "stage, resumes it, and compares every cell with an uninterrupted study in a "
      "fresh directory (equal to the last bit), and runs the tiny pipeline twice "
      "(equal `results.json`). What is pinned for that is listed in "
      "`bissl_jax/runtime/determinism.py`. Another CPU model, a GPU or another device count "
      "rounds differently; the noise-floor table above measures how much that moves "
      "the results.", ""]


def summary_lines(labels_sorted, paired, names, drift, devices) -> List[str]:
  """The verdicts in sentences, read off the tables (nothing added by hand)."""
  out = []
  for labels in labels_sorted:
    words = {}
    for p, d in paired[labels].items():
      words.setdefault(verdict(d), []).append(f"{names[p]} ({100 * d['mean']:+.1f})")
    parts = "; ".join(f"{v}: {', '.join(ps)}" for v, ps in sorted(words.items()))
    out.append(f"- {_labels_name(labels)} labels per class — {parts}.")
  tested = [d for labels in labels_sorted for d in paired[labels].values()
            if verdict(d) != "too few seeds"]
  if tested:
    excluding = sum(verdict(d) in ("better", "worse") for d in tested)
    out.append(f"- {excluding} of the {len(tested)} intervals above exclude 0. Each is a "
               f"95% interval, so with no real difference anywhere about "
               f"{0.05 * len(tested):.1f} of {len(tested)} would exclude 0 by chance alone.")
  floor = [d["max_abs"] for t in drift.values() for d in t.values()]
  if floor:
    out.append(f"- Float rounding alone ({devices} devices instead of 1) moves a single "
               f"run's test accuracy by up to {100 * max(floor):.1f} points; a difference "
               "smaller than that, or an interval that straddles 0, is not evidence "
               "either way.")
  return out


def write_report(records: Sequence[Mapping], path: str, *, config=None,
                 workdir: Optional[str] = None) -> str:
  """Writes the Markdown report, its plot (``<stem>_accuracy.png``) and raw data CSVs next to it."""
  del workdir
  os.makedirs(os.path.dirname(os.path.abspath(path)) or ".", exist_ok=True)
  stem = os.path.splitext(os.path.basename(path))[0]
  plot_name = f"{stem}_accuracy.png"
  plot_path = os.path.join(os.path.dirname(os.path.abspath(path)), plot_name)
  drawn = plot_accuracy(records, plot_path)
  text = to_markdown(records, config=config, plot_name=plot_name if drawn else None)
  text += "\n".join(study_data.raw_data_lines(path))
  study_data.write_csvs(records, path, SOLVER_KEYS)
  with open(path, "w") as f:
    f.write(text)
  return text


def plot_accuracy(records: Sequence[Mapping], out_path: str) -> Optional[str]:
  """Accuracy against labels per class, one line per method (``plots.plot_band_lines``)."""
  from bissl_jax.evaluation import plots  # pylint: disable=g-import-not-at-top  (matplotlib here only)
  cells = by_cell(records, 1)
  if not cells:
    return None
  names = {p: lab for r in records for p, lab in r["labels"].items()}
  full = max((r["train_examples"] for s in cells.values() for r in s.values()
              if int(r["labels_per_class"]) == ALL), default=None)
  classes = 10
  xs, ticks = {}, {}
  for labels in cells:
    x = (full / classes if full else 1e3) if labels == ALL else labels
    xs[labels] = x
    ticks[x] = "all" if labels == ALL else str(labels)
  series = {}
  for p in _order(p for s in cells.values() for r in s.values() for p in r["test"]):
    points = []
    for labels in sorted(cells, key=_label_sort):
      values = [r["test"][p] for r in cells[labels].values() if p in r["test"]]
      if values:
        points.append((xs[labels], 100 * float(np.mean(values)),
                       100 * float(np.std(values, ddof=1)) if len(values) > 1 else 0.0))
    series[names[p]] = points
  return plots.plot_band_lines(series, out_path, xlabel="labelled training images per class",
                               ylabel="test top-1 (%)", ticks=ticks, log_x=True,
                               title="Digits: test accuracy vs. labels per class")
