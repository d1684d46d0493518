"""Any prepared TFDS dataset by name (``tfds:<name>``) as pretext and downstream set."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from bissl_jax import data
from bissl_jax.pipeline import preflight
from configs import digits_simclr

from config_helpers import REPO_ROOT  # noqa: E402

tfds = pytest.importorskip("tensorflow_datasets")
PIL = pytest.importorskip("PIL.Image")

NAME = "bissl_test_shapes"
SIZES = {"train": 60, "test": 15}


def _image(i: int, size: int = 12) -> np.ndarray:
  """Example i: class i mod 3 (dark, mid, bright), of varying height, grey levels 20·(i%3)+…"""
  image = np.full((size + i % 2, size, 3), 60 * (i % 3) + 40, np.uint8)
  image[0, 0] = i  # the example's number, to check that none is lost or repeated
  return image


class BisslTestShapes(tfds.core.GeneratorBasedBuilder):
  """A 3-class TFDS dataset written by the test (array_record, no TensorFlow)."""
  VERSION = tfds.core.Version("1.0.0")

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        "picture": tfds.features.Image(shape=(None, None, 3)),
        "kind": tfds.features.ClassLabel(num_classes=3)}))

  def _split_generators(self, dl_manager):
    del dl_manager
    return {split: self._generate_examples(split) for split in SIZES}

  def _generate_examples(self, split):
    offset = 0 if split == "train" else SIZES["train"]
    for i in range(offset, offset + SIZES[split]):
      yield i, {"picture": PIL.fromarray(_image(i)), "kind": i % 3}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  root = str(tmp_path_factory.mktemp("tfds"))
  BisslTestShapes(data_dir=root, file_format="array_record").download_and_prepare()
  return root


def test_a_tfds_name_reads_its_features_and_splits(data_dir):
  spec = data.get_spec(f"tfds:{NAME}", data_dir)
  assert (spec.num_classes, spec.image_key, spec.label_key) == (3, "picture", "kind")
  assert (spec.train_split, spec.val_split, spec.test_split) == ("train", None, "test")
  splits = data.load_splits(f"tfds:{NAME}", data_dir=data_dir, image_size=12,
                            val_fraction=0.2, seed=0)
  assert {k: len(v) for k, v in splits.items()} == {"train": 48, "validation": 12, "test": 15}
  numbers = sorted(int(n) for s in splits.values() for n in s.images[:, 0, 0, 0])
  assert numbers == list(range(75))  # every example once, in its own split
  for split in splits.values():  # each label is the class of the example's grey level
    np.testing.assert_array_equal(split.labels, split.images[:, 5, 5, 0] // 60)
  assert sorted(int(n) for n in splits["test"].images[:, 0, 0, 0]) == list(range(60, 75))
  pretext = data.load_pretext_split(f"tfds:{NAME}", data_dir=data_dir, image_size=12)
  assert len(pretext) == 60


def test_a_tfds_name_not_prepared_is_named_with_its_command(tmp_path):
  config = digits_simclr.get_config("runlocal")
  config.data.data_dir = str(tmp_path)
  config.data.downstream_dataset = "tfds:my_own_set"
  [problem] = preflight.data_problems(config)
  assert "'tfds:my_own_set'" in problem and "(downstream)" in problem
  assert f"tfds build my_own_set --data_dir={tmp_path} --file_format=array_record" in problem


@pytest.mark.slow
def test_the_pipeline_runs_end_to_end_on_a_tfds_name(data_dir, tmp_path):
  # A new process: the builder class above is unknown there, the files are all it has.
  workdir = tmp_path / "run"
  proc = subprocess.run(
      [sys.executable, "-m", "bissl_jax", "run", "--config=configs/digits_simclr.py:runlocal",
       f"--workdir={workdir}", f"--config.data.data_dir={data_dir}",
       f"--config.data.pretext_dataset=tfds:{NAME}",
       f"--config.data.downstream_dataset=tfds:{NAME}", "--config.data.image_size=12"],
      cwd=REPO_ROOT, capture_output=True, text=True, timeout=900,
      env=dict(os.environ, PYTHONPATH=REPO_ROOT, JAX_PLATFORMS="cpu"))
  assert proc.returncode == 0, proc.stderr[-3000:]
  results = json.loads((workdir / "results.json").read_text())
  for pipeline in ("baseline", "bissl"):
    for record in results["pipelines"][pipeline]["per_seed"].values():
      assert 0.0 <= record["top1"] <= 1.0
  assert f"tfds:{NAME}" in proc.stdout  # the banner names the data
