"""BN recalibration, feature extraction, k-NN and the t-SNE figure (bissl_jax.evaluation.visualize)."""
import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from bissl_jax.evaluation import fewshot
from bissl_jax.evaluation import visualize
from bissl_jax.runtime.errors import USER_ERROR_STATUS

EPS = 1e-5


class _TinyNet(nn.Module):
  """1×1 conv → BN(m=0.9) → ReLU → spatial mean → dense → BN(m=0.99).

  Two momenta show the recalibration does not assume one; the first BatchNorm pools
  over batch *and* space, the second over the batch only.
  """

  @nn.compact
  def __call__(self, x, *, train: bool):
    h = nn.Conv(5, (1, 1), name="conv")(x)
    h = nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=EPS, name="bn1")(h)
    h = nn.relu(h).mean(axis=(1, 2))
    h = nn.Dense(3, name="dense")(h)
    return nn.BatchNorm(use_running_average=not train, momentum=0.99, epsilon=EPS,
                        name="bn2")(h)


class _TinyModel:
  """The ``features`` interface of :class:`bissl_jax.models.resnet.BisslModel`."""
  net = _TinyNet()

  def features(self, params, stats, x, *, train):
    variables = {"params": params, "batch_stats": stats}
    if train:
      out, mutated = self.net.apply(variables, x, train=True, mutable=["batch_stats"])
      return out, mutated["batch_stats"]
    return self.net.apply(variables, x, train=False), stats


def _init_tiny(seed=0, channels=2):
  variables = _TinyNet().init(jax.random.PRNGKey(seed), jnp.zeros((1, 4, 4, channels)),
                              train=False)
  params = jax.tree_util.tree_map(np.asarray, variables["params"])
  # Non-trivial BN affine parameters, so layer 2's inputs depend on them.
  rng = np.random.default_rng(seed)
  for bn in ("bn1", "bn2"):
    for name in ("scale", "bias"):
      params[bn][name] = rng.normal(size=params[bn][name].shape).astype(np.float32) + (
          1.0 if name == "scale" else 0.5)
  return params, variables["batch_stats"]


def _numpy_pooled_stats(params, batches):
  """Reference: each BN's pre-activations over all batches, with per-batch normalisation."""
  pre1, pre2 = [], []
  for x in batches:
    x = np.asarray(x, np.float64)
    h = np.einsum("nhwc,cd->nhwd", x, params["conv"]["kernel"][0, 0]) + params["conv"]["bias"]
    pre1.append(h.reshape(-1, h.shape[-1]))
    mu, var = h.mean(axis=(0, 1, 2)), h.var(axis=(0, 1, 2))
    h = (h - mu) / np.sqrt(var + EPS) * params["bn1"]["scale"] + params["bn1"]["bias"]
    h = np.maximum(h, 0).mean(axis=(1, 2))
    pre2.append(h @ params["dense"]["kernel"] + params["dense"]["bias"])
  pre1, pre2 = np.concatenate(pre1), np.concatenate(pre2)
  return {"bn1": {"mean": pre1.mean(0), "var": pre1.var(0)},
          "bn2": {"mean": pre2.mean(0), "var": pre2.var(0)}}


def _batches(seed=1, sizes=(8, 8, 5)):
  rng = np.random.default_rng(seed)
  # Offset and scale the inputs so the means are far from 0 and the variances from 1.
  return [(3.0 + 2.0 * rng.normal(size=(n, 4, 4, 2))).astype(np.float32) for n in sizes]


def test_recalibrated_stats_equal_direct_mean_and_variance():
  params, stats = _init_tiny()
  # Garbage incoming statistics: recalibration resets them.
  stats = jax.tree_util.tree_map(lambda s: s + 7.0, stats)
  batches = _batches()
  new = visualize.recalibrate_batch_stats(_TinyModel(), params, stats, batches, size=4,
                                          augment="none")
  expected = _numpy_pooled_stats(params, batches)
  for bn in ("bn1", "bn2"):
    for kind in ("mean", "var"):
      np.testing.assert_allclose(np.asarray(new[bn][kind]), expected[bn][kind],
                                 rtol=2e-4, atol=2e-5, err_msg=f"{bn}/{kind}")
  # Unequal batches are weighted by size: the plain average of batch means differs.
  naive = np.mean([np.asarray(b, np.float64).mean((0, 1, 2)) for b in batches], axis=0)
  assert not np.allclose(naive, np.concatenate(batches).mean((0, 1, 2)), rtol=1e-3)
  # The inputs were not modified (pure function).
  assert float(np.asarray(stats["bn1"]["mean"]).min()) == pytest.approx(7.0)


def test_recalibration_is_not_the_momentum_ema():
  params, stats = _init_tiny()
  batches = _batches(sizes=(8, 8, 8, 8))
  model = _TinyModel()
  ema = stats
  for x in batches:
    _, ema = model.features(params, ema, jnp.asarray(x), train=True)
  new = visualize.recalibrate_batch_stats(model, params, stats, batches, size=4, augment="none")
  expected = _numpy_pooled_stats(params, batches)
  np.testing.assert_allclose(np.asarray(new["bn2"]["mean"]), expected["bn2"]["mean"], rtol=2e-4,
                             atol=2e-5)
  assert not np.allclose(np.asarray(ema["bn2"]["mean"]), expected["bn2"]["mean"], atol=1e-2)


def test_recalibration_rejects_trees_without_batchnorm():
  params, _ = _init_tiny()
  with pytest.raises(ValueError, match="no 'mean'/'var'"):
    visualize.recalibrate_batch_stats(_TinyModel(), params, {}, _batches(), size=4,
                                      augment="none")
  with pytest.raises(ValueError, match="empty"):
    visualize.recalibrate_batch_stats(_TinyModel(), *_init_tiny(), [], size=4, augment="none")


def test_extract_features_matches_direct_eval_forward_with_padding():
  params, stats = _init_tiny()
  stats = visualize.recalibrate_batch_stats(_TinyModel(), params, stats, _batches(), size=4,
                                            augment="none")
  x = np.concatenate(_batches(seed=3, sizes=(7, 6)))
  feats = fewshot.extract_features(_TinyModel(), params, stats, x, image_size=4,
                                   batch_size=5, augment="none")
  # Eval mode by hand in NumPy: running statistics, no batch statistics.
  h = np.einsum("nhwc,cd->nhwd", x.astype(np.float64), params["conv"]["kernel"][0, 0])
  h = h + params["conv"]["bias"]
  h = (h - np.asarray(stats["bn1"]["mean"])) / np.sqrt(np.asarray(stats["bn1"]["var"]) + EPS)
  h = np.maximum(h * params["bn1"]["scale"] + params["bn1"]["bias"], 0).mean(axis=(1, 2))
  h = h @ params["dense"]["kernel"] + params["dense"]["bias"]
  h = (h - np.asarray(stats["bn2"]["mean"])) / np.sqrt(np.asarray(stats["bn2"]["var"]) + EPS)
  h = h * params["bn2"]["scale"] + params["bn2"]["bias"]
  assert feats.shape == (13, 3) and feats.dtype == np.float32
  np.testing.assert_allclose(feats, h, rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------- k-NN

def _brute_force_knn(train, train_labels, test, test_labels, k, weighted):
  """Per-query loop: cosine similarities, full sort, class scores."""
  correct = 0
  for q, label in zip(test, test_labels):
    sims = np.array([q @ t / (np.linalg.norm(q) * np.linalg.norm(t)) for t in train])
    nearest = np.argsort(-sims, kind="stable")[:k]
    scores = {}
    for j in nearest:
      scores[train_labels[j]] = scores.get(train_labels[j], 0.0) + (sims[j] if weighted else 1.0)
    best = max(sorted(scores), key=lambda c: scores[c])  # ties → lowest class
    correct += best == label
  return correct / len(test)


@pytest.mark.parametrize("k", [1, 5, 20])
def test_knn_weighted_vote_matches_brute_force(k):
  rng = np.random.default_rng(k)
  centres = rng.normal(size=(4, 8))
  train_labels = rng.integers(0, 4, 120)
  test_labels = rng.integers(0, 4, 50)
  train = centres[train_labels] + 0.9 * rng.normal(size=(120, 8))
  test = centres[test_labels] + 0.9 * rng.normal(size=(50, 8))
  got = visualize.knn_accuracy(train, train_labels, test, test_labels, k=k, chunk_size=16)
  want = _brute_force_knn(train, train_labels, test, test_labels, k, weighted=True)
  assert got == pytest.approx(want)
  assert 0.3 < got <= 1.0  # clustered data: far above chance (0.25)


def test_knn_majority_vote_matches_sklearn():
  from sklearn.neighbors import KNeighborsClassifier
  rng = np.random.default_rng(0)
  # Two classes and odd k: no vote ties, so the tie rule cannot matter.
  train_labels = rng.integers(0, 2, 200)
  test_labels = rng.integers(0, 2, 80)
  train = rng.normal(size=(200, 6)) + train_labels[:, None] * 0.8
  test = rng.normal(size=(80, 6)) + test_labels[:, None] * 0.8
  ref = KNeighborsClassifier(n_neighbors=7, metric="cosine", algorithm="brute")
  want = ref.fit(train, train_labels).score(test, test_labels)
  got = visualize.knn_accuracy(train, train_labels, test, test_labels, k=7, vote="majority")
  assert got == pytest.approx(want)


def test_knn_hand_example_and_errors():
  train = np.array([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0]])
  labels = np.array([0, 0, 1])
  # Cosine ignores the norm: (5, 0.1) points at class 0, (0.1, 3) at class 1.
  test = np.array([[5.0, 0.1], [0.1, 3.0]])
  assert visualize.knn_accuracy(train, labels, test, np.array([0, 1]), k=1) == 1.0
  assert visualize.knn_accuracy(train, labels, test, np.array([1, 1]), k=1) == 0.5
  with pytest.raises(ValueError, match="multi-label"):
    visualize.knn_accuracy(train, np.eye(3), test, np.eye(2), k=1)


# ----------------------------------------------------------------------------- t-SNE

def _check_png(path, *, wider=False):
  assert os.path.isfile(path)
  with Image.open(path) as image:
    image.verify()
  with Image.open(path) as image:
    assert image.format == "PNG" and image.mode in ("RGB", "RGBA")
    width, height = image.size
  assert width >= 200 and height >= 200
  if wider:
    assert width > 1.5 * height


def test_tsne_figure_writes_side_by_side_png(tmp_path):
  rng = np.random.default_rng(0)
  labels = np.repeat(np.arange(3), 20)
  feats = {"pretext": (rng.normal(size=(60, 16)), labels),
           "BiSSL": (rng.normal(size=(60, 16)) + 3 * np.eye(16)[labels], labels)}
  path = visualize.tsne_figure(feats, str(tmp_path / "sub" / "tsne.png"),
                               knn={"pretext": 0.4, "BiSSL": 0.9}, perplexity=30)
  assert path.endswith("tsne.png") and os.path.isfile(path)
  _check_png(path, wider=True)  # a valid PNG, wider than tall: two panels side by side


def test_visualize_backbones_end_to_end(tmp_path):
  from bissl_jax.data import ArrayDataset
  rng = np.random.default_rng(0)

  def dataset(n):
    labels = rng.integers(0, 3, n)
    images = (rng.integers(0, 60, size=(n, 8, 8, 3)) + 60 * labels[:, None, None, None])
    return ArrayDataset(images=images.astype(np.uint8), labels=labels, num_classes=3)

  splits = {"train": dataset(40), "test": dataset(30)}
  params, stats = _init_tiny(channels=3)
  params_b, _ = _init_tiny(seed=1, channels=3)
  out = visualize.visualize_backbones(
      _TinyModel(), {"pretext": (params, stats), "BiSSL": (params_b, stats)}, splits,
      str(tmp_path), size=8, num_batches=3, batch_size=16, max_points=25, k=5)
  _check_png(out["figure"], wider=True)
  assert out["num_recalibration_batches"] == 2  # 40 // 16 full batches, one pass
  assert set(out["knn_accuracy"]) == {"pretext", "BiSSL"}
  assert all(0.0 <= a <= 1.0 for a in out["knn_accuracy"].values())
  # Recalibrated on the training data: the stats differ from the (all-zero/one) init.
  assert not np.allclose(np.asarray(out["batch_stats"]["BiSSL"]["bn1"]["mean"]), 0.0)
  with open(tmp_path / "knn.json") as f:
    assert json.load(f)["knn_accuracy"] == out["knn_accuracy"]


# ----------------------------------------------------------------------------- real backbone, CLI

def _tiny_resnet():
  from bissl_jax.models.resnet import build_model
  model = build_model("resnet18", width_multiplier=0.125, cifar_stem=True)
  params, stats = model.init(jax.random.PRNGKey(0), 16)
  return model, params, stats


@pytest.mark.slow  # about 20 s on a shared 2-core CPU
def test_recalibration_of_resnet_equals_per_batch_statistics():
  """On the real ResNet: one batch → its batch statistics, read off the EMA update with
  the documented momentum 0.9 (``new = 0.9·old + 0.1·batch``); two equal batches →
  the mean of the two means and the pooled variance."""
  model, params, stats = _tiny_resnet()
  rng = np.random.default_rng(0)
  xs = [rng.normal(size=(6, 16, 16, 3)).astype(np.float32) + 0.5 for _ in range(2)]
  zeros = jax.tree_util.tree_map(jnp.zeros_like, stats["backbone"])
  per_batch = [jax.tree_util.tree_map(lambda s: np.asarray(s, np.float64) / 0.1,
                                      model.features(params["backbone"], zeros, jnp.asarray(x),
                                                     train=True)[1]) for x in xs]
  one = visualize.recalibrate_batch_stats(model, params["backbone"], stats["backbone"], xs[:1],
                                          size=16, augment="none")
  two = visualize.recalibrate_batch_stats(model, params["backbone"], stats["backbone"], xs,
                                          size=16, augment="none")
  flat_one = jax.tree_util.tree_flatten_with_path(one)[0]
  flat_two = jax.tree_util.tree_leaves(two)
  flat_b0, flat_b1 = (jax.tree_util.tree_leaves(t) for t in per_batch)
  checked = 0
  for (path, got1), got2, b0, b1 in zip(flat_one, flat_two, flat_b0, flat_b1):
    kind = str(path[-1].key)
    np.testing.assert_allclose(np.asarray(got1), b0, rtol=1e-4, atol=1e-5)
    if kind == "mean":
      mean0, mean1 = b0, b1
      np.testing.assert_allclose(np.asarray(got2), (b0 + b1) / 2, rtol=1e-4, atol=1e-5)
    else:  # var follows its sibling mean in the flattened (sorted-key) order
      pooled = (b0 + b1) / 2 + ((mean0 - mean1) / 2) ** 2
      np.testing.assert_allclose(np.asarray(got2), pooled, rtol=1e-4, atol=1e-5)
    checked += 1
  assert checked == len(jax.tree_util.tree_leaves(stats["backbone"])) > 20


@pytest.mark.slow  # two CLI subprocesses (about a minute)
def test_cli_on_exported_backbones_and_on_a_run_workdir(tmp_path, capsys):
  from bissl_jax.evaluation import visualize_run
  from bissl_jax.pipeline import checkpoint
  model, params, stats = _tiny_resnet()
  other = jax.tree_util.tree_map(lambda p: p * 1.1, params)
  # The pipeline's layout: seed<s>/pretext/output and seed<s>/bissl/bissl/output.
  run = tmp_path / "run"
  exports = {"pretext": run / "seed3" / "pretext" / "output",
             "bissl": run / "seed3" / "bissl" / "bissl" / "output"}
  for stage, p in (("pretext", params), ("bissl", other)):
    checkpoint.export(str(exports[stage]), {"params": p, "batch_stats": stats},
                      {"stage": stage, "arch": "resnet18", "image_size": 16})
  loaded, _, meta = visualize_run.load_backbone(str(exports["pretext"]))
  assert meta["stage"] == "pretext"
  assert visualize_run.infer_architecture(loaded) == {
      "arch": "resnet18", "width_multiplier": 0.125, "cifar_stem": True}
  small = ["--num-batches", "2", "--batch-size", "64", "--max-points", "80",
           "--max-train-points", "200", "--k", "5"]

  out = tmp_path / "figs"
  status = visualize_run.main(["--backbone", str(exports["pretext"]),
                                "--backbone", f"BiSSL={exports['bissl']}",
                                "--dataset", "digits", "--out", str(out)] + small)
  assert status == 0, capsys.readouterr().err
  _check_png(str(out / "tsne.png"), wider=True)
  with open(out / "knn.json") as f:
    summary = json.load(f)
  assert set(summary["knn_accuracy"]) == {"pretext", "BiSSL"}  # meta stage / given name
  assert summary["num_recalibration_batches"] == 2
  # Digits features of even a random ResNet beat chance (0.1) under k-NN.
  assert all(0.15 < a <= 1.0 for a in summary["knn_accuracy"].values())
  assert "5-NN accuracy" in capsys.readouterr().out

  # A run directory: settings from its config.json, default output under plots/.
  config = {"seeds": [3, 4], "pretext": {"share_across_seeds": False, "checkpoint": None},
            "model": {"arch": "resnet18", "width_multiplier": 0.125, "cifar_stem": True},
            "data": {"downstream_dataset": "digits", "image_size": 16, "data_dir": None}}
  (run / "config.json").write_text(json.dumps(config))
  assert visualize_run.run_backbones(str(run)) == {
      "pretext": str(exports["pretext"]), "BiSSL": str(exports["bissl"])}
  assert visualize_run.main(["--workdir", str(run)] + small) == 0
  _check_png(str(run / "plots" / "seed3" / "tsne.png"), wider=True)

  missing = ["--backbone", str(tmp_path / "missing"), "--out", str(out)]
  assert visualize_run.main(missing) == USER_ERROR_STATUS
  assert "not a stage output" in capsys.readouterr().err
