"""Object detection through the pipeline: the offline config end to end, AP50, VOC's data path."""
import contextlib
import io
import json
import math
import os
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest

from bissl_jax.config_validation import ConfigError, validate_config
from bissl_jax.convert import stage_output
from bissl_jax.data import detection_sets
from bissl_jax.data import voc_detection
from bissl_jax.evaluation import detection_metrics
from bissl_jax.pipeline import run_log
from bissl_jax.pipeline import supervised
from bissl_jax.pipeline.context import build_context
from bissl_jax.pipeline.datasets import load_data
from bissl_jax.pipeline.runner import run
from bissl_jax.runtime import mesh as parallel
from configs import digits_detection, voc_detection as voc_config

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def detection_run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("detection"))
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    results = run(digits_detection.get_config("runlocal"), workdir)
  return workdir, results, out.getvalue()


@pytest.mark.slow  # the detector's step functions compile (minutes on a loaded 2-core CPU)
def test_runlocal_reports_ap50_and_resumes_without_training(detection_run):
  workdir, results, stdout = detection_run
  assert results["metric"] == "ap50" and results["metrics"] == ["ap50"]
  for pipeline in ("baseline", "bissl"):
    rows = results["pipelines"][pipeline]["per_seed"]
    assert set(rows) == {"0", "1"}
    for row in rows.values():
      assert math.isfinite(row["ap50"]) and 0.0 <= 100 * row["ap50"] <= 100.0
  table = open(os.path.join(workdir, "results.md")).read()
  assert "Test AP50 (%, VOC07 11-pt)" in table
  assert "| Only FT |" in table and "| BiSSL+FT |" in table and table in stdout
  for label in ("head_warmup/seed0", "bissl/seed0", "finetune/baseline/seed1",
                "finetune/bissl/seed1"):
    assert f"[{label}] done:" in stdout, label
  lines_before = len(run_log.read_metrics(workdir))
  with contextlib.redirect_stdout(io.StringIO()):
    again = run(digits_detection.get_config("runlocal"), workdir)
  assert again["pipelines"] == results["pipelines"]
  assert len(run_log.read_metrics(workdir)) == lines_before  # nothing was retrained


@pytest.mark.slow  # shares the run above
def test_reported_ap50_is_voc_ap_of_the_exported_model(detection_run):
  workdir = detection_run[0]
  directory = os.path.join(workdir, "seed0", "bissl", "finetune")
  variables, _ = stage_output.load_export(os.path.join(directory, "output"))
  recorded = json.load(open(os.path.join(directory, "evaluation.json")))["test"]["ap50"]
  config = digits_detection.get_config("runlocal")
  splits, _ = load_data(config, need_pretext=False, need_downstream=True)
  ctx = build_context(config, os.path.join(workdir, "reeval"))
  out = supervised.predict(ctx, variables["params"], variables["batch_stats"], splits["test"])
  labels = splits["test"].labels
  assert out["boxes"].shape == (len(splits["test"]), 8, 4)
  from bissl_jax.detection.voc_eval import voc_ap
  expected = voc_ap([{k: out[k][i] for k in out} for i in range(len(labels["valid"]))],
                    [{k: labels[k][i] for k in ("boxes", "classes", "valid")}
                     for i in range(len(labels["valid"]))], num_classes=10)["map"]
  assert recorded == pytest.approx(float(expected), abs=1e-12)


@pytest.mark.slow  # seed 0 again, in three runs (its programs come from the compilation cache)
def test_interrupted_mid_bissl_and_mid_finetune_resumes_to_the_same_ap50(
    detection_run, tmp_path, monkeypatch):
  """Ctrl-C after BiSSL's first alternation (its checkpoints are every 2), then Ctrl-C
  at step 6 of 8 of the BiSSL pipeline's fine-tuning (mid-epoch, after the first
  epoch's best-so-far record), each resumed: seed 0 ends with the uninterrupted run's
  AP50 and validation score, bit for bit."""
  workdir = str(tmp_path / "run")
  config = digits_detection.get_config("runlocal")
  config.seeds = (0,)
  sent = []

  def sigint_once(where):
    if where not in sent:
      sent.append(where)
      os.kill(os.getpid(), signal.SIGINT)  # handled by the stage loop between steps

  def after_alternation(done, state, metrics):
    if done == 1:
      sigint_once("bissl")

  write = run_log.MetricLogger.write

  def write_and_interrupt(self, stage, step, metrics):
    record = write(self, stage, step, metrics)
    if stage == "finetune/bissl/seed0" and step == 6:
      sigint_once("finetune")
    return record

  monkeypatch.setattr(run_log.MetricLogger, "write", write_and_interrupt)
  outputs = []
  for _ in range(2):
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(KeyboardInterrupt):
      run(config, workdir, bissl_callback=after_alternation)
    outputs.append(out.getvalue())
  assert "[bissl/seed0] interrupted: " in outputs[0]
  assert "[finetune/bissl/seed0] interrupted: " in outputs[1]
  assert "[bissl/seed0] resuming at " in outputs[1]
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    results = run(config, workdir)
  assert "[finetune/bissl/seed0] resuming at " in out.getvalue()
  assert sent == ["bissl", "finetune"]
  expected = detection_run[1]["pipelines"]
  for pipeline in ("baseline", "bissl"):
    assert results["pipelines"][pipeline]["per_seed"]["0"] == expected[pipeline]["per_seed"]["0"]


def test_ap50_scorer_on_hand_made_detections():
  score = detection_metrics.ap50_scorer(num_classes=2)
  labels = {"boxes": np.array([[[0, 0, 10, 10], [0, 0, 0, 0]]], np.float32),
            "classes": np.array([[1, 0]]), "valid": np.array([[True, False]])}
  # One hit, a duplicate of it (a false positive ranked below) and a padded slot.
  outputs = {"boxes": np.array([[[0, 0, 10, 10], [1, 1, 10, 10], [5, 5, 6, 6]]], np.float32),
             "scores": np.array([[0.9, 0.5, 0.99]], np.float32),
             "classes": np.array([[1, 1, 0]]), "valid": np.array([[True, True, False]])}
  out = score(outputs, labels)
  # Precision 1 at recall 1 from the first detection: 11-point AP 1 for class 1, the
  # only class with ground truth.
  assert out == {"ap50": 1.0, "score": 1.0, "loss": 0.0, "nonfinite": 0}
  outputs["scores"] = np.array([[np.nan, 0.5, 0.99]], np.float32)
  out = score(outputs, labels)
  # The NaN detection is counted and left out: the duplicate alone hits (IoU 0.81).
  assert out["nonfinite"] == 1 and out["ap50"] == 1.0
  outputs["boxes"][0, 1] = [20, 20, 30, 30]
  assert score(outputs, labels)["ap50"] == 0.0


def test_batches_carry_box_labels_as_a_tree_and_shard_like_images():
  config = digits_detection.get_config("runlocal")
  splits = detection_sets.load_splits(config.data)
  train = splits["train"]
  assert len(train) == 64 and len(splits["test"]) == 128
  batch = train.batch(np.array([[3, 1], [0, 2]]))  # a stack of 2 steps of 2 (BiSSL's upper)
  assert batch["image"].shape == (2, 2, 32, 32, 3)
  assert set(batch["label"]) == set(detection_sets.LABEL_KEYS)
  np.testing.assert_array_equal(batch["label"]["boxes"][0, 1], train.labels["boxes"][1])
  assert batch["label"]["valid"].shape == (2, 2, 2) and batch["label"]["valid"].any()
  placed = parallel.shard_batch(batch, parallel.make_mesh(), 1)
  for leaf, host in zip(jax.tree_util.tree_leaves(placed), jax.tree_util.tree_leaves(batch)):
    np.testing.assert_array_equal(np.asarray(leaf), host)


def test_detection_needs_the_c4_boundary():
  config = digits_detection.get_config("runlocal")
  validate_config(config)
  config.model.backbone_ends_at = "res5"
  with pytest.raises(ConfigError, match="backbone_ends_at.*res4"):
    validate_config(config)


def test_voc_config_stops_before_compute_when_voc_is_not_prepared(tmp_path):
  env = dict(os.environ, PYTHONPATH=ROOT, TFDS_DATA_DIR=str(tmp_path / "tfds"))
  workdir = tmp_path / "run"
  proc = subprocess.run(
      [sys.executable, "-m", "experiments.main", "--config=configs/voc_detection.py",
       f"--workdir={workdir}", "--config.pretext.checkpoint="], cwd=ROOT, env=env,
      capture_output=True, text=True, timeout=300)
  assert proc.returncode == 2, proc.stderr
  assert "Traceback" not in proc.stderr
  for name in ("voc/2007", "voc/2012"):
    assert f"tfds build {name} --data_dir={tmp_path / 'tfds'}" in proc.stderr
  assert not workdir.exists()


def test_voc_example_becomes_a_padded_canvas_with_pixel_boxes():
  image = np.full((100, 200, 3), 255, np.uint8)  # h 100, w 200
  example = {"image": image, "objects": {
      "bbox": np.array([[0.1, 0.25, 0.5, 0.75]], np.float32),  # ymin, xmin, ymax, xmax
      "label": np.array([14]), "is_difficult": np.array([True])}}
  out = voc_detection.convert_example(example, longest_edge=300, canvas=320)
  assert out["image"].shape == (320, 320, 3)
  assert out["image"][:150, :300].min() == 255 and out["image"][150:].max() == 0
  np.testing.assert_allclose(out["image_size"], [150, 300])
  np.testing.assert_allclose(out["boxes"][0], [75, 15, 225, 75])  # x: ·300, y: ·150
  assert out["classes"][0] == 14 and out["difficult"][0] and out["valid"].sum() == 1
  assert out["boxes"].shape == (voc_detection.MAX_OBJECTS, 4)


def test_voc_splits_from_tfds_layout():
  tfds = pytest.importorskip("tensorflow_datasets")
  config = voc_config.get_config("runlocal")
  config.data.max_train_examples = 3
  with tfds.testing.mock_data(num_examples=3, num_sub_examples=2):
    splits = voc_detection.load_splits(config.data)
  assert len(splits["train"]) == 9 and len(splits["test"]) == 3  # 07 train + 12 trainval
  for split, data in splits.items():
    sizes = data.labels["image_sizes"]
    edge = sizes.max(1)
    if split == "train":
      assert ((edge >= 196) & (edge <= 320)).all()
    else:
      assert (edge == 320).all()
    boxes, valid = data.labels["boxes"], data.labels["valid"]
    assert valid.any(1).all()
    assert (boxes[valid][:, 2] <= np.repeat(sizes[:, 1], valid.sum(1)) + 1e-3).all()
    batch = data.batch(np.array([0, 1]))
    assert batch["label"]["boxes"].shape == (2, voc_detection.MAX_OBJECTS, 4)
