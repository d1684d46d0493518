"""GLUE-style downstream tasks on GPT: formats, similarity symmetry, dropout, losses."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bissl_jax.models import gpt
from bissl_jax.core.params import init_params
from bissl_jax.tasks.pretext.next_token import NextToken
from bissl_jax.tasks.downstream.text import TextTask, format_examples, format_one

MICRO = gpt.gpt_config("gpt_micro", init_std=0.3)  # large enough for orders to matter
MODEL = gpt.GPT(MICRO, num_special=3)
S, D, E = 32, 33, 34  # start, delimiter, end of MODEL


@pytest.fixture(scope="module")
def params():
  return jax.jit(lambda k: init_params(MODEL, TextTask(MODEL), k, 0))(jax.random.PRNGKey(0))[0]


def test_special_ids_and_formats():
  assert MODEL.special_ids == {"start": S, "delimiter": D, "end": E}
  assert gpt.GPT(MICRO, num_special=2).special_ids == {"start": 32, "end": 33}
  ids = MODEL.special_ids
  assert format_one("classification", ids, [1, 2]) == [[S, 1, 2, E]]
  assert format_one("entailment", ids, [1], [2, 3]) == [[S, 1, D, 2, 3, E]]
  assert format_one("similarity", ids, [1], [2, 3]) == [[S, 1, D, 2, 3, E], [S, 2, 3, D, 1, E]]
  with pytest.raises(ValueError, match="two texts"):
    format_one("entailment", ids, [1])


def test_format_examples_pads_and_drops_long_inputs():
  ids = MODEL.special_ids
  tokens, kept = format_examples("entailment", ids, [[1], list(range(20)), [2, 3]],
                                 [[4], [5], [6]], context=8)
  np.testing.assert_array_equal(kept, [0, 2])  # the 23-token input is dropped
  np.testing.assert_array_equal(tokens, [[S, 1, D, 4, E, -1],  # padded to the longest
                                         [S, 2, 3, D, 6, E]])
  pair, _ = format_examples("similarity", ids, [[1]], [[2, 3]], context=8, length=8)
  assert pair.shape == (1, 2, 8)


def _pairs(rng, n=3, length=4):
  r = np.random.default_rng(rng)
  return ([list(r.integers(0, 32, r.integers(1, length))) for _ in range(n)],
          [list(r.integers(0, 32, r.integers(1, length))) for _ in range(n)])


@jax.jit
def _eval(params, tokens, labels, keep):
  task = TextTask(MODEL, "similarity", dropout=0.1)
  inputs = {"tokens": tokens, "keep": keep}
  loss, _ = task.loss(params["backbone"], params["downstream_head"], {}, inputs, labels)
  return task.logits(params["backbone"], params["downstream_head"], {}, inputs), loss


def test_similarity_is_symmetric_in_its_two_texts(params):
  a, b = _pairs(0)
  ab, _ = format_examples("similarity", MODEL.special_ids, a, b, context=16, length=10)
  ba, _ = format_examples("similarity", MODEL.special_ids, b, a, context=16, length=10)
  assert not np.array_equal(ab, ba)
  keep = TextTask(MODEL, "similarity").prepare(jax.random.PRNGKey(1), ab, train=True)["keep"]
  labels = jnp.array([0, 1, 1])
  logits_ab, loss_ab = _eval(params, ab, labels, keep)
  logits_ba, loss_ba = _eval(params, ba, labels, keep)
  np.testing.assert_allclose(logits_ab, logits_ba, atol=1e-6)
  np.testing.assert_allclose(loss_ab, loss_ba, rtol=1e-6)
  feats = jax.jit(lambda p, t: TextTask(MODEL, "similarity").features(
      p["backbone"], p["downstream_head"], {}, {"tokens": t}))
  np.testing.assert_allclose(feats(params, ab), feats(params, ba), atol=1e-6)
  assert feats(params, ab).shape == (3, MICRO.width)
  # Each single order is not symmetric: the test would catch a one-order model.
  one_order = jax.jit(lambda p, t: TextTask(MODEL, "entailment").logits(
      p["backbone"], p["downstream_head"], {}, {"tokens": t}))
  assert not np.allclose(one_order(params, ab[:, 0]), one_order(params, ba[:, 0]), atol=1e-4)


def test_dropout_mask_from_prepare():
  task = TextTask(MODEL, "classification", dropout=0.1)
  tokens = jnp.full((400, 4), 1, jnp.int32)
  train = task.prepare(jax.random.PRNGKey(0), tokens, train=True)
  keep = np.asarray(train["keep"])
  assert keep.shape == (400, MICRO.width)
  assert set(np.unique(keep)) == {0.0, np.float32(1 / 0.9)}
  assert abs((keep == 0).mean() - 0.1) < 0.02
  assert set(task.prepare(jax.random.PRNGKey(0), tokens, train=False)) == {"tokens"}
  with pytest.raises(ValueError, match="rank 3"):
    TextTask(MODEL, "similarity").prepare(None, tokens, train=False)


def test_loss_is_task_loss_plus_half_lm_loss(params):
  tokens, _ = format_examples("classification", MODEL.special_ids, [[1, 2], [3, 4, 5]],
                              context=16)
  labels = jnp.array([1, 0])
  task = TextTask(MODEL, "classification")
  inputs = {"tokens": jnp.asarray(tokens)}
  loss = jax.jit(lambda p: task.loss(p["backbone"], p["downstream_head"], {}, inputs,
                                     labels, train=False)[0])(params)
  logits = jax.jit(lambda p: task.logits(p["backbone"], p["downstream_head"], {}, inputs))(
      params)
  ce = -np.mean(np.take_along_axis(np.asarray(jax.nn.log_softmax(logits)),
                                   np.asarray(labels)[:, None], 1))
  # The auxiliary LM loss: next-token prediction over V + S rows, special tokens included.
  special = params["downstream_head"]["special_embeddings"]
  h, _ = jax.jit(MODEL.hidden)(params["backbone"], inputs["tokens"], special)
  from bissl_jax.tasks.pretext.next_token import next_token_loss
  lm = next_token_loss(MODEL.lm_logits(params["backbone"], h, special), inputs["tokens"])
  np.testing.assert_allclose(loss, ce + 0.5 * lm, rtol=1e-5)
  # The pretext loss on the same tokens would not know the special rows.
  assert MODEL.lm_logits(params["backbone"], h).shape[-1] == MICRO.vocab_size


def test_regression_uses_mse(params):
  model = MODEL
  p = {**params, "downstream_head": {**params["downstream_head"],
                                     "output": {"kernel": params["downstream_head"]["output"]
                                                ["kernel"][:, :1],
                                                "bias": jnp.zeros(1)}}}
  task = TextTask(model, "similarity", regression=True, lm_weight=0.0, num_outputs=1)
  a, b = _pairs(2, n=2)
  tokens, _ = format_examples("similarity", model.special_ids, a, b, context=16)
  inputs = {"tokens": jnp.asarray(tokens)}
  targets = jnp.array([4.5, 1.0])
  preds, loss = jax.jit(lambda p: (
      task.logits(p["backbone"], p["downstream_head"], {}, inputs),
      task.loss(p["backbone"], p["downstream_head"], {}, inputs, targets, train=False)[0]))(p)
  assert preds.shape == (2,)
  np.testing.assert_allclose(loss, np.mean((np.asarray(preds) - np.asarray(targets)) ** 2),
                             rtol=1e-5)
  with pytest.raises(ValueError, match="num_outputs=1"):
    TextTask(MODEL, "similarity", regression=True)


def test_pretext_task_rejects_pairs():
  with pytest.raises(ValueError, match=r"\(B, T\)"):
    NextToken(MODEL).prepare(None, jnp.zeros((2, 2, 4), jnp.int32))
