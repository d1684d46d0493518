"""Your own images (``folder:<path>``, one subfolder per class) as pretext and downstream set."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from bissl_jax import data
from bissl_jax.pipeline import preflight
from configs import digits_simclr

from config_helpers import REPO_ROOT  # noqa: E402

REPO = REPO_ROOT
CLASSES = ("circle", "square", "stripes")


def _write_images(root, per_class=12, size=12, split=""):
  """Three classes a network can tell apart: a disc, a square, horizontal stripes."""
  rng = np.random.default_rng(len(split))
  yy, xx = np.mgrid[:size, :size]
  shapes = {"circle": (yy - size / 2) ** 2 + (xx - size / 2) ** 2 < (size / 3) ** 2,
            "square": (abs(yy - size / 2) < size / 3) & (abs(xx - size / 2) < size / 3),
            "stripes": (yy // 2) % 2 == 0}
  for label, cls in enumerate(CLASSES):
    os.makedirs(os.path.join(root, split, cls), exist_ok=True)
    for i in range(per_class):
      img = rng.integers(0, 60, (size, size, 3)).astype(np.uint8)
      img[shapes[cls]] = 200 - 40 * label + rng.integers(0, 30)
      Image.fromarray(img).save(os.path.join(root, split, cls, f"{i}.png"))


def test_one_pool_is_split_stratified_and_given_splits_are_kept(tmp_path):
  _write_images(str(tmp_path / "pool"), per_class=10)
  splits = data.load_splits(f"folder:{tmp_path / 'pool'}", image_size=8, val_fraction=0.2,
                            seed=0)
  sizes = {k: len(v) for k, v in splits.items()}
  assert sum(sizes.values()) == 30 and sizes["test"] == 6 and 4 <= sizes["validation"] <= 6
  for dataset in splits.values():
    assert dataset.num_classes == 3 and dataset.images.shape[1:] == (8, 8, 3)
    assert sorted(np.unique(dataset.labels)) == [0, 1, 2]  # every class in every split
  _write_images(str(tmp_path / "given"), per_class=6, split="train")
  _write_images(str(tmp_path / "given"), per_class=2, split="test")
  splits = data.load_splits(f"folder:{tmp_path / 'given'}", image_size=8, val_fraction=0.5,
                            seed=0)
  assert len(splits["test"]) == 6 and len(splits["train"]) + len(splits["validation"]) == 18
  assert len(data.load_pretext_split(f"folder:{tmp_path / 'given'}", image_size=8)) == 18


def test_a_missing_or_flat_folder_is_named_before_the_run(tmp_path):
  (tmp_path / "flat").mkdir()
  Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "flat" / "a.png")
  config = digits_simclr.get_config("runlocal")
  config.data.pretext_dataset = f"folder:{tmp_path / 'nowhere'}"
  config.data.downstream_dataset = f"folder:{tmp_path / 'flat'}"
  [problem] = preflight.data_problems(config)
  assert f"no folder {tmp_path / 'nowhere'}" in problem
  assert "one subfolder per class" in problem and "docs/datasets.md" in problem


@pytest.mark.slow
def test_the_pipeline_runs_end_to_end_on_a_folder_of_images(tmp_path):
  root = tmp_path / "my_images"
  _write_images(str(root), per_class=24)  # about 46 training images: batch 32 fits
  workdir = tmp_path / "run"
  proc = subprocess.run(
      [sys.executable, "-m", "bissl_jax", "run", "--config=configs/digits_simclr.py:runlocal",
       f"--workdir={workdir}", f"--config.data.pretext_dataset=folder:{root}",
       f"--config.data.downstream_dataset=folder:{root}", "--config.data.image_size=12"],
      cwd=REPO, capture_output=True, text=True, timeout=900,
      env=dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu"))
  assert proc.returncode == 0, proc.stderr[-3000:]
  results = json.loads((workdir / "results.json").read_text())
  for pipeline in ("baseline", "bissl"):
    for record in results["pipelines"][pipeline]["per_seed"].values():
      assert 0.0 <= record["top1"] <= 1.0
  assert f"folder:{root}" in proc.stdout  # the banner names the data
