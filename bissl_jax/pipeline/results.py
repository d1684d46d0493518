"""Result tables of a comparison: ``results.json`` and ``results.md`` in the workdir.

The JSON record::

  {"metric": "top1" | "map", "datasets": {...}, "seeds": [...],
   "pipelines": {"baseline": {"label": "Only FT", "hyperparams": {...},
                              "per_seed": {"0": {"top1": ..., "top5": ..., "val": ...}},
                              "summary": {"top1": {"mean", "std", "n"}, ...}},
                 "bissl": {...}},
   "difference": {"top1": mean(bissl) − mean(baseline), ...}, "wall_time_s": ...}

Accuracies are fractions in [0, 1]; the Markdown table shows percentages as
``mean ± std`` (sample std, ddof=1, from ``bissl_jax.evaluation.metrics.summarize``) in the
layout of Table 1 of the paper.
"""
import hashlib
import json
import os
from typing import Dict, Mapping, Optional

from bissl_jax.evaluation.metrics import summarize
from bissl_jax.runtime import mesh

PIPELINE_LABELS = {"baseline": "Only FT", "bissl": "BiSSL+FT"}
VARIANT_PREFIX = "bissl_"  # pipelines of config.bissl_variants: 'bissl_<name>'


def pipeline_label(pipeline: str) -> str:
  """'Only FT', 'BiSSL+FT', or 'BiSSL+FT (<variant>)'."""
  if pipeline in PIPELINE_LABELS:
    return PIPELINE_LABELS[pipeline]
  if pipeline.startswith(VARIANT_PREFIX):
    return f"BiSSL+FT ({pipeline[len(VARIANT_PREFIX):]})"
  return pipeline


def metric_names(multilabel: bool) -> tuple:
  """The reported test metrics: 11-point mAP for multi-label sets, else top-1/top-5."""
  return ("map",) if multilabel else ("top1", "top5")


def build_results(per_seed: Mapping[str, Mapping[int, Mapping[str, float]]], *,
                  multilabel: bool, hyperparams: Mapping[str, Mapping[str, float]],
                  info: Mapping[str, object], names: Optional[tuple] = None) -> dict:
  """Assembles the results record.

  Args:
    per_seed: ``{pipeline: {seed: {'top1': ..., 'top5': ..., 'val': ...}}}``.
    multilabel: selects the metrics (mAP vs top-1/top-5).
    hyperparams: ``{pipeline: {'lr': ..., 'weight_decay': ...}}`` used to fine-tune.
    info: extra top-level fields (datasets, seeds, wall time, ...).
    names: the metrics to report, headline first (None: :func:`metric_names`; text
      runs give the GLUE metric, e.g. ``('matthews', 'accuracy')``).

  Returns:
    The JSON-serialisable record.
  """
  rows_all = [m for seeds in per_seed.values() for m in seeds.values()]
  # top-5 is undefined with fewer than 5 classes (bissl_jax.evaluation.metrics leaves it out).
  names = tuple(n for n in (names or metric_names(multilabel))
                if all(n in m for m in rows_all))
  out = dict(info)
  out["metric"] = names[0]
  out["metrics"] = list(names)
  out["pipelines"] = {}
  for pipeline, seeds in per_seed.items():
    rows = {str(s): {k: float(v) for k, v in m.items()} for s, m in sorted(seeds.items())}
    summary = {name: summarize([m[name] for m in rows.values()]) for name in names}
    out["pipelines"][pipeline] = {
        "label": pipeline_label(pipeline),
        "hyperparams": dict(hyperparams.get(pipeline, {})),
        "per_seed": rows, "summary": summary}
  if {"baseline", "bissl"} <= set(out["pipelines"]):
    base, bissl = out["pipelines"]["baseline"], out["pipelines"]["bissl"]
    out["difference"] = {name: bissl["summary"][name]["mean"] - base["summary"][name]["mean"]
                         for name in names}
  return out


def _pct(stat: dict) -> str:
  return f"{100 * stat['mean']:.1f} ± {100 * stat['std']:.1f}"


def to_markdown(results: Mapping[str, object]) -> str:
  """A Markdown table in the layout of the paper's Table 1 (percentages)."""
  pipelines: Dict[str, dict] = results["pipelines"]
  names = tuple(results.get("metrics", metric_names(results["metric"] == "map")))
  titles = {"top1": "Test top-1 (%)", "top5": "Test top-5 (%)", "map": "Test 11-pt mAP (%)",
            "accuracy": "Test accuracy (%)", "f1": "Test F1 (%)",
            "matthews": "Test Matthews corr. (×100)",
            "ap50": "Test AP50 (%, VOC07 11-pt)", "pearson": "Test Pearson (×100)"}
  lines = []
  if "downstream_dataset" in results:
    lines.append(f"Downstream: **{results['downstream_dataset']}**, pretext: "
                 f"**{results.get('pretext_dataset', '?')}** "
                 f"({results.get('pretext_task', '?')}), seeds: {results.get('seeds')}")
    lines.append("")
  header = ["Pipeline"] + [titles[n] for n in names] + ["Seeds", "FT lr", "FT wd"]
  lines.append("| " + " | ".join(header) + " |")
  lines.append("|" + "---|" * len(header))
  for p in pipelines.values():
    hp = p["hyperparams"]
    cells = [p["label"]] + [_pct(p["summary"][n]) for n in names]
    cells += [str(p["summary"][names[0]]["n"]), f"{hp.get('lr', float('nan')):.4g}",
              f"{hp.get('weight_decay', float('nan')):.4g}"]
    lines.append("| " + " | ".join(cells) + " |")
  if "difference" in results:
    diff = results["difference"]
    cells = ["Avg Diff"] + [f"{100 * diff[n]:+.1f}" for n in names] + ["", "", ""]
    lines.append("| " + " | ".join(cells) + " |")
  lines.append("")
  lines.append("Per seed (test " + names[0] + ", %):")
  lines.append("")
  for p in pipelines.values():
    per = ", ".join(f"seed {s}: {100 * m[names[0]]:.1f}" for s, m in p["per_seed"].items())
    lines.append(f"- {p['label']}: {per}")
  if "wall_time_s" in results:
    lines.append("")
    lines.append(f"Wall time: {results['wall_time_s']:.0f} s (until the run first "
                 "completed, summed over its interrupted invocations).")
    if results.get("resumed_wall_time_s"):
      later = ", ".join(f"{s:.0f} s" for s in results["resumed_wall_time_s"])
      lines.append(f"Reruns after completion: {later}.")
  return "\n".join(lines) + "\n"


def write_results(workdir: str, results: Mapping[str, object]) -> str:
  """Writes ``results.json`` (checksummed, :func:`write_json`) and ``results.md``;
  returns the Markdown text."""
  write_json(os.path.join(workdir, "results.json"), results)
  text = to_markdown(results)
  with open(os.path.join(workdir, "results.md"), "w") as f:
    f.write(text)
  return text


WALL_TIMES_FILE = "wall_times.json"  # one entry per invocation of a comparison run


def wall_times(invocations, previous: Optional[Mapping] = None) -> dict:
  """``wall_time_s`` and ``resumed_wall_time_s`` of a run from its invocations.

  ``wall_time_s`` is the time until the run first finished: every invocation up to
  and including the first finished one (an interrupted run resumed later counts
  both parts). Each later invocation (a rerun of a finished workdir, which only
  reloads the stage outputs) goes into ``resumed_wall_time_s`` and never replaces
  the original time.

  Args:
    invocations: ``[{'seconds', 'finished'}]`` in order (written by
      ``bissl_jax.pipeline.invocation_clock``; a killed invocation's entry holds its
      time up to its last heartbeat).
    previous: the ``results.json`` already in the workdir, if any. A workdir written
      before invocations were recorded keeps that file's ``wall_time_s``.

  Returns:
    ``{'wall_time_s': float, 'resumed_wall_time_s': [float, ...]}``.
  """
  first = next((i for i, e in enumerate(invocations) if e["finished"]), None)
  if first is None:
    raise ValueError("wall_times: no finished invocation.")
  if previous and "wall_time_s" in previous and first == len(invocations) - 1:
    # A finished results.json but no earlier finished invocation: the workdir was
    # written before invocations were recorded, and its time is the original one.
    return {"wall_time_s": float(previous["wall_time_s"]),
            "resumed_wall_time_s": list(previous.get("resumed_wall_time_s", []))
            + [invocations[-1]["seconds"]]}
  return {"wall_time_s": sum(e["seconds"] for e in invocations[:first + 1]),
          "resumed_wall_time_s": [e["seconds"] for e in invocations[first + 1:]]}


# Every JSON record of a run carries the SHA-256 of its own content under this key.
CHECKSUM_KEY = "checksum"


class DamagedRecordError(ValueError):
  """A JSON record is not valid JSON or does not match its checksum."""


def _record_checksum(record: Mapping) -> str:
  body = {k: v for k, v in record.items() if k != CHECKSUM_KEY}
  return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def write_json(path: str, record: Mapping) -> None:
  """Writes ``record`` to ``path`` atomically (a temporary file, then a rename), with
  its checksum (:data:`CHECKSUM_KEY`, checked by :func:`read_json`). In a multi-process
  run only process 0 writes (``mesh.is_writer``); the others hold the same record."""
  if not mesh.is_writer():
    return
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  # Through JSON first, so the checksum is of what a reader will see (tuples → lists).
  record = json.loads(json.dumps(dict(record), sort_keys=True))
  record = dict(record, **{CHECKSUM_KEY: _record_checksum(record)})
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(record, f, indent=2, sort_keys=True)
  os.replace(tmp, path)


def read_json(path: str) -> Optional[dict]:
  """The record at ``path`` (its checksum checked and removed), or None if there is none.

  Raises:
    DamagedRecordError: not a JSON object, or it does not match its checksum (a
      record written before checksums existed has none and is taken as it is).
  """
  if not os.path.exists(path):
    return None
  try:
    with open(path) as f:
      record = json.load(f)
  except (ValueError, UnicodeDecodeError) as e:
    raise DamagedRecordError(f"{path} is not valid JSON ({e})") from e
  if not isinstance(record, dict):
    raise DamagedRecordError(f"{path} holds no JSON object")
  saved = record.pop(CHECKSUM_KEY, None)
  if saved is not None and saved != _record_checksum(record):
    raise DamagedRecordError(f"{path} does not match its checksum")
  return record


def read_record(path: str, name: str) -> Optional[dict]:
  """:func:`read_json`, but a damaged record is named, set aside and treated as absent.

  It goes to ``<its directory>/superseded/<time>/`` (what a stale record gets), so
  whatever wrote it is recomputed.
  """
  try:
    return read_json(path)
  except DamagedRecordError as e:
    from bissl_jax.pipeline import provenance  # pylint: disable=g-import-not-at-top
    moved = provenance.set_aside(os.path.dirname(os.path.abspath(path)), [path])
    print(f"[{name}] {e}: it is damaged; moved it to {moved} and recomputing it.",
          flush=True)
    return None


def plot_curves(workdir: str) -> list:
  """Training-curve PNGs in ``<workdir>/plots``; a plotting failure never loses results."""
  from bissl_jax.evaluation import plots  # pylint: disable=g-import-not-at-top  (matplotlib only here)
  try:
    paths = plots.plot_run(workdir)
  except Exception as e:  # pylint: disable=broad-except
    print(f"Could not draw the training curves ({e!r}); the results are saved.", flush=True)
    return []
  if paths:
    print(f"Training curves: {os.path.join(workdir, 'plots')}", flush=True)
  return paths
