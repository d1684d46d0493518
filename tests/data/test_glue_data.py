"""GLUE loading from JSONL, Hugging Face parquet/arrow files and (mocked) TFDS."""
import json

import numpy as np
import pytest

from bissl_jax.models import gpt
from bissl_jax.data import glue
from bissl_jax.data.catalogue import DatasetNotFoundError


def _rows(n, task="rte", offset=0):
  spec = glue.get_glue_spec(task)
  rows = []
  for i in range(n):
    row = {k: f"{k} number {i + offset} ." for k in spec.text_keys}
    row["label"] = float(i % 5) if spec.regression else (i + offset) % 2
    row["idx"] = i
    rows.append(row)
  return rows


def _write_jsonl(root, task, split, rows):
  (root / task).mkdir(exist_ok=True)
  with open(root / task / f"{split}.jsonl", "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in rows)


def test_jsonl_and_the_thesis_split_rule(tmp_path):
  _write_jsonl(tmp_path, "rte", "train", _rows(10))
  _write_jsonl(tmp_path, "rte", "validation", _rows(4, offset=100))
  splits = glue.load_glue("rte", data_dir=str(tmp_path))
  assert glue.resolve_source(glue.get_glue_spec("rte"), "auto", str(tmp_path)) == "jsonl"
  # Official validation → test; first 80% of train → train, the rest → validation.
  assert [len(splits[s]) for s in ("train", "validation", "test")] == [8, 2, 4]
  assert splits["train"].texts[0][0] == "sentence1 number 0 ."
  assert splits["validation"].texts[1] == ["sentence2 number 8 .", "sentence2 number 9 ."]
  assert splits["test"].texts[0][0] == "sentence1 number 100 ."
  assert splits["train"].labels.dtype == np.int32 and splits["test"].name == "rte/test"


def test_hf_parquet_snapshot_and_datasets_cache(tmp_path):
  pa = pytest.importorskip("pyarrow")
  pq = pytest.importorskip("pyarrow.parquet")
  snap = tmp_path / "snapshot" / "stsb"
  snap.mkdir(parents=True)
  rows = _rows(10, "stsb")
  pq.write_table(pa.Table.from_pylist(rows[:6]), snap / "train-00000-of-00002.parquet")
  pq.write_table(pa.Table.from_pylist(rows[6:]), snap / "train-00001-of-00002.parquet")
  pq.write_table(pa.Table.from_pylist(_rows(3, "stsb")), snap / "validation-00000-of-00001.parquet")
  splits = glue.load_glue("stsb", source="hf", data_dir=str(tmp_path / "snapshot"))
  assert [len(splits[s]) for s in ("train", "validation", "test")] == [8, 2, 3]
  np.testing.assert_array_equal(splits["validation"].labels, [3.0, 4.0])  # shard order kept
  assert splits["train"].labels.dtype == np.float32

  # A `datasets` cache: arrow IPC streams named <builder>-<split>.arrow.
  cache = tmp_path / "cache" / "nyu-mll___glue" / "cola" / "0.0.0" / "abc123"
  cache.mkdir(parents=True)
  for split, n in (("train", 5), ("validation", 2)):
    table = pa.Table.from_pylist(_rows(n, "cola"))
    with pa.OSFile(str(cache / f"glue-{split}.arrow"), "wb") as sink:
      with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
  splits = glue.load_glue("cola", data_dir=str(tmp_path / "cache"))
  assert [len(splits[s]) for s in ("train", "validation", "test")] == [4, 1, 2]
  assert splits["train"].texts[0][3] == "sentence number 3 ."


def test_tfds_mock_data():
  tfds = pytest.importorskip("tensorflow_datasets")
  with tfds.testing.mock_data(num_examples=10):
    splits = glue.load_glue("mrpc", source="tfds", data_dir="/unused")
  assert [len(splits[s]) for s in ("train", "validation", "test")] == [8, 2, 10]
  assert all(isinstance(t, str) for t in splits["train"].texts[1])
  assert set(np.unique(splits["train"].labels)) <= {0, 1}


def test_missing_data_names_the_task_and_the_fix(tmp_path):
  with pytest.raises(DatasetNotFoundError, match=r"(?s)GLUE qnli.*tfds build glue/qnli"):
    glue.load_glue("qnli", source="jsonl", data_dir=str(tmp_path))
  with pytest.raises(DatasetNotFoundError, match="nyu-mll/glue"):
    glue.load_glue("qnli", source="hf", data_dir=str(tmp_path))
  pytest.importorskip("tensorflow_datasets")
  with pytest.raises(DatasetNotFoundError, match="tfds build glue/qnli"):
    glue.load_glue("qnli", source="tfds", data_dir=str(tmp_path))
  with pytest.raises(ValueError, match="Unknown GLUE task"):
    glue.get_glue_spec("mnli")


class _WordTokenizer:
  def encode(self, text):
    return [len(w) % 30 for w in text.split()]


def test_encode_glue_formats_and_drops_long_inputs(tmp_path):
  rows = _rows(4, "qqp")
  rows[2]["question1"] = " ".join(["long"] * 40)
  _write_jsonl(tmp_path, "qqp", "train", rows)
  _write_jsonl(tmp_path, "qqp", "validation", _rows(2, "qqp"))
  examples = glue.load_glue("qqp", data_dir=str(tmp_path), train_fraction=0.99)["train"]
  model = gpt.GPT(gpt.gpt_config("gpt_micro"), num_special=3)
  data = glue.encode_glue("qqp", examples, _WordTokenizer(), model.special_ids, context=16)
  assert len(data) == 2 and data.tokens.shape[1] == 2  # both orders; example 2 dropped
  np.testing.assert_array_equal(data.labels, [0, 1])
  first = data.tokens[0, 0]
  assert first[0] == model.special_ids["start"] and model.special_ids["delimiter"] in first
  batch = data.batch(np.array([[1, 0]]))
  assert batch["tokens"].shape == (1, 2, 2, data.length) and batch["label"].tolist() == [[1, 0]]
