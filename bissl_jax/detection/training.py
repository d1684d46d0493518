"""A plain training loop and AP50 evaluation for the detector on in-memory arrays.

Small on purpose: the synthetic-digits check that the detector learns, and a
reference for wiring the detector into the BiSSL stages (which bring their own
optimisers, data parallelism and checkpoints).
"""
from typing import Dict, Tuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from bissl_jax.tasks.augment import normalize
from bissl_jax.detection.faster_rcnn import Detector
from bissl_jax.detection.loss import detection_loss
from bissl_jax.detection.voc_eval import voc_ap


def device_batch(arrays: Dict[str, np.ndarray], rows: np.ndarray) -> Dict[str, jax.Array]:
  """Rows of a split (uint8 images normalised with the ImageNet statistics)."""
  batch = {k: jnp.asarray(v[rows]) for k, v in arrays.items() if k != "images"}
  batch["images"] = normalize(jnp.asarray(arrays["images"][rows], jnp.float32) / 255.0)
  return batch


def make_train_step(detector: Detector, optimizer: optax.GradientTransformation):
  """``step(params, stats, opt_state, batch, key) -> (params, stats, opt_state, loss)``, jitted."""

  def step(params, stats, opt_state, batch, key):
    loss_fn = lambda p: detection_loss(detector, p, stats, batch, key, train=True)
    (loss, (_, new_stats, _)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), new_stats, opt_state, loss

  return jax.jit(step)


def fit(detector: Detector, train: Dict[str, np.ndarray], *, steps: int, batch_size: int,
        learning_rate: float, seed: int = 0) -> Tuple[dict, dict, np.ndarray]:
  """Trains from scratch with Adam on random batches; returns ``(params, stats, losses)``."""
  key = jax.random.key(seed)
  k_init, key = jax.random.split(key)
  params, stats = detector.init(k_init, train["images"].shape[1:3])
  optimizer = optax.adam(learning_rate)
  opt_state = optimizer.init(params)
  step = make_train_step(detector, optimizer)
  order = np.random.default_rng(seed)
  losses = []
  for _ in range(steps):
    rows = order.choice(len(train["images"]), batch_size, replace=False)
    key, k_step = jax.random.split(key)
    params, stats, opt_state, loss = step(params, stats, opt_state,
                                          device_batch(train, rows), k_step)
    losses.append(loss)
  return params, stats, np.asarray(jax.device_get(losses))


def evaluate_ap50(detector: Detector, params, stats, split: Dict[str, np.ndarray], *,
                  batch_size: int, use_07_metric: bool = True) -> dict:
  """VOC AP50 of the detector on a split (see :func:`voc_ap`); all rows are used."""
  detect = jax.jit(detector.detect)
  n = len(split["images"])
  detections = []
  for start in range(0, n, batch_size):
    rows = np.arange(start, min(start + batch_size, n))
    padded = np.resize(rows, batch_size)  # Fixed batch shape: repeat rows, drop them after.
    batch = device_batch(split, padded)
    out = jax.device_get(detect(params, stats, batch["images"], batch["image_sizes"]))
    detections += [{k: v[i] for k, v in out.items()} for i in range(len(rows))]
  truth = [{"boxes": split["gt_boxes"][i], "classes": split["gt_classes"][i],
            "valid": split["gt_valid"][i]} for i in range(n)]
  return voc_ap(detections, truth, use_07_metric=use_07_metric,
                num_classes=detector.config.num_classes)
