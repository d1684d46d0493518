"""The study's raw data as CSV files next to its report, so every table can be recomputed.

Two files, both one row per measured value, nothing aggregated:

* ``<stem>_cells.csv``: one row per (cell, method): labels per class (``all``: the
  whole training split), seed, device count, training images, the method's pipeline
  key and label, the test metric's name and value (a fraction, not a percentage) and
  the cell's wall time. The accuracy, paired-difference and noise-floor tables of the
  report are means, standard deviations and t intervals of these values, paired by
  (labels per class, seed).
* ``<stem>_solves.csv``: one row per (cell, BiSSL method, alternation): the solver
  metrics that the pipeline logged for that alternation (means over its upper steps;
  ``study.SOLVER_KEYS``). The report's solver table is computed from these rows.

Empty cells in a row mean "not measured" (e.g. no curvature for first order).
"""
import csv
import math
import os
from typing import List, Mapping, Sequence

CELL_COLUMNS = ("labels_per_class", "seed", "devices", "train_examples", "method", "label",
                "metric", "test", "cell_wall_time_s")
SOLVE_COLUMNS = ("labels_per_class", "seed", "devices", "method", "alternation")


def _labels(record: Mapping) -> str:
  labels = int(record["labels_per_class"])
  return "all" if labels == 0 else str(labels)


def _number(x) -> str:
  x = float(x)
  return "" if not math.isfinite(x) else repr(x)


def _sorted(records: Sequence[Mapping]) -> List[Mapping]:
  return sorted(records, key=lambda r: (int(r.get("devices", 1)),
                                        int(r["labels_per_class"]) or 10**9, int(r["seed"])))


def cell_rows(records: Sequence[Mapping]) -> List[dict]:
  """One dict per (cell, method), in ``CELL_COLUMNS``."""
  rows = []
  for r in _sorted(records):
    for method in sorted(r["test"]):
      rows.append({"labels_per_class": _labels(r), "seed": int(r["seed"]),
                   "devices": int(r.get("devices", 1)),
                   "train_examples": int(r["train_examples"]), "method": method,
                   "label": r["labels"][method], "metric": r["metric"],
                   "test": _number(r["test"][method]),
                   "cell_wall_time_s": _number(r.get("wall_time_s", float("nan")))})
  return rows


def solve_rows(records: Sequence[Mapping], keys: Sequence[str]) -> List[dict]:
  """One dict per (cell, BiSSL method, alternation), in ``SOLVE_COLUMNS + keys``."""
  rows = []
  for r in _sorted(records):
    for method in sorted(r.get("solver", {})):
      per_key = r["solver"][method]
      count = max((len(per_key.get(k, ())) for k in keys), default=0)
      for t in range(count):
        row = {"labels_per_class": _labels(r), "seed": int(r["seed"]),
               "devices": int(r.get("devices", 1)), "method": method, "alternation": t + 1}
        for k in keys:
          values = per_key.get(k, ())
          row[k] = _number(values[t]) if t < len(values) else ""
        rows.append(row)
  return rows


def csv_paths(report_path: str) -> Mapping[str, str]:
  """``{'cells': ..., 'solves': ...}``: the CSV files that go with ``report_path``."""
  stem = os.path.splitext(os.path.abspath(report_path))[0]
  return {"cells": f"{stem}_cells.csv", "solves": f"{stem}_solves.csv"}


def _write(path: str, columns: Sequence[str], rows: Sequence[Mapping]) -> None:
  tmp = f"{path}.tmp"
  with open(tmp, "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=list(columns), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
  os.replace(tmp, path)   # a reader never sees half a file


def write_csvs(records: Sequence[Mapping], report_path: str,
               solver_keys: Sequence[str]) -> Mapping[str, str]:
  """Writes both CSV files next to ``report_path``; returns their paths."""
  paths = csv_paths(report_path)
  _write(paths["cells"], CELL_COLUMNS, cell_rows(records))
  _write(paths["solves"], tuple(SOLVE_COLUMNS) + tuple(solver_keys),
         solve_rows(records, solver_keys))
  return paths


def raw_data_lines(report_path: str) -> List[str]:
  """The report's paragraph that names the CSV files."""
  paths = {k: os.path.basename(v) for k, v in csv_paths(report_path).items()}
  return [
      "## Raw data", "",
      f"[`{paths['cells']}`]({paths['cells']}): every cell's test metric per method and "
      "seed (a fraction; the tables above are its means, standard deviations and paired t "
      f"intervals). [`{paths['solves']}`]({paths['solves']}): every alternation's solver "
      "metrics per cell and method (the solver table's source). Empty fields were not "
      "measured.", ""]
