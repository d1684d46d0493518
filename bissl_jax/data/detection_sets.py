"""Detection datasets of the pipeline: images with box labels, held in memory.

Two downstream sets make the run's downstream task object detection
(``bissl_jax.tasks.downstream.detection.Detection``, BiSSL paper §4.3.1):

* ``synthetic_detection``: the offline set, scikit-learn's digits pasted on black
  ``data.image_size``-pixel canvases (``bissl_jax.data.synthetic_detection``, no
  download), digits of ``image_size/4``–``image_size/2`` pixels, at most 2 per image,
  10 classes. 512 training, 128 validation and 128 test canvases (the training count
  capped by ``data.max_train_examples``), composed with ``data.split_seed``.
* ``voc_detection``: VOC07+12 trainval for training, VOC2007 test for evaluation
  (TFDS ``voc/2007`` and ``voc/2012``; :mod:`bissl_jax.data.voc_detection`), 20 classes.

A batch is ``{'image': uint8 (b, S, S, 3), 'label': {'boxes' (b, M, 4), 'classes'
(b, M), 'valid' (b, M), 'image_sizes' (b, 2)}}``, the label tree the detection task
reads; every image has the same ``M`` box slots, ``valid`` False on padding.
"""
import dataclasses
import glob
import os
from typing import Dict, List, Optional

import numpy as np

DETECTION_DATASETS = ("synthetic_detection", "voc_detection")
VOC_SOURCES = ("voc/2007", "voc/2012")
LABEL_KEYS = ("boxes", "classes", "valid", "image_sizes")


def is_detection_dataset(name) -> bool:
  """Whether ``name`` is a detection set: its downstream task is object detection."""
  return str(name) in DETECTION_DATASETS


def num_classes(name: str) -> int:
  return 10 if name == "synthetic_detection" else 20


@dataclasses.dataclass
class DetectionDataset:
  """Images and their fixed-size, padded box labels (module docstring).

  Attributes:
    images: uint8 ``(N, S, S, 3)``.
    labels: ``{'boxes' float32 (N, M, 4), 'classes' int32 (N, M), 'valid' bool (N, M),
      'image_sizes' float32 (N, 2)}`` (optionally ``'difficult'`` bool (N, M)).
    num_classes: object classes.
    name: a short name for logs.
  """
  images: np.ndarray
  labels: Dict[str, np.ndarray]
  num_classes: int
  name: str = ""

  def __post_init__(self):
    n = len(self.images)
    bad = [k for k, v in self.labels.items() if len(v) != n]
    if bad:
      raise ValueError(f"DetectionDataset {self.name!r}: {n} images but labels {bad} "
                       f"of other lengths.")

  def __len__(self) -> int:
    return len(self.images)

  @property
  def image_size(self) -> int:
    return int(self.images.shape[1])

  def batch(self, indices) -> dict:
    """``{'image', 'label': {'boxes', 'classes', 'valid', 'image_sizes'}}`` of ``indices``
    (any shape S; every leaf gets the leading shape S)."""
    indices = np.asarray(indices)
    return {"image": np.take(self.images, indices, axis=0),
            "label": {k: np.take(self.labels[k], indices, axis=0) for k in LABEL_KEYS}}

  def subset(self, indices) -> "DetectionDataset":
    indices = np.asarray(indices, dtype=np.int64)
    return dataclasses.replace(self, images=self.images[indices],
                               labels={k: v[indices] for k, v in self.labels.items()})


def from_arrays(arrays: Dict[str, np.ndarray], classes: int, name: str) -> DetectionDataset:
  """A dataset from ``synthetic_detection.make_split``'s arrays (``gt_*`` names)."""
  labels = {"boxes": arrays["gt_boxes"].astype(np.float32),
            "classes": arrays["gt_classes"].astype(np.int32),
            "valid": arrays["gt_valid"].astype(bool),
            "image_sizes": arrays["image_sizes"].astype(np.float32)}
  if "gt_difficult" in arrays:
    labels["difficult"] = arrays["gt_difficult"].astype(bool)
  return DetectionDataset(arrays["images"], labels, classes, name)


SYNTHETIC_SIZES = {"train": 512, "validation": 128, "test": 128}


def load_splits(d) -> Dict[str, DetectionDataset]:
  """The three splits of ``d.downstream_dataset`` (``config.data``)."""
  if d.downstream_dataset == "voc_detection":
    from bissl_jax.data import voc_detection  # pylint: disable=g-import-not-at-top
    return voc_detection.load_splits(d)
  from bissl_jax.data import synthetic_detection  # pylint: disable=g-import-not-at-top
  size = int(d.image_size)
  sizes = dict(SYNTHETIC_SIZES)
  if d.get("max_train_examples"):
    sizes["train"] = min(sizes["train"], int(d.max_train_examples))
  return {split: from_arrays(synthetic_detection.make_split(
      n, split, canvas=size, max_objects=2, min_size=max(size // 4, 1),
      max_size=max(size // 2, 1), seed=int(d.split_seed)), 10, f"synthetic_detection/{split}")
          for split, n in sizes.items()}


def preparation_problems(name: str, data_dir: Optional[str]) -> List[str]:
  """Why ``name`` cannot be read from ``data_dir`` (TFDS files looked at only), with the
  commands that prepare it; empty when it can."""
  if name != "voc_detection":
    return []
  from bissl_jax.data import availability  # pylint: disable=g-import-not-at-top
  root = availability.tfds_data_dir(data_dir)
  if "://" in root:
    return []
  missing = [s for s in VOC_SOURCES
             if not glob.glob(os.path.join(root, s, "*", "dataset_info.json"))]
  if not missing:
    return []
  lines = [f"{name!r} (downstream, VOC07+12 detection) needs the TFDS sets "
           f"{', '.join(missing)}, not prepared in {root}:"]
  lines += [f"    looked for {os.path.join(root, s)}/<version>/\n"
            f"    tfds build {s} --data_dir={root} --file_format=array_record"
            for s in missing]
  lines.append("    (or set config.data.data_dir to where they are prepared)")
  return ["\n".join(lines)]


def detector_config(name: str, image_size: int):
  """The detector's settings for ``name`` (``bissl_jax.detection.DetectorConfig``).

  VOC: detectron2's R50-C4 defaults. The synthetic set: a CPU-sized detector for
  ``image_size``-pixel canvases (C4 stride 4 with the 3×3 stem, two anchor sizes,
  ``image_size/4`` and ``image_size/2``, as the digits' sides, and small sampling
  budgets). The backbone's and res5's architecture are the model's
  (``make_detection_task``).
  """
  from bissl_jax.detection.faster_rcnn import DetectorConfig  # pylint: disable=g-import-not-at-top
  if name == "voc_detection":
    return DetectorConfig(num_classes=20)
  side = float(image_size)
  return DetectorConfig(
      num_classes=num_classes(name), anchor_sizes=(side / 4, side / 2),
      rpn_batch_size_per_image=32, pre_nms_topk_train=64, post_nms_topk_train=16,
      pre_nms_topk_test=64, post_nms_topk_test=16, roi_output_size=4,
      roi_sampling_ratio=2, roi_batch_size_per_image=16, detections_per_image=8)
