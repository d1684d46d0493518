"""GLUE tasks of the thesis (ch. 7) from local files: TFDS, Hugging Face, or JSONL.

Seven tasks: CoLA and SST-2 (classification), RTE and QNLI (entailment), MRPC, QQP
and STS-B (similarity; STS-B is a regression on 0..5). Split rule of thesis
§7.1.1: the official validation split becomes the test split; the first 80% of the
official training split (in the order the source stores it) trains and the rest
validates.

Sources, all read without TensorFlow and without any download:

- ``'tfds'``: a TFDS data directory with ``glue/<task>`` prepared
  (``tfds build glue/cola --data_dir=DIR --file_format=array_record``), read
  through :mod:`bissl_jax.data.tfds_loader`. TFDS stores examples in its own
  shuffled order, so its 80/20 cut differs from the thesis's.
- ``'hf'``: Hugging Face files, either a snapshot of the ``nyu-mll/glue`` dataset
  repository (``DIR/<task>/<split>-*.parquet``), a ``DatasetDict.save_to_disk``
  directory per task (``DIR/<task>/<split>/*.arrow``), or a ``datasets`` cache
  (``DIR/**/<task>/**/*-<split>.arrow``). Read with pyarrow; ``datasets`` itself is
  not needed. This is the thesis's order.
- ``'jsonl'``: ``DIR/<task>/<split>.jsonl``, one JSON object per line with the
  GLUE field names (e.g. ``{"sentence1": ..., "sentence2": ..., "label": 1}``).

``'auto'`` picks JSONL, then Hugging Face files, then TFDS, by what ``data_dir``
holds.
"""
import dataclasses
import glob
import json
import os
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from bissl_jax.data.catalogue import DatasetNotFoundError, DatasetSpec
from bissl_jax.data.tokens import TokenDataset, head_split

SOURCES = ("auto", "tfds", "hf", "jsonl")
OFFICIAL_SPLITS = ("train", "validation")


@dataclasses.dataclass(frozen=True)
class GlueSpec:
  """One GLUE task.

  Attributes:
    name: the task ('cola', ...), also the TFDS config and Hugging Face subset.
    text_keys: the one or two text fields.
    kind: input format of :mod:`bissl_jax.tasks.downstream.text`.
    num_classes: classes, or 1 for regression (STS-B).
    metric: the thesis's metric (:data:`bissl_jax.evaluation.text_metrics.GLUE_METRICS`).
  """
  name: str
  text_keys: Tuple[str, ...]
  kind: str
  num_classes: int
  metric: str

  @property
  def regression(self) -> bool:
    return self.num_classes == 1


GLUE_TASKS = {s.name: s for s in (
    GlueSpec("cola", ("sentence",), "classification", 2, "matthews"),
    GlueSpec("sst2", ("sentence",), "classification", 2, "accuracy"),
    GlueSpec("mrpc", ("sentence1", "sentence2"), "similarity", 2, "f1"),
    GlueSpec("qqp", ("question1", "question2"), "similarity", 2, "f1"),
    GlueSpec("stsb", ("sentence1", "sentence2"), "similarity", 1, "pearson"),
    GlueSpec("qnli", ("question", "sentence"), "entailment", 2, "accuracy"),
    GlueSpec("rte", ("sentence1", "sentence2"), "entailment", 2, "accuracy"),
)}


def get_glue_spec(task: str) -> GlueSpec:
  key = str(task).lower().replace("-", "").replace("glue/", "")
  if key not in GLUE_TASKS:
    raise ValueError(f"Unknown GLUE task {task!r}; choose one of {sorted(GLUE_TASKS)}.")
  return GLUE_TASKS[key]


@dataclasses.dataclass
class TextExamples:
  """Raw texts and labels of one split: ``texts[k][i]`` is field k of example i."""
  texts: Tuple[List[str], ...]
  labels: np.ndarray
  name: str = ""

  def __len__(self) -> int:
    return len(self.labels)

  def subset(self, indices) -> "TextExamples":
    indices = [int(i) for i in indices]
    return TextExamples(tuple([t[i] for i in indices] for t in self.texts),
                        np.asarray(self.labels)[indices], self.name)


def _as_text(value) -> str:
  return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def _examples(spec: GlueSpec, rows: Sequence[dict], name: str) -> TextExamples:
  missing = [k for k in spec.text_keys + ("label",) if rows and k not in rows[0]]
  if missing:
    raise ValueError(f"{name}: examples lack the field(s) {missing}; GLUE {spec.name} "
                     f"needs {list(spec.text_keys) + ['label']}.")
  texts = tuple([_as_text(r[k]) for r in rows] for k in spec.text_keys)
  dtype = np.float32 if spec.regression else np.int32
  return TextExamples(texts, np.asarray([r["label"] for r in rows], dtype), name)


def _not_found(spec: GlueSpec, data_dir: Optional[str], why: str) -> DatasetNotFoundError:
  d = data_dir or "<data_dir>"
  return DatasetNotFoundError(
      f"GLUE {spec.name} is not available locally ({why}). Nothing is downloaded at run "
      f"time; prepare it once, on a machine with internet access, in one of these "
      f"forms and pass that folder as data_dir:\n"
      f"  TFDS:  tfds build glue/{spec.name} --data_dir={d} --file_format=array_record\n"
      f"  Hugging Face:  huggingface-cli download nyu-mll/glue --repo-type dataset "
      f"--include '{spec.name}/*' --local-dir {d}\n"
      f"  JSONL: {os.path.join(d, spec.name)}/{{train,validation}}.jsonl with fields "
      f"{list(spec.text_keys) + ['label']}")


# ------------------------------------------------------------------ readers


def _jsonl_file(spec, split, data_dir):
  return os.path.join(data_dir, spec.name, f"{split}.jsonl")


def _read_jsonl(spec: GlueSpec, split: str, data_dir: str) -> List[dict]:
  path = _jsonl_file(spec, split, data_dir)
  if not os.path.isfile(path):
    raise _not_found(spec, data_dir, f"no {path}")
  with open(path, encoding="utf-8") as f:
    return [json.loads(line) for line in f if line.strip()]


def _hf_files(spec: GlueSpec, split: str, data_dir: str) -> List[str]:
  task_dir = os.path.join(data_dir, spec.name)
  for pattern in (os.path.join(task_dir, f"{split}-*.parquet"),
                  os.path.join(task_dir, split, "*.arrow")):
    files = sorted(glob.glob(pattern))
    if files:
      return files
  cache = [f for f in glob.glob(os.path.join(data_dir, "**", f"*-{split}*.arrow"),
                                recursive=True)
           if f"{os.sep}{spec.name}{os.sep}" in f[len(data_dir):]]
  if cache:  # one dataset version only: the files of the first directory found
    first = os.path.dirname(sorted(cache)[0])
    return sorted(f for f in cache if os.path.dirname(f) == first)
  return []


def _read_arrow(path: str):
  import pyarrow as pa  # pylint: disable=import-outside-toplevel
  with pa.memory_map(path) as source:
    try:
      return pa.ipc.open_stream(source).read_all()
    except pa.ArrowInvalid:
      return pa.ipc.open_file(source).read_all()


def _read_hf(spec: GlueSpec, split: str, data_dir: str) -> List[dict]:
  files = _hf_files(spec, split, data_dir)
  if not files:
    raise _not_found(spec, data_dir, f"no Hugging Face {split} files for {spec.name} "
                     f"under {data_dir}")
  try:
    import pyarrow.parquet as pq  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise ImportError("Reading Hugging Face GLUE files needs pyarrow: pip install "
                      "pyarrow") from e
  rows = []
  for path in files:
    table = pq.read_table(path) if path.endswith(".parquet") else _read_arrow(path)
    rows += table.to_pylist()
  return rows


def _read_tfds(spec: GlueSpec, split: str, data_dir: Optional[str]) -> List[dict]:
  from bissl_jax.data import tfds_loader  # pylint: disable=import-outside-toplevel
  try:  # registers the glue builder, which TFDS's lazy registry misses without TensorFlow
    import tensorflow_datasets.text.glue  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import
  except ImportError as e:
    raise ImportError("Reading GLUE from TFDS needs tensorflow_datasets: pip install "
                      "tensorflow-datasets (or use source='hf' or 'jsonl').") from e
  catalogue_spec = DatasetSpec(name=f"glue/{spec.name}", tfds_name=f"glue/{spec.name}",
                               train_split="train", val_split="validation",
                               test_split="validation",
                               num_classes=max(spec.num_classes, 2))
  source = tfds_loader.open_split_source(catalogue_spec, split, data_dir=data_dir)
  return [source[i] for i in range(len(source))]


def resolve_source(spec: GlueSpec, source: str, data_dir: Optional[str]) -> str:
  """The concrete source 'auto' stands for, judged by the files in ``data_dir``."""
  if source not in SOURCES:
    raise ValueError(f"Unknown GLUE source {source!r}; choose one of {SOURCES}.")
  if source != "auto":
    return source
  if data_dir and os.path.isfile(_jsonl_file(spec, "train", data_dir)):
    return "jsonl"
  if data_dir and _hf_files(spec, "train", data_dir):
    return "hf"
  return "tfds"


def read_official_split(task: str, split: str, *, source: str = "auto",
                        data_dir: Optional[str] = None) -> TextExamples:
  """One official GLUE split ('train' or 'validation') as raw texts and labels."""
  spec = get_glue_spec(task)
  if split not in OFFICIAL_SPLITS:
    raise ValueError(f"split must be one of {OFFICIAL_SPLITS} (GLUE's test labels are "
                     f"not public); got {split!r}.")
  source = resolve_source(spec, source, data_dir)
  if source in ("jsonl", "hf") and not data_dir:
    raise _not_found(spec, data_dir, f"source {source!r} needs data_dir")
  reader = {"jsonl": _read_jsonl, "hf": _read_hf, "tfds": _read_tfds}[source]
  return _examples(spec, reader(spec, split, data_dir), f"{spec.name}/{split}")


def load_glue(task: str, *, source: str = "auto", data_dir: Optional[str] = None,
              train_fraction: float = 0.8) -> Dict[str, TextExamples]:
  """``{'train', 'validation', 'test'}`` of a GLUE task by the thesis's split rule.

  Args:
    task: 'cola', 'sst2', 'mrpc', 'qqp', 'stsb', 'qnli' or 'rte'.
    source: 'auto', 'tfds', 'hf' or 'jsonl' (see the module docstring).
    data_dir: the folder holding the data.
    train_fraction: share of the official training split, from its start, that trains.

  Raises:
    DatasetNotFoundError: the task is not available in ``data_dir``.
  """
  test = read_official_split(task, "validation", source=source, data_dir=data_dir)
  official = read_official_split(task, "train", source=source, data_dir=data_dir)
  train_idx, val_idx = head_split(len(official), train_fraction)
  name = get_glue_spec(task).name
  train, validation = official.subset(train_idx), official.subset(val_idx)
  train.name, validation.name, test.name = (f"{name}/train", f"{name}/validation",
                                            f"{name}/test")
  return {"train": train, "validation": validation, "test": test}


def encode_glue(task: str, examples: TextExamples, tokenizer, special_ids: dict, *,
                context: int, length: Optional[int] = None) -> TokenDataset:
  """Tokenises and formats one split; inputs longer than ``context`` are dropped.

  Args:
    task: the GLUE task (its ``kind`` picks the format).
    examples: from :func:`load_glue`.
    tokenizer: anything with ``encode(text) -> ids`` (e.g.
      ``text_corpus.load_openai_gpt_tokenizer``).
    special_ids: ``GPT.special_ids`` of the model.
    context: the model's context k.
    length: padded length (default: the longest kept input).
  """
  from bissl_jax.tasks.downstream.text import format_examples  # pylint: disable=import-outside-toplevel
  spec = get_glue_spec(task)
  encoded = [[tokenizer.encode(t) for t in field] for field in examples.texts]
  tokens, kept = format_examples(spec.kind, special_ids, encoded[0],
                                 encoded[1] if len(encoded) > 1 else None,
                                 context=context, length=length)
  return TokenDataset(tokens=tokens, labels=examples.labels[kept],
                      num_classes=spec.num_classes, name=examples.name)
