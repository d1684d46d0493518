"""Latent-feature inspection (paper Appendix C.2): BN recalibration, k-NN, t-SNE.

A pretext backbone's BatchNorm running statistics were estimated on the pretext
data. Before its features are compared with those of a BiSSL backbone, both are
*recalibrated*: their running statistics are replaced by statistics estimated on
about 100 batches of 256 downstream training images (paper C.2). Features of the
test split are then embedded with t-SNE and drawn side by side, each panel titled
with a cosine k-NN accuracy (train split as the memory bank, test split queried).

Choices recorded here (the paper is silent on them):

* **Recalibration is an exact pooled average, not the momentum EMA.** Every
  BatchNorm layer's result is the mean and the *pooled* (population) variance of its
  inputs over all recalibration samples, as if the batches were one big batch:
  ``mean = Σ n_b μ_b / N`` and ``var = (Σ n_b (σ²_b + (μ_b − mean)²)) / N``, where
  ``μ_b, σ²_b`` are the batch statistics that the training-mode forward normalises
  with (flax's biased batch variance). Batches are combined with Chan's parallel
  update, which is stable in float32.
* Recalibration batches are augmented with the downstream *training* view (random
  resized crop + flip), the data the backbone is fine-tuned on.
* k-NN uses cosine similarity and a similarity-weighted vote (each of the k
  neighbours adds its cosine similarity to its class; ties go to the lower class
  index). ``vote='majority'`` counts neighbours instead.
"""
import functools
import json
import os
from typing import Any, Dict, Iterable, List, Mapping, NamedTuple, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from bissl_jax.evaluation import fewshot
from bissl_jax.types import PyTree

_STAT_KEYS = ("mean", "var")


# ----------------------------------------------------------------------------- BN statistics

def _key_name(entry) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(entry, attr):
      return str(getattr(entry, attr))
  return str(entry)


def _stat_kind(path) -> Optional[str]:
  """'mean' or 'var' for a running-statistics leaf, else None."""
  name = _key_name(path[-1]) if path else ""
  return name if name in _STAT_KEYS else None


def _check_has_bn_stats(stats: PyTree) -> None:
  kinds = [_stat_kind(p) for p, _ in jax.tree_util.tree_flatten_with_path(stats)[0]]
  if "mean" not in kinds or "var" not in kinds:
    raise ValueError(
        "recalibrate_batch_stats: the backbone's batch_stats hold no 'mean'/'var' leaves, "
        "so there is no BatchNorm to recalibrate. Pass the backbone's own statistics "
        "(batch_stats['backbone']), not the whole model's or an empty tree.")


def _fill(stats: PyTree, value_fn) -> PyTree:
  """Maps every mean/var leaf through ``value_fn(leaf)``; other leaves pass through."""
  return jax.tree_util.tree_map_with_path(
      lambda p, x: value_fn(x) if _stat_kind(p) else x, stats)


class _Layer(NamedTuple):
  """Leaf indices (in ``tree_leaves`` order) of one BatchNorm's running mean and var."""
  mean: Optional[int]
  var: Optional[int]


def _bn_layers(stats: PyTree) -> List[_Layer]:
  """Groups the mean/var leaves of a statistics tree by their parent (one BatchNorm)."""
  parents: Dict[str, Dict[str, int]] = {}
  for i, (path, _) in enumerate(jax.tree_util.tree_flatten_with_path(stats)[0]):
    kind = _stat_kind(path)
    if kind:
      parents.setdefault(jax.tree_util.keystr(path[:-1]), {})[kind] = i
  return [_Layer(g.get("mean"), g.get("var")) for g in parents.values()]


def _measure_momenta(update_fn, params, stats, x) -> Dict[int, float]:
  """Each mean/var leaf's EMA momentum m in ``new = m·old + (1 − m)·batch``.

  Two training-mode forwards of the same batch, from running statistics 0 and from
  a probe value s, differ by exactly ``m·s``. The probe is chosen larger than the
  batch statistic so float32 rounding of the batch term cannot swamp ``m``; the
  median over channels gives one number per leaf.
  """
  from_zero = update_fn(params, _fill(stats, jnp.zeros_like), x)
  probe = jax.tree_util.tree_map(lambda z: 1.0 + 1e3 * jnp.abs(z), from_zero)
  from_probe = update_fn(params, probe, x)
  momenta = {}
  flat = jax.tree_util.tree_flatten_with_path(from_zero)[0]
  for i, ((path, z), s, q) in enumerate(zip(flat, jax.tree_util.tree_leaves(probe),
                                            jax.tree_util.tree_leaves(from_probe))):
    if not _stat_kind(path):
      continue
    m = float(np.median((np.asarray(q, np.float64) - np.asarray(z, np.float64))
                        / np.asarray(s, np.float64)))
    if not 0.0 <= m < 1.0 - 1e-6:
      raise ValueError(
          f"recalibrate_batch_stats: the BatchNorm statistic {jax.tree_util.keystr(path)} "
          f"updates with momentum {m:.6f}; recalibration needs running statistics that "
          "follow new = m·old + (1 − m)·batch with 0 ≤ m < 1 (flax nn.BatchNorm does).")
    momenta[i] = m
  return momenta


@jax.jit
def _pooled_update(acc, batch_means, batch_vars, count):
  """Chan's parallel update of (N, mean, M2) with one batch of ``count`` samples.

  ``M2`` is the sum of squared deviations: the pooled population variance is M2/N.
  """
  total, mean, m2 = acc
  new_total = total + count
  delta = [b - a for b, a in zip(batch_means, mean)]
  mean = [a + d * (count / new_total) for a, d in zip(mean, delta)]
  m2 = [a + count * v + d * d * (total * count / new_total)
        for a, v, d in zip(m2, batch_vars, delta)]
  return new_total, mean, m2


def recalibrate_batch_stats(model, backbone_params: PyTree, backbone_stats: PyTree,
                            batches: Iterable, *, size: int, rng=None,
                            augment: str = "train") -> PyTree:
  """Re-estimates a backbone's BatchNorm running statistics on downstream data.

  Pure: returns new statistics and leaves the inputs untouched. The incoming
  statistics are reset — the result depends only on their tree structure, the
  parameters and the batches. Every BatchNorm's mean becomes the average of its
  per-batch means weighted by batch size, and its variance the exact pooled
  (population) variance over all samples, not the momentum EMA (module docstring).

  Args:
    model: an object with ``features(backbone_params, backbone_stats, x, *, train)
      -> (feats, new_stats)`` (e.g. :class:`bissl_jax.models.resnet.BisslModel`) whose
      training-mode forward updates ``new = m·old + (1 − m)·batch`` for every leaf
      named 'mean' or 'var' (any flax ``nn.BatchNorm``; m is measured, not assumed).
    backbone_params: the backbone's parameters.
    backbone_stats: the backbone's running statistics (structure template).
    batches: iterable of image batches: uint8 ``(N, H, W, 3)`` unless
      ``augment='none'``, in which case they are fed to the model as they are.
    size: the model's input resolution.
    rng: PRNG key for the augmentation (``PRNGKey(0)`` when None).
    augment: 'train' (downstream training view), 'eval' (resize + centre crop) or
      'none' (batches are already model inputs).

  Returns:
    A tree shaped like ``backbone_stats`` with recalibrated mean/var leaves; any
    other leaves are returned unchanged.
  """
  _check_has_bn_stats(backbone_stats)
  if augment not in ("train", "eval", "none"):
    raise ValueError(f"recalibrate_batch_stats: augment={augment!r}; use 'train', 'eval' or "
                     "'none'.")
  rng = jax.random.PRNGKey(0) if rng is None else rng
  update_fn = _compiled("train_stats", model, "none", size)
  prepare = _compiled("view", model, augment, size)
  layers = _bn_layers(backbone_stats)
  zero_stats = _fill(backbone_stats, jnp.zeros_like)
  acc = momenta = None
  for i, images in enumerate(batches):
    x = prepare(jax.random.fold_in(rng, i), jnp.asarray(images))
    if momenta is None:
      momenta = _measure_momenta(update_fn, backbone_params, backbone_stats, x)
    # From zero running statistics the update returns exactly (1 − m)·batch statistic.
    out = jax.tree_util.tree_leaves(update_fn(backbone_params, zero_stats, x))
    batch = lambda j: out[j] / (1.0 - momenta[j])
    # A lone 'var' (no sibling mean) pools as the average of batch variances, and vice versa.
    means = [batch(l.mean) if l.mean is not None else jnp.zeros_like(out[l.var])
             for l in layers]
    variances = [batch(l.var) if l.var is not None else jnp.zeros_like(out[l.mean])
                 for l in layers]
    if acc is None:
      zeros = [jnp.zeros(m.shape, jnp.float32) for m in means]
      acc = (jnp.zeros((), jnp.float32), zeros, zeros)
    acc = _pooled_update(acc, means, variances, jnp.float32(x.shape[0]))
  if acc is None:
    raise ValueError("recalibrate_batch_stats: `batches` was empty; pass at least one batch.")
  total, mean, m2 = acc
  leaves, treedef = jax.tree_util.tree_flatten(backbone_stats)
  leaves = list(leaves)
  for layer, layer_mean, layer_m2 in zip(layers, mean, m2):
    if layer.mean is not None:
      leaves[layer.mean] = layer_mean.astype(leaves[layer.mean].dtype)
    if layer.var is not None:
      leaves[layer.var] = (layer_m2 / total).astype(leaves[layer.var].dtype)
  return jax.tree_util.tree_unflatten(treedef, leaves)


def _build(kind: str, model, augment: str, size: int):
  view = _view_fn(augment, size)
  if kind == "view":
    return jax.jit(view)
  assert kind == "train_stats", kind
  return jax.jit(lambda params, stats, x: model.features(params, stats, x, train=True)[1])


_build_cached = functools.lru_cache(maxsize=32)(_build)


def _compiled(kind: str, model, augment: str, size: int):
  """Jitted helpers, cached per (model, transform, size) so that several backbones and
  calls share one compilation; unhashable models get a fresh (uncached) function."""
  try:
    return _build_cached(kind, model, augment, size)
  except TypeError:
    return _build(kind, model, augment, size)


def _view_fn(augment: str, size: int):
  """``(rng, images) -> model inputs`` for the named transform."""
  if augment == "none":
    return lambda key, images: images
  from bissl_jax.tasks import augment as aug  # imported lazily: heavy and only needed here
  if augment == "train":
    return lambda key, images: aug.downstream_train_view(key, images, size=size)
  return lambda key, images: aug.eval_view(key, images, size=size)


def _gather(data, indices: np.ndarray) -> Tuple[np.ndarray, Optional[np.ndarray]]:
  """(images, labels) at ``indices`` of a dataset with ``.batch`` or of an image array."""
  if hasattr(data, "batch"):
    batch = data.batch(indices)
    return np.asarray(batch["image"]), np.asarray(batch["label"])
  return np.asarray(data)[indices], None


def recalibration_batches(data, *, batch_size: int = 256, num_batches: int = 100,
                          seed: int = 0):
  """Yields up to ``num_batches`` shuffled image batches from one pass over ``data``.

  One pass without repetition, as in the paper's "divided into batches of 256 and
  roughly 100 batches forward-passed". A trailing partial batch is dropped unless it
  is the only one (tiny BatchNorm batches give noisy statistics).

  Args:
    data: a dataset with ``__len__`` and ``batch(indices) -> {'image', ...}``
      (:class:`bissl_jax.data.ArrayDataset`) or a uint8 image array.
    batch_size: images per batch.
    num_batches: the most batches yielded.
    seed: shuffling seed.
  """
  n = len(data)
  order = np.random.default_rng(seed).permutation(n)
  full = n // batch_size
  bounds = [(i * batch_size, (i + 1) * batch_size) for i in range(full)] or [(0, n)]
  for lo, hi in bounds[:num_batches]:
    yield _gather(data, np.sort(order[lo:hi]))[0]


# ----------------------------------------------------------------------------- k-NN

def knn_accuracy(train_feats: np.ndarray, train_labels: np.ndarray, test_feats: np.ndarray,
                 test_labels: np.ndarray, *, k: int = 20, vote: str = "weighted",
                 chunk_size: int = 1024) -> float:
  """Top-1 accuracy of a cosine-similarity k-nearest-neighbour classifier.

  Args:
    train_feats: ``(N, D)`` memory-bank features.
    train_labels: ``(N,)`` integer labels.
    test_feats: ``(M, D)`` query features.
    test_labels: ``(M,)`` integer labels.
    k: neighbours per query (capped at N).
    vote: 'weighted' — each neighbour adds its cosine similarity to its class's
      score; 'majority' — each adds 1. Ties go to the lowest class index.
    chunk_size: queries per similarity block (bounds memory at chunk_size × N).

  Returns:
    Fraction of queries whose predicted class equals the label.
  """
  train_labels = np.asarray(train_labels)
  test_labels = np.asarray(test_labels)
  if train_labels.ndim != 1 or test_labels.ndim != 1:
    raise ValueError("knn_accuracy needs integer class labels of shape (N,); multi-label "
                     "targets (e.g. VOC2007) have no single k-NN class. Skip k-NN for them.")
  if vote not in ("weighted", "majority"):
    raise ValueError(f"knn_accuracy: vote={vote!r}; use 'weighted' or 'majority'.")
  if len(train_feats) != len(train_labels) or len(test_feats) != len(test_labels):
    raise ValueError("knn_accuracy: features and labels differ in length.")
  train = _l2_normalize(np.asarray(train_feats, np.float32))
  test = _l2_normalize(np.asarray(test_feats, np.float32))
  k = min(k, len(train))
  num_classes = int(max(train_labels.max(), test_labels.max())) + 1
  correct = 0
  for lo in range(0, len(test), chunk_size):
    sims = test[lo:lo + chunk_size] @ train.T                      # (m, N)
    idx = np.argpartition(-sims, k - 1, axis=1)[:, :k]             # k best, unordered
    top_sims = np.take_along_axis(sims, idx, axis=1)
    weights = top_sims if vote == "weighted" else np.ones_like(top_sims)
    scores = np.zeros((len(sims), num_classes), np.float64)
    np.add.at(scores, (np.arange(len(sims))[:, None], train_labels[idx]), weights)
    correct += int(np.sum(scores.argmax(axis=1) == test_labels[lo:lo + chunk_size]))
  return correct / len(test)


def _l2_normalize(x: np.ndarray) -> np.ndarray:
  return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


# ----------------------------------------------------------------------------- t-SNE

def tsne_embed(feats: np.ndarray, *, seed: int = 0, perplexity: float = 30.0) -> np.ndarray:
  """2-D t-SNE embedding (scikit-learn, PCA init); perplexity is capped for few points."""
  from sklearn.manifold import TSNE
  feats = np.asarray(feats, np.float32)
  if len(feats) < 3:
    raise ValueError(f"tsne_embed: t-SNE needs at least 3 points, got {len(feats)}.")
  perplexity = min(float(perplexity), (len(feats) - 1) / 3.0)
  return TSNE(n_components=2, perplexity=perplexity, init="pca", learning_rate="auto",
              random_state=seed).fit_transform(feats)


def tsne_figure(features_by_name: Mapping[str, Tuple[np.ndarray, np.ndarray]], path: str, *,
                knn: Optional[Mapping[str, float]] = None, seed: int = 0,
                perplexity: float = 30.0) -> str:
  """Writes a PNG of t-SNE embeddings, one panel per backbone, on shared axes.

  Args:
    features_by_name: ``{name: (feats (N, D), labels (N,))}``, e.g. pretext vs BiSSL.
      Multi-hot labels are coloured by their first positive class.
    path: PNG path to write (parent folders are created).
    knn: optional ``{name: accuracy}`` shown in each panel's title.
    seed: t-SNE random state.
    perplexity: t-SNE perplexity (capped at (N − 1)/3).

  Returns:
    ``path``.
  """
  import matplotlib
  from matplotlib.lines import Line2D
  from bissl_jax.evaluation import plots

  if not features_by_name:
    raise ValueError("tsne_figure: features_by_name is empty.")
  names = list(features_by_name)
  labels = {n: _class_ids(features_by_name[n][1]) for n in names}
  num_classes = max(int(l.max()) for l in labels.values()) + 1
  palette = "tab10" if num_classes <= 10 else "tab20" if num_classes <= 20 else "turbo"
  cmap = matplotlib.colormaps[palette]
  colour_of = ((lambda ids: cmap(ids)) if num_classes <= 20  # listed palette: index = class
               else (lambda ids: cmap(ids / (num_classes - 1))))
  fig, axes = plots.new_figure(1, len(names), figsize=(5.5 * len(names), 5.5),
                               sharex=True, sharey=True)
  for ax, name in zip(axes[0], names):
    emb = tsne_embed(features_by_name[name][0], seed=seed, perplexity=perplexity)
    ax.scatter(emb[:, 0], emb[:, 1], c=colour_of(labels[name]), s=6, alpha=0.8, linewidths=0)
    title = name if not knn or knn.get(name) is None else f"{name} (k-NN acc. {100 * knn[name]:.1f}%)"
    ax.set_title(title)
    ax.set_xticks([])
    ax.set_yticks([])
  if num_classes <= 20:
    handles = [Line2D([], [], marker="o", ls="", color=colour_of(c), label=str(c))
               for c in range(num_classes)]
    fig.legend(handles=handles, loc="center right", title="class", frameon=False)
    fig.tight_layout(rect=(0, 0, 0.93, 1))
  else:
    fig.tight_layout()
  return plots.save_figure(fig, path)


def _class_ids(labels: np.ndarray) -> np.ndarray:
  labels = np.asarray(labels)
  return labels.argmax(axis=1) if labels.ndim > 1 else labels.astype(np.int64)


# ----------------------------------------------------------------------------- end to end

def _subsample(n: int, max_points: Optional[int], seed: int) -> np.ndarray:
  if max_points is None or n <= max_points:
    return np.arange(n)
  return np.sort(np.random.default_rng(seed).choice(n, max_points, replace=False))


def visualize_backbones(model, backbones: Mapping[str, Tuple[PyTree, PyTree]], splits: Mapping,
                        out_dir: str, *, size: int, num_batches: int = 100, max_points: int = 2000,
                        batch_size: int = 256, k: int = 20, seed: int = 0,
                        max_train_points: Optional[int] = None,
                        filename: str = "tsne.png") -> Dict[str, Any]:
  """Recalibrate → extract → k-NN → t-SNE figure, for several backbones at once.

  Args:
    model: object with ``features(params, stats, x, *, train)``.
    backbones: ``{name: (backbone_params, backbone_stats)}``, e.g.
      ``{'pretext': ..., 'BiSSL': ...}``; panels follow this order.
    splits: ``{'train', 'test'}`` datasets with ``__len__`` and ``batch(indices) ->
      {'image': uint8, 'label'}`` (:class:`bissl_jax.data.ArrayDataset`).
    out_dir: folder for the figure and ``knn.json``.
    size: model input resolution.
    num_batches: recalibration batches (of ``batch_size``) from the train split.
    max_points: test points drawn in the t-SNE (random subset; k-NN uses all).
    batch_size: recalibration and extraction batch size (paper: 256).
    k: neighbours for the k-NN accuracy.
    seed: shuffling, subsampling and t-SNE seed.
    max_train_points: cap on the k-NN memory bank (None: the whole train split).
    filename: name of the PNG inside ``out_dir``.

  Returns:
    ``{'figure': path, 'knn_accuracy': {name: float or None}, 'knn_k': k,
    'num_recalibration_batches': int, 'batch_stats': {name: recalibrated stats}}``;
    everything but 'batch_stats' is also written to ``out_dir/knn.json``.
  """
  train, test = splits["train"], splits["test"]
  bank_images, bank_labels = _gather(train, _subsample(len(train), max_train_points, seed))
  test_images, test_labels = _gather(test, np.arange(len(test)))
  multilabel = bool(getattr(test, "multilabel", test_labels.ndim > 1))
  shown = _subsample(len(test_images), max_points, seed)
  rng = jax.random.PRNGKey(seed)
  knn, panels, new_stats = {}, {}, {}
  used = min(num_batches, max(1, len(train) // batch_size))
  for name, (params, stats) in backbones.items():
    # A fresh generator per backbone: the same batches, one at a time in memory.
    batches = recalibration_batches(train, batch_size=batch_size, num_batches=num_batches,
                                    seed=seed)
    stats = recalibrate_batch_stats(model, params, stats, batches, size=size, rng=rng)
    new_stats[name] = stats
    extract = functools.partial(fewshot.extract_features, model, params, stats,
                                image_size=size, batch_size=batch_size)
    test_feats = extract(test_images)
    # k-NN needs one class per example; multi-label sets (VOC2007) get None.
    knn[name] = None if multilabel else knn_accuracy(
        extract(bank_images), bank_labels, test_feats, test_labels, k=k)
    panels[name] = (test_feats[shown], test_labels[shown])
  os.makedirs(out_dir, exist_ok=True)
  figure = tsne_figure(panels, os.path.join(out_dir, filename), knn=knn, seed=seed)
  summary = {"figure": figure, "knn_accuracy": knn, "knn_k": k,
             "num_recalibration_batches": used}
  with open(os.path.join(out_dir, "knn.json"), "w") as f:
    json.dump(summary, f, indent=2)
  return dict(summary, batch_stats=new_stats)
