"""Evaluation protocols of GeSSL (paper §6.2, §6.3, §6.5): linear probe, few-label
subsets and N-way K-shot episodes on held-out classes.

* :func:`linear_probe`: a linear classifier on frozen features, trained with SGD
  (momentum 0.9, batch 128, cosine LR 5e-2 → 5e-6 in the paper, 500 epochs there).
* :func:`stratified_subset`: the balanced 1% / 10% label subsets of §6.3 (fine-tuning
  on them uses the library's ordinary fine-tuning stage).
* :func:`class_split`, :func:`sample_episodes`, :func:`evaluate_episodes`: few-shot
  episodes drawn from classes disjoint from the pretraining classes, classified
  on frozen features by the nearest class mean (prototype) or by a logistic
  regression fitted to the support set, reported as mean ± 95% confidence
  interval (:func:`mean_ci95`).

Everything here runs on features (NumPy or JAX arrays); :func:`extract_features`
computes them from a model's backbone in evaluation mode.
"""
import functools
from typing import NamedTuple, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from bissl_jax.tasks.downstream.heads import pool_features
from bissl_jax.tasks import augment as augmentation
from bissl_jax.implicit import loops
from bissl_jax.core import optim
from bissl_jax.data.stacks import process_shard
from bissl_jax.runtime import mesh as parallel
from bissl_jax.types import PyTree

CLASSIFIERS = ("prototype", "logistic")


# ----------------------------------------------------------------------------- features

def extract_features(model, backbone_params: PyTree, backbone_stats: PyTree,
                     images: np.ndarray, *, image_size: int, batch_size: int = 256,
                     augment: str = "eval", mesh=None) -> np.ndarray:
  """Evaluation-mode backbone features of ``images``, pooled and flattened.

  Batches have one fixed size (the last one is padded with its last image and the
  padding dropped), so one shape compiles; evaluation mode is per example, so the
  padding does not change the real rows.

  Args:
    model: object with ``features(params, stats, x, *, train) -> (feats, stats)``.
    backbone_params: backbone parameters.
    backbone_stats: backbone running statistics (used as they are).
    images: uint8 ``(N, H, W, 3)`` (model inputs when ``augment='none'``).
    image_size: model input resolution.
    batch_size: images per forward (rounded up to a multiple of the mesh's devices).
    augment: 'eval' (resize the short side to size/0.875, centre crop, normalise) or
      'none' (``images`` are already model inputs).
    mesh: split every batch over this mesh's devices. Every process passes the same
      ``images``, computes the rows its devices hold (``bissl_jax.data.process_shard``)
      and receives all the features, so one call serves several processes.

  Returns:
    float32 ``(N, D)`` NumPy features.
  """
  if augment not in ("eval", "none"):
    raise ValueError(f"extract_features: augment={augment!r}; use 'eval' or 'none'.")
  images = np.asarray(images)
  n = len(images)
  if n == 0:
    raise ValueError("extract_features: no images given.")
  batch_size = min(int(batch_size), n)
  forward = _features_fn(model, int(image_size), augment)
  if mesh is not None:
    batch_size = -(-batch_size // mesh.devices.size) * mesh.devices.size
    backbone_params, backbone_stats = parallel.replicate((backbone_params, backbone_stats), mesh)
    first, rows = process_shard(batch_size)
  chunks = []
  for lo in range(0, n, batch_size):
    idx = np.arange(lo, min(lo + batch_size, n))
    padded = images[np.concatenate([idx, np.full(batch_size - len(idx), idx[-1])])]
    if mesh is None:
      out = np.asarray(forward(backbone_params, backbone_stats, jnp.asarray(padded)))
    else:
      x = parallel.shard_batch(padded[first:first + rows], mesh)
      out = parallel.to_host(forward(backbone_params, backbone_stats, x))
    chunks.append(out[:len(idx)])
  return np.concatenate(chunks).astype(np.float32)


def _features_fn(model, image_size: int, augment: str):
  """The jitted forward, one compilation per (model, size, transform); a model that
  cannot be hashed gets a fresh one."""
  try:
    return _cached_features_fn(model, image_size, augment)
  except TypeError:
    return _build_features_fn(model, image_size, augment)


def _build_features_fn(model, image_size: int, augment: str):
  # Parameters are arguments, not constants: one compilation serves every backbone.
  def feats(backbone_params, backbone_stats, x):
    if augment == "eval":
      x = augmentation.eval_view(None, x, size=image_size)
    out = pool_features(model.features(backbone_params, backbone_stats, x, train=False)[0])
    return out.reshape(out.shape[0], -1).astype(jnp.float32)
  return jax.jit(feats)


_cached_features_fn = functools.lru_cache(maxsize=16)(_build_features_fn)


# ----------------------------------------------------------------------------- linear probe

class ProbeResult(NamedTuple):
  """Linear-probe outcome: test accuracy, the head ``{'w', 'b'}`` and the last epoch's mean loss."""
  accuracy: float
  head: dict
  final_loss: float


def linear_probe(train_feats, train_labels, test_feats, test_labels, *, num_classes: int,
                 epochs: int = 100, batch_size: int = 128, lr: float = 5e-2,
                 final_lr: float = 5e-6, momentum: float = 0.9, weight_decay: float = 0.0,
                 seed: int = 0) -> ProbeResult:
  """Trains a linear classifier on frozen features with SGD and scores it.

  The paper's protocol (§6.2): SGD with momentum 0.9, batch 128, the LR decaying
  from 5e-2 to 5e-6 (a cosine here; the paper does not name the curve), 500 epochs.
  Each epoch is a fresh permutation; the remainder batch is dropped (the whole set
  is one batch when it is smaller than ``batch_size``).

  Returns:
    A :class:`ProbeResult`.
  """
  x = jnp.asarray(train_feats, jnp.float32)
  y = jnp.asarray(train_labels, jnp.int32)
  n, dim = x.shape
  batch = min(int(batch_size), n)
  per_epoch = n // batch
  total = max(per_epoch * int(epochs), 1)
  schedule = optax.cosine_decay_schedule(lr, decay_steps=total, alpha=final_lr / lr)
  tx = optim.sgd(schedule, momentum=momentum, weight_decay=weight_decay)
  head = {"w": jnp.zeros((dim, int(num_classes))), "b": jnp.zeros((int(num_classes),))}

  def loss_fn(h, xb, yb):
    logits = xb @ h["w"] + h["b"]
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, yb))

  def sgd_step(carry, idx):
    h, state = carry
    loss, grads = jax.value_and_grad(loss_fn)(h, x[idx], y[idx])
    updates, state = tx.update(grads, state, h)
    return (optax.apply_updates(h, updates), state), loss

  @jax.jit
  def epoch(carry, key):
    order = jax.random.permutation(key, n)[:per_epoch * batch].reshape(per_epoch, batch)
    # A linear model has no loop cliff: a lax loop, not an unrolled one.
    carry, losses = loops.scan(sgd_step, carry, order, unroll=False)
    return carry, jnp.mean(losses)

  carry = (head, tx.init(head))
  last = float("nan")
  for key in jax.random.split(jax.random.PRNGKey(seed), int(epochs)):
    carry, last = epoch(carry, key)
  head = carry[0]
  preds = np.asarray(jnp.argmax(jnp.asarray(test_feats, jnp.float32) @ head["w"] + head["b"], -1))
  acc = float(np.mean(preds == np.asarray(test_labels)))
  return ProbeResult(acc, jax.tree_util.tree_map(np.asarray, head), float(last))


# ----------------------------------------------------------------------------- subsets and splits

def stratified_subset(labels, fraction: float, *, seed: int = 0) -> np.ndarray:
  """Sorted indices of a class-balanced subset: ``max(1, round(fraction·n_c))`` per class.

  Deterministic in ``seed``; used for the 1% and 10% label subsets of §6.3.
  """
  if not 0.0 < fraction <= 1.0:
    raise ValueError(f"fraction={fraction} must be in (0, 1], e.g. 0.01 or 0.1.")
  labels = np.asarray(labels)
  rng = np.random.default_rng(seed)
  picks = []
  for c in np.unique(labels):
    members = np.flatnonzero(labels == c)
    take = max(1, int(round(fraction * len(members))))
    picks.append(rng.choice(members, size=take, replace=False))
  return np.sort(np.concatenate(picks))


def class_split(num_classes: int, num_held_out: int, *, seed: Optional[int] = None
                ) -> Tuple[np.ndarray, np.ndarray]:
  """``(train_classes, held_out_classes)``, disjoint and covering ``range(num_classes)``.

  ``seed=None`` holds out the last ``num_held_out`` classes (the usual fixed split);
  an int draws them at random, deterministically.
  """
  if not 0 < num_held_out < num_classes:
    raise ValueError(f"num_held_out={num_held_out} must be in [1, num_classes-1={num_classes - 1}].")
  classes = np.arange(num_classes)
  if seed is None:
    held = classes[-num_held_out:]
  else:
    held = np.sort(np.random.default_rng(seed).choice(classes, num_held_out, replace=False))
  return np.setdiff1d(classes, held), held


def examples_of(labels, classes: Sequence[int]) -> np.ndarray:
  """Indices of the examples whose label is in ``classes``."""
  return np.flatnonzero(np.isin(np.asarray(labels), np.asarray(classes)))


# ----------------------------------------------------------------------------- episodes

class Episodes(NamedTuple):
  """Index arrays of ``E`` N-way K-shot episodes into the feature/label arrays.

  Attributes:
    classes: ``(E, N)`` the original labels of each episode's classes (way j is class
      ``classes[e, j]``).
    support: ``(E, N, K)`` indices.
    query: ``(E, N, Q)`` indices, disjoint from the episode's support.
  """
  classes: np.ndarray
  support: np.ndarray
  query: np.ndarray


def sample_episodes(labels, classes: Sequence[int], *, n_way: int, k_shot: int,
                    n_query: int, episodes: int, seed: int = 0) -> Episodes:
  """Draws episodes from ``classes`` only (pass the held-out classes of :func:`class_split`).

  Each episode picks ``n_way`` distinct classes, then ``k_shot + n_query`` distinct
  examples of each, the first ``k_shot`` as support. Deterministic in ``seed``.
  """
  labels = np.asarray(labels)
  classes = np.asarray(classes)
  if n_way > len(classes):
    raise ValueError(f"n_way={n_way} exceeds the {len(classes)} classes available.")
  pools = {int(c): np.flatnonzero(labels == c) for c in classes}
  need = k_shot + n_query
  short = {c: len(p) for c, p in pools.items() if len(p) < need}
  if short:
    raise ValueError(f"classes {short} have fewer than k_shot+n_query={need} examples; "
                     "lower n_query.")
  rng = np.random.default_rng(seed)
  cls = np.empty((episodes, n_way), np.int64)
  sup = np.empty((episodes, n_way, k_shot), np.int64)
  qry = np.empty((episodes, n_way, n_query), np.int64)
  for e in range(episodes):
    cls[e] = rng.choice(classes, size=n_way, replace=False)
    for j, c in enumerate(cls[e]):
      pick = rng.choice(pools[int(c)], size=need, replace=False)
      sup[e, j], qry[e, j] = pick[:k_shot], pick[k_shot:]
  return Episodes(cls, sup, qry)


def prototype_predict(support_feats, support_labels, query_feats, n_way: int,
                      metric: str = "euclidean") -> np.ndarray:
  """Nearest class mean (prototypical networks) on frozen features.

  Args:
    support_feats: ``(S, D)``; support_labels: ``(S,)`` in ``0..n_way−1``.
    query_feats: ``(Q, D)``.
    metric: 'euclidean' (squared distance) or 'cosine' (features L2-normalised first).

  Returns:
    ``(Q,)`` predicted ways.
  """
  s = np.asarray(support_feats, np.float64)
  q = np.asarray(query_feats, np.float64)
  if metric == "cosine":
    s = s / np.maximum(np.linalg.norm(s, axis=1, keepdims=True), 1e-12)
    q = q / np.maximum(np.linalg.norm(q, axis=1, keepdims=True), 1e-12)
  elif metric != "euclidean":
    raise ValueError(f"metric={metric!r}; use 'euclidean' or 'cosine'.")
  labels = np.asarray(support_labels)
  protos = np.stack([s[labels == j].mean(0) for j in range(n_way)])
  dist = ((q[:, None, :] - protos[None]) ** 2).sum(-1)
  return np.argmin(dist, axis=1)


def logistic_predict(support_feats, support_labels, query_feats, n_way: int,
                     c: float = 1.0) -> np.ndarray:
  """Multinomial logistic regression fitted to the support set (scikit-learn, L2 ``C``)."""
  from sklearn.linear_model import LogisticRegression  # pylint: disable=import-outside-toplevel
  del n_way
  clf = LogisticRegression(C=c, max_iter=1000)
  clf.fit(np.asarray(support_feats), np.asarray(support_labels))
  return clf.predict(np.asarray(query_feats))


def evaluate_episodes(features, episodes: Episodes, *, classifier: str = "prototype",
                      metric: str = "euclidean") -> np.ndarray:
  """Per-episode query accuracy of ``classifier`` on frozen ``features`` ``(N, D)``."""
  if classifier not in CLASSIFIERS:
    raise ValueError(f"classifier={classifier!r}; valid choices: {CLASSIFIERS}.")
  feats = np.asarray(features)
  num, n_way, k_shot = episodes.support.shape
  n_query = episodes.query.shape[2]
  sup_y = np.repeat(np.arange(n_way), k_shot)
  qry_y = np.repeat(np.arange(n_way), n_query)
  accs = np.empty(num)
  for e in range(num):
    s, q = feats[episodes.support[e].reshape(-1)], feats[episodes.query[e].reshape(-1)]
    if classifier == "prototype":
      pred = prototype_predict(s, sup_y, q, n_way, metric)
    else:
      pred = logistic_predict(s, sup_y, q, n_way)
    accs[e] = np.mean(pred == qry_y)
  return accs


def mean_ci95(values) -> dict:
  """``{'mean', 'ci95', 'n'}`` with ``ci95 = 1.96·std/√n`` (std with ddof=0, as the
  few-shot literature's evaluation code computes it)."""
  values = np.asarray(values, np.float64).reshape(-1)
  if values.size == 0:
    raise ValueError("mean_ci95 needs at least one value.")
  return {"mean": float(values.mean()),
          "ci95": float(1.96 * values.std() / np.sqrt(values.size)), "n": int(values.size)}


def few_shot_accuracy(features, labels, classes: Sequence[int], *, n_way: int, k_shot: int,
                      n_query: int = 15, episodes: int = 600, seed: int = 0,
                      classifier: str = "prototype", metric: str = "euclidean") -> dict:
  """:func:`sample_episodes` + :func:`evaluate_episodes` + :func:`mean_ci95`."""
  eps = sample_episodes(labels, classes, n_way=n_way, k_shot=k_shot, n_query=n_query,
                        episodes=episodes, seed=seed)
  return mean_ci95(evaluate_episodes(features, eps, classifier=classifier, metric=metric))
