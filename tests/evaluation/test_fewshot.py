"""Few-shot episodes, the 95% interval, the prototype classifier, subsets and the linear probe."""
import numpy as np
import pytest

from bissl_jax.evaluation import fewshot


def _labels(num_classes=10, per_class=30):
  return np.repeat(np.arange(num_classes), per_class)


def test_class_split_is_disjoint_and_complete():
  train, held = fewshot.class_split(10, 5)
  np.testing.assert_array_equal(held, [5, 6, 7, 8, 9])
  for seed in (0, 1):
    train, held = fewshot.class_split(10, 4, seed=seed)
    assert len(held) == 4 and not set(train) & set(held)
    assert sorted(set(train) | set(held)) == list(range(10))
    np.testing.assert_array_equal(held, fewshot.class_split(10, 4, seed=seed)[1])
  with pytest.raises(ValueError, match="num_held_out"):
    fewshot.class_split(5, 5)


def test_episodes_use_only_held_out_classes_with_k_support_and_q_query():
  labels = _labels()
  train, held = fewshot.class_split(10, 5, seed=3)
  eps = fewshot.sample_episodes(labels, held, n_way=5, k_shot=2, n_query=4, episodes=20, seed=7)
  assert eps.support.shape == (20, 5, 2) and eps.query.shape == (20, 5, 4)
  for e in range(20):
    assert len(set(eps.classes[e])) == 5 and set(eps.classes[e]) <= set(held)
    assert not set(eps.classes[e]) & set(train)
    for j in range(5):
      # Every support and query example belongs to the episode's j-th class ...
      assert set(labels[eps.support[e, j]]) == {eps.classes[e, j]}
      assert set(labels[eps.query[e, j]]) == {eps.classes[e, j]}
    # ... and no example is both support and query, nor drawn twice.
    everything = np.concatenate([eps.support[e].ravel(), eps.query[e].ravel()])
    assert len(set(everything)) == everything.size
  again = fewshot.sample_episodes(labels, held, n_way=5, k_shot=2, n_query=4, episodes=20, seed=7)
  other = fewshot.sample_episodes(labels, held, n_way=5, k_shot=2, n_query=4, episodes=20, seed=8)
  for a, b in zip(eps, again):
    np.testing.assert_array_equal(a, b)
  assert not np.array_equal(eps.support, other.support)
  with pytest.raises(ValueError, match="fewer than"):
    fewshot.sample_episodes(labels, held, n_way=5, k_shot=20, n_query=15, episodes=1)


def test_ci95_matches_numpy():
  accs = np.random.default_rng(0).uniform(0.3, 0.9, 600)
  out = fewshot.mean_ci95(accs)
  assert out["n"] == 600
  np.testing.assert_allclose(out["mean"], np.sum(accs) / 600)
  ref = 1.96 * np.sqrt(np.sum((accs - accs.mean()) ** 2) / 600) / np.sqrt(600)
  np.testing.assert_allclose(out["ci95"], ref, rtol=1e-12)


def test_prototype_classifier_on_separable_toy_set():
  rng = np.random.default_rng(1)
  centres = np.array([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
  sup = np.concatenate([c + rng.normal(0, 0.5, (3, 2)) for c in centres])
  sup_y = np.repeat(np.arange(3), 3)
  qry = np.concatenate([c + rng.normal(0, 0.5, (5, 2)) for c in centres])
  np.testing.assert_array_equal(fewshot.prototype_predict(sup, sup_y, qry, 3), np.repeat(np.arange(3), 5))
  # Class means 1 and 4: 2.6 goes to class 1 though its nearest support point (2) is class 0.
  np.testing.assert_array_equal(
      fewshot.prototype_predict(np.array([[0.0], [2.0], [4.0]]), np.array([0, 0, 1]),
                                np.array([[2.4], [2.6]]), 2), [0, 1])
  # Cosine metric depends on direction only.
  np.testing.assert_array_equal(
      fewshot.prototype_predict(np.array([[1.0, 0.0], [0.0, 1.0]]), np.array([0, 1]),
                                np.array([[100.0, 1.0], [0.1, 5.0]]), 2, metric="cosine"), [0, 1])


@pytest.mark.parametrize("classifier", fewshot.CLASSIFIERS)
def test_few_shot_accuracy_separable_vs_random_features(classifier):
  labels = _labels(per_class=25)
  rng = np.random.default_rng(2)
  good = np.eye(10)[labels] * 5 + rng.normal(0, 0.3, (len(labels), 10))
  noise = rng.normal(0, 1, (len(labels), 10))
  _, held = fewshot.class_split(10, 5)
  kw = dict(n_way=5, k_shot=1, n_query=5, episodes=30, seed=0, classifier=classifier)
  hi = fewshot.few_shot_accuracy(good, labels, held, **kw)
  lo = fewshot.few_shot_accuracy(noise, labels, held, **kw)
  assert hi["mean"] > 0.95 and lo["mean"] < 0.5 and lo["ci95"] > 0


def test_stratified_subset_is_balanced_and_deterministic():
  labels = np.concatenate([np.zeros(200, int), np.ones(100, int), np.full(7, 2)])
  idx = fewshot.stratified_subset(labels, 0.1, seed=0)
  counts = np.bincount(labels[idx])
  np.testing.assert_array_equal(counts, [20, 10, 1])
  np.testing.assert_array_equal(idx, np.sort(np.unique(idx)))
  np.testing.assert_array_equal(idx, fewshot.stratified_subset(labels, 0.1, seed=0))
  assert not np.array_equal(idx, fewshot.stratified_subset(labels, 0.1, seed=1))
  np.testing.assert_array_equal(np.bincount(labels[fewshot.stratified_subset(labels, 0.01)]),
                                [2, 1, 1])
  with pytest.raises(ValueError, match="fraction"):
    fewshot.stratified_subset(labels, 0.0)


def test_linear_probe_learns_a_separable_problem():
  rng = np.random.default_rng(3)
  w = rng.normal(size=(6, 3))
  x = rng.normal(size=(300, 6)).astype(np.float32)
  y = np.argmax(x @ w, 1)
  res = fewshot.linear_probe(x[:200], y[:200], x[200:], y[200:], num_classes=3, epochs=30,
                             batch_size=32, lr=0.5, final_lr=1e-3)
  assert res.accuracy > 0.9 and res.head["w"].shape == (6, 3)
  chance = fewshot.linear_probe(x[:200], rng.permutation(y[:200]), x[200:], y[200:],
                                num_classes=3, epochs=30, batch_size=32, lr=0.5)
  assert chance.accuracy < 0.7


def test_extract_features_batches_and_matches_a_direct_call():
  import dataclasses  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from bissl_jax.tasks import augment  # pylint: disable=import-outside-toplevel

  @dataclasses.dataclass(frozen=True)
  class MeanModel:
    def features(self, bp, bs, x, *, train):
      assert not train
      return jnp.mean(x, axis=(1, 2)) * bp["scale"], bs

  images = np.random.default_rng(4).integers(0, 256, (7, 8, 8, 3), dtype=np.uint8)
  params = {"scale": jnp.float32(2.0)}
  got = fewshot.extract_features(MeanModel(), params, {}, images, image_size=8, batch_size=3)
  ref = 2.0 * np.asarray(augment.eval_view(None, images, size=8)).mean(axis=(1, 2))
  assert got.shape == (7, 3) and got.dtype == np.float32
  np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)


def test_comparison_config_and_overrides():
  from bissl_jax.pipeline import gessl_comparison  # pylint: disable=import-outside-toplevel
  cfg = gessl_comparison.load_config("configs/digits_gessl.py")
  assert cfg.gessl.n_tasks * cfg.gessl.classes_per_task == cfg.pretext.batch_size
  assert tuple(cfg.fewshot.shots) == (1, 5) and len(cfg.seeds) == 3
  gessl_comparison.override(cfg, "gessl.inner_params=all")
  gessl_comparison.override(cfg, "pretext.epochs=3")
  assert cfg.gessl.inner_params == "all" and cfg.pretext.epochs == 3
  with pytest.raises(ValueError, match="no field"):
    gessl_comparison.override(cfg, "gessl.innerparams=all")
