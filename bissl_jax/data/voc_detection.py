"""VOC07+12 detection from TFDS into fixed-size, padded batches (BiSSL paper Appendix B.6).

Splits (``voc_detection``): training = VOC2007 ``train`` + VOC2012 ``train`` +
VOC2012 ``validation``; validation (model selection, the random search) = VOC2007
``validation``; test = VOC2007 ``test``. So VOC07+12 trainval is used for training
and validation together, and VOC2007 test only for the reported AP50.

Each image is rescaled (bilinear) so that its longest edge is ``L`` pixels and
pasted at the top-left of a black ``data.image_size`` square (``image_size`` ≥ 320);
``L`` is drawn uniformly from [196, 320] per training image (once, with
``data.split_seed``: the rescaling is fixed at load time, not redrawn every epoch)
and is 320 for validation and test. Boxes (TFDS: normalised ``ymin, xmin, ymax,
xmax``) become ``(x1, y1, x2, y2)`` pixels of the rescaled image; ``image_sizes`` is
the rescaled image's (height, width). Every image has ``MAX_OBJECTS`` = 56 box slots
(objects beyond them would be dropped); ``difficult`` objects are kept, flagged, and
left out of the AP (detectron2 drops them from training; here they train).

Memory: N · image_size² · 3 bytes (about 5 GB for the 16,551 training images at 320).
"""
from typing import Dict, Iterable

import numpy as np
import PIL.Image

from bissl_jax.data.catalogue import DatasetSpec
from bissl_jax.data.detection_sets import DetectionDataset

MAX_OBJECTS = 56
MIN_EDGE, MAX_EDGE = 196, 320
NUM_CLASSES = 20
SOURCES = {"train": (("voc/2007", "train"), ("voc/2012", "train"), ("voc/2012", "validation")),
           "validation": (("voc/2007", "validation"),), "test": (("voc/2007", "test"),)}


def _spec(tfds_name: str) -> DatasetSpec:
  return DatasetSpec(name=tfds_name, tfds_name=tfds_name, train_split="train",
                     val_split="validation", test_split="test", num_classes=NUM_CLASSES)


def convert_example(example: dict, *, longest_edge: int, canvas: int) -> dict:
  """One TFDS VOC example as a padded canvas with pixel boxes (module docstring)."""
  image = np.asarray(example["image"], np.uint8)
  if image.ndim == 2:
    image = np.repeat(image[..., None], 3, -1)
  h, w = image.shape[:2]
  scale = longest_edge / max(h, w)
  nh, nw = max(1, int(round(h * scale))), max(1, int(round(w * scale)))
  resized = np.asarray(PIL.Image.fromarray(image[..., :3]).resize((nw, nh),
                                                                  PIL.Image.BILINEAR))
  out = np.zeros((canvas, canvas, 3), np.uint8)
  out[:nh, :nw] = resized
  objects = example["objects"]
  bbox = np.asarray(objects["bbox"], np.float32).reshape(-1, 4)
  label = np.asarray(objects["label"], np.int32).reshape(-1)
  hard = np.asarray(objects["is_difficult"], bool).reshape(-1)
  # One entry per object in each (TFDS's random mock data may disagree: the shortest).
  k = min(len(bbox), len(label), len(hard), MAX_OBJECTS)
  bbox = bbox[:k]
  boxes = np.zeros((MAX_OBJECTS, 4), np.float32)
  boxes[:k] = np.stack([bbox[:, 1] * nw, bbox[:, 0] * nh, bbox[:, 3] * nw, bbox[:, 2] * nh], -1)
  classes = np.zeros((MAX_OBJECTS,), np.int32)
  classes[:k] = label[:k]
  difficult = np.zeros((MAX_OBJECTS,), bool)
  difficult[:k] = hard[:k]
  return {"image": out, "boxes": boxes, "classes": classes, "valid": np.arange(MAX_OBJECTS) < k,
          "difficult": difficult, "image_size": np.array([nh, nw], np.float32)}


def _convert(examples: Iterable[dict], edges: np.ndarray, canvas: int, name: str
             ) -> DetectionDataset:
  rows = [convert_example(e, longest_edge=int(edge), canvas=canvas)
          for e, edge in zip(examples, edges)]
  stack = lambda k: np.stack([r[k] for r in rows])
  labels = {"boxes": stack("boxes"), "classes": stack("classes"), "valid": stack("valid"),
            "image_sizes": stack("image_size"), "difficult": stack("difficult")}
  return DetectionDataset(stack("image"), labels, NUM_CLASSES, name)


def load_splits(d) -> Dict[str, DetectionDataset]:
  """``{'train', 'validation', 'test'}`` of VOC07+12 for ``config.data`` ``d``.

  ``d.max_train_examples`` caps every source split read (smoke runs).
  """
  from bissl_jax.data.tfds_loader import open_split_source  # pylint: disable=g-import-not-at-top
  canvas = int(d.image_size)
  if canvas < MAX_EDGE:
    raise ValueError(f"config.data.image_size={canvas}: VOC detection pastes images whose "
                     f"longest edge is up to {MAX_EDGE} px; set it to at least {MAX_EDGE}.")
  rng = np.random.default_rng([int(d.split_seed), 7])
  cap = d.get("max_train_examples")
  out = {}
  for split, sources in SOURCES.items():
    examples = []
    for tfds_name, tfds_split in sources:
      source = open_split_source(_spec(tfds_name), tfds_split, data_dir=d.data_dir)
      count = len(source) if not cap else min(len(source), int(cap))
      examples += [source[i] for i in range(count)]
    edges = (rng.integers(MIN_EDGE, MAX_EDGE + 1, size=len(examples)) if split == "train"
             else np.full(len(examples), MAX_EDGE))
    out[split] = _convert(examples, edges, canvas, f"voc_detection/{split}")
  return out
