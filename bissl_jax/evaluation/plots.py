"""Training-curve plots (PNG) written at the end of a run.

Figures are drawn on matplotlib's Agg canvas directly (``matplotlib.figure.Figure``
plus ``FigureCanvasAgg``), never through ``pyplot``: no global backend is switched,
nothing is left open, and the functions work headless and inside notebooks alike.

* :func:`plot_bissl_curves`: per-alternation BiSSL diagnostics — lower/upper losses,
  the CG residual (log scale) and ``‖θ_P − θ_D‖``, one PNG per available panel.
* :func:`plot_validation_curves`: validation accuracy per epoch for the baseline and
  BiSSL+FT, several seeds drawn as a mean line with a ±1 std band.
* :func:`read_jsonl`: reads metric logs written one JSON object per line.
"""
import json
import math
import os
from typing import List, Mapping, Optional, Sequence, Tuple

import numpy as np


# ----------------------------------------------------------------------------- helpers

def new_figure(nrows: int = 1, ncols: int = 1, *, figsize: Tuple[float, float] = (6.0, 4.0),
               **subplot_kw):
  """A figure on its own Agg canvas and a 2-D array of axes (``squeeze=False``)."""
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure
  fig = Figure(figsize=figsize)
  FigureCanvasAgg(fig)
  axes = fig.subplots(nrows, ncols, squeeze=False, **subplot_kw)
  return fig, axes


def save_figure(fig, path: str, *, dpi: int = 120) -> str:
  """Writes ``fig`` as PNG to ``path`` (parent folders created) and returns ``path``."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.savefig(path, dpi=dpi, format="png")
  return path


def _integer_ticks():
  from matplotlib.ticker import MaxNLocator
  return MaxNLocator(integer=True)


def read_jsonl(path: str) -> List[dict]:
  """Reads one JSON object per line; blank lines are skipped.

  A malformed *last* line is dropped (a run killed mid-write leaves one); a
  malformed line elsewhere raises ``ValueError`` naming the file and line.
  """
  with open(path) as f:
    lines = f.read().splitlines()
  records = []
  for number, line in enumerate(lines, start=1):
    if not line.strip():
      continue
    try:
      records.append(json.loads(line))
    except json.JSONDecodeError as err:
      if all(not rest.strip() for rest in lines[number:]):
        break  # truncated final record
      raise ValueError(f"{path}:{number}: not a JSON object ({err}).") from err
  return records


def _finite(x) -> Optional[float]:
  """``float(x)`` if x is a finite number (or 0-d/1-element array), else None."""
  try:
    value = float(np.asarray(x, np.float64).reshape(()))
  except (TypeError, ValueError):
    return None
  return value if math.isfinite(value) else None


def _series(history: Sequence[dict], key: str) -> Tuple[np.ndarray, np.ndarray]:
  """(x, y) over the records holding a finite ``key``.

  x is the record's 'alternation', else its 'step' (as in ``metrics.jsonl``), else
  its index in ``history``.
  """
  xs, ys = [], []
  for i, record in enumerate(history):
    y = _finite(record.get(key)) if key in record else None
    if y is None:
      continue
    x = _finite(record.get("alternation", record.get("step", i)))
    xs.append(i if x is None else x)
    ys.append(y)
  return np.asarray(xs), np.asarray(ys)


# ----------------------------------------------------------------------------- BiSSL curves

# (file stem, title, y label, keys drawn, log y)
_BISSL_PANELS = (
    ("bissl_losses", "BiSSL losses", "loss", (("lower_loss", "lower (pretext)"),
                                            ("upper_loss", "upper (downstream)")), False),
    ("bissl_cg_residual", "CG relative residual ‖Ax − v‖/‖v‖", "residual",
     (("cg_residual", "cg_residual"),), True),
    ("bissl_theta_distance", "‖θ_P − θ_D‖", "distance",
     (("theta_distance", "‖θ_P − θ_D‖"),), False),
)


def plot_bissl_curves(history: Sequence[dict], out_dir: str) -> List[str]:
  """Plots per-alternation BiSSL diagnostics, one PNG per panel.

  Args:
    history: per-alternation records with keys among 'alternation', 'lower_loss',
      'upper_loss', 'cg_residual', 'theta_distance'. A panel whose keys never hold a
      finite number is skipped. Without 'alternation' the x value is 'step' (the
      records of ``metrics.jsonl``) or the record index.
    out_dir: folder for ``bissl_losses.png``, ``bissl_cg_residual.png`` and
      ``bissl_theta_distance.png``.

  Returns:
    Paths of the PNGs written (possibly empty).
  """
  paths = []
  for stem, title, ylabel, keys, log_y in _BISSL_PANELS:
    series = [(label,) + _series(history, key) for key, label in keys]
    series = [s for s in series if len(s[1])]
    if not series:
      continue
    fig, axes = new_figure()
    ax = axes[0, 0]
    for label, x, y in series:
      ax.plot(x, y, marker="o" if len(x) <= 30 else None, markersize=3, label=label)
    if log_y and all(np.all(y > 0) for _, _, y in series):
      ax.set_yscale("log")  # a zero residual (exact solve) cannot go on a log axis
    ax.xaxis.set_major_locator(_integer_ticks())
    ax.set_xlabel("alternation")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if len(series) > 1:
      ax.legend()
    fig.tight_layout()
    paths.append(save_figure(fig, os.path.join(out_dir, stem + ".png")))
  return paths


# ----------------------------------------------------------------------------- validation

def _as_seed_matrix(values) -> np.ndarray:
  """``(seeds, epochs)`` from one curve or a list of per-seed curves (cut to the shortest)."""
  if len(values) and isinstance(values[0], (list, tuple, np.ndarray)):
    runs = [np.asarray(v, np.float64).ravel() for v in values if len(v)]
    if not runs:
      return np.zeros((0, 0))
    length = min(len(r) for r in runs)
    return np.stack([r[:length] for r in runs])
  return np.asarray(values, np.float64).reshape(1, -1)


def plot_validation_curves(curves: Mapping[str, Sequence], out_path: str, *,
                           ylabel: str = "validation accuracy",
                           title: str = "Fine-tuning: validation accuracy per epoch") -> Optional[str]:
  """Plots validation accuracy per epoch, one line per pipeline.

  Args:
    curves: ``{name: per-epoch values}`` (e.g. 'baseline', 'BiSSL+FT'); a value may
      also be a list of per-seed curves, drawn as the mean with a ±1 std band
      (seeds are cut to the shortest curve). Empty curves are skipped.
    out_path: PNG path.
    ylabel: y-axis label.
    title: figure title.

  Returns:
    ``out_path``, or None when no curve has any point.
  """
  fig, axes = new_figure()
  ax = axes[0, 0]
  drawn = 0
  for name, values in curves.items():
    runs = _as_seed_matrix(list(values))
    if runs.size == 0:
      continue
    epochs = np.arange(1, runs.shape[1] + 1)
    mean = runs.mean(axis=0)
    label = name if len(runs) == 1 else f"{name} (mean ± std, {len(runs)} seeds)"
    (line,) = ax.plot(epochs, mean, label=label, marker="o" if len(epochs) <= 30 else None,
                      markersize=3)
    if len(runs) > 1:
      std = runs.std(axis=0)
      ax.fill_between(epochs, mean - std, mean + std, color=line.get_color(), alpha=0.2)
    drawn += 1
  if not drawn:
    return None
  ax.xaxis.set_major_locator(_integer_ticks())
  ax.set_xlabel("epoch")
  ax.set_ylabel(ylabel)
  ax.set_title(title)
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  return save_figure(fig, out_path)


# ----------------------------------------------------------------------------- whole run

_PIPELINE_LABELS = {"baseline": "baseline (Only FT)", "bissl": "BiSSL+FT"}


def plot_run(workdir: str, out_dir: Optional[str] = None) -> List[str]:
  """All curves of a pipeline run, read from ``<workdir>/metrics.jsonl``.

  Uses the stage names the pipeline logs under: ``bissl/seed<s>`` (per-alternation
  BiSSL metrics, step = alternation) and ``finetune/<pipeline>/seed<s>/val``
  (validation metrics per epoch; 'score' is top-1, or mAP for multi-label sets).

  Args:
    workdir: the run directory.
    out_dir: where the PNGs go (default ``<workdir>/plots``). BiSSL curves of seed s
      go to ``out_dir/seed<s>/``; the validation curves of every seed (mean ± std
      over seeds) to ``out_dir/validation.png``.

  Returns:
    Paths of the PNGs written (empty when the log holds none of these stages).
  """
  out_dir = out_dir or os.path.join(workdir, "plots")
  path = os.path.join(workdir, "metrics.jsonl")
  records = read_jsonl(path) if os.path.exists(path) else []
  bissl: dict = {}
  val: dict = {}
  for record in records:
    parts = str(record.get("stage", "")).split("/")
    if len(parts) == 2 and parts[0] == "bissl":
      bissl.setdefault(parts[1], []).append(record)
    elif len(parts) == 4 and parts[0] == "finetune" and parts[3] == "val":
      val.setdefault(parts[1], {}).setdefault(parts[2], {})[int(record["step"])] = record
  paths = []
  for seed in sorted(bissl):
    # A resumed run logs some alternations twice; keep the last record of each.
    last = {int(r["step"]): r for r in bissl[seed]}
    paths += plot_bissl_curves([last[s] for s in sorted(last)], os.path.join(out_dir, seed))
  curves = {}
  for pipeline in sorted(val, key=lambda p: (p != "baseline", p)):
    runs = [[by_epoch[e]["score"] for e in sorted(by_epoch)
             if _finite(by_epoch[e].get("score")) is not None]
            for _, by_epoch in sorted(val[pipeline].items())]
    curves[_PIPELINE_LABELS.get(pipeline, pipeline)] = runs
  if curves:
    written = plot_validation_curves(curves, os.path.join(out_dir, "validation.png"),
                                     ylabel="validation score (top-1 or mAP)")
    paths += [written] if written else []
  return paths


# ----------------------------------------------------------------------------- study

def plot_band_lines(series: Mapping[str, Sequence[Tuple[float, float, float]]], out_path: str,
                    *, xlabel: str, ylabel: str, title: str,
                    ticks: Optional[Mapping[float, str]] = None,
                    log_x: bool = False) -> Optional[str]:
  """One line per name through ``(x, mean, std)`` points, with a ±std band.

  Args:
    series: ``{name: [(x, mean, std), ...]}`` (points sorted by x); empty ones skipped.
    out_path: PNG path.
    xlabel: x-axis label.
    ylabel: y-axis label.
    title: figure title.
    ticks: optional ``{x: label}`` tick labels (e.g. 'all' for the whole split).
    log_x: logarithmic x axis.

  Returns:
    ``out_path``, or None when no series has a point.
  """
  fig, axes = new_figure(figsize=(6.5, 4.5))
  ax = axes[0, 0]
  drawn = 0
  for name, points in series.items():
    if not points:
      continue
    x, mean, std = (np.asarray(v, np.float64) for v in zip(*points))
    (line,) = ax.plot(x, mean, marker="o", markersize=3, label=name)
    ax.fill_between(x, mean - std, mean + std, color=line.get_color(), alpha=0.15)
    drawn += 1
  if not drawn:
    return None
  if log_x:
    ax.set_xscale("log")
  if ticks:
    ax.set_xticks(sorted(ticks))
    ax.set_xticklabels([ticks[k] for k in sorted(ticks)])
    ax.minorticks_off()
  ax.set_xlabel(xlabel)
  ax.set_ylabel(ylabel)
  ax.set_title(title)
  ax.grid(alpha=0.3)
  ax.legend(fontsize="small")
  fig.tight_layout()
  return save_figure(fig, out_path)
