"""GPT bundle, next-token pretext and the BiSSL partition of thesis §5.4."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from bissl_jax.core.params import init_params
from bissl_jax import implicit
from bissl_jax.models import gpt
from bissl_jax.core import partition
from bissl_jax.core import protocols
from bissl_jax.tasks.pretext.next_token import NextToken, next_token_loss
from bissl_jax.tasks.downstream.text import TextTask

MICRO = gpt.gpt_config("gpt_micro")


def _model(**kw):
  return gpt.GPT(MICRO, **kw)


def _init(model, seed=0):
  """The model's groups and a text task's head (special rows, 2-way output layer)."""
  kind = "classification" if model.num_special == 2 else "entailment"
  task = TextTask(model, kind) if model.num_special >= 2 else None
  return jax.jit(lambda k: init_params(model, task, k, 0))(jax.random.PRNGKey(seed))


def _hidden(model, backbone, tokens, special=None):
  return jax.jit(model.hidden)(backbone, tokens, special)


def _tokens(rng, shape, vocab=MICRO.vocab_size):
  return jnp.asarray(np.random.default_rng(rng).integers(0, vocab, shape), jnp.int32)


def test_protocols_and_hashable():
  model = _model()
  assert isinstance(model, protocols.Model)
  assert isinstance(NextToken(model), protocols.PretextTask)
  assert isinstance(TextTask(model), protocols.DownstreamTask)
  assert hash(model) == hash(_model())


def test_original_gpt_size_and_names():
  """Table B.1 GPT: 116,534,784 parameters as Hugging Face's openai-gpt (OpenAIGPTModel)."""
  model = gpt.GPT(gpt.CONFIGS["gpt"], num_special=3)
  params = jax.eval_shape(lambda: _init(model, 0)[0])
  assert gpt.count_params(params["backbone"]) == 116_534_784
  assert params["pretext_head"] == {}
  assert params["downstream_head"]["special_embeddings"].shape == (3, 768)
  block = params["backbone"]["h_11"]
  assert set(block) == {"attn", "ln_1", "mlp", "ln_2"}
  assert set(block["attn"]) == {"c_attn", "c_proj"} and set(block["mlp"]) == {"c_fc", "c_proj"}
  assert params["backbone"]["tokens_embed"].shape == (40478, 768)
  assert params["backbone"]["positions_embed"].shape == (512, 768)


def test_causal_masking_future_tokens_do_not_leak():
  model = _model()
  params, _ = _init(model, 0)
  tokens = _tokens(0, (2, 12))
  cut = 5
  perturbed = tokens.at[:, cut:].set((tokens[:, cut:] + 7) % MICRO.vocab_size)
  h1, _ = _hidden(model, params["backbone"], tokens)
  h2, _ = _hidden(model, params["backbone"], perturbed)
  np.testing.assert_array_equal(np.asarray(h1[:, :cut]), np.asarray(h2[:, :cut]))
  assert not np.allclose(h1[:, cut:], h2[:, cut:], atol=1e-4)  # later positions do see it


def test_padding_mask_and_context_check():
  model = _model()
  params, _ = _init(model, 0)
  tokens = _tokens(1, (1, 6))
  padded = jnp.concatenate([tokens, jnp.full((1, 4), gpt.PAD, jnp.int32)], axis=1)
  h_short, _ = _hidden(model, params["backbone"], tokens)
  h_pad, mask = _hidden(model, params["backbone"], padded)
  np.testing.assert_allclose(h_short, h_pad[:, :6], atol=1e-6)
  assert np.all(np.isfinite(h_pad)) and mask.sum() == 6
  feats, _ = jax.jit(lambda b, x: model.features(b, {}, x, train=False))(
      params["backbone"], padded)
  np.testing.assert_allclose(feats, h_short[:, -1], atol=1e-6)  # last real token
  with pytest.raises(ValueError, match="exceed the context"):
    _hidden(model, params["backbone"], _tokens(2, (1, MICRO.context + 1)))


def test_next_token_loss_ignores_padding():
  model = _model()
  params, stats = _init(model, 0)
  task = NextToken(model)
  a, b = _tokens(3, (1, 9)), _tokens(4, (1, 5))

  @jax.jit
  def summed(seq):  # sum of CE over a sequence without padding
    h, _ = model.hidden(params["backbone"], seq)
    return next_token_loss(model.lm_logits(params["backbone"], h), seq) * (seq.shape[1] - 1)

  b_padded = jnp.concatenate([b, jnp.full((1, 4), gpt.PAD, jnp.int32)], axis=1)
  loss, aux = jax.jit(task.loss)(params, stats, task.prepare(None, {"tokens": jnp.concatenate(
      [a, b_padded])}))
  expected = (summed(a) + summed(b)) / (8 + 4)
  np.testing.assert_allclose(loss, expected, rtol=1e-5)
  assert aux["batch_stats"] == {"backbone": {}, "pretext_head": {}}
  # A mean over all positions (padding included) would differ.
  assert abs(float(loss) - float(expected)) < 1e-5 < abs(float(summed(b) / 4) - float(loss))


def test_next_token_loss_against_numpy():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(2, 4, 5)).astype(np.float32)
  tokens = np.array([[1, 2, 3, -1], [4, 0, 2, 1]], np.int32)
  logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  terms = [-logp[0, 0, 2], -logp[0, 1, 3], -logp[1, 0, 0], -logp[1, 1, 2], -logp[1, 2, 1]]
  np.testing.assert_allclose(next_token_loss(jnp.asarray(logits), jnp.asarray(tokens)),
                             np.mean(terms), rtol=1e-5)


def test_remat_and_compute_dtype():
  model = _model()
  params, stats = _init(model, 0)
  tokens = _tokens(5, (2, 8))
  grad = lambda m: jax.jit(jax.value_and_grad(
      lambda p: NextToken(m).loss(p, stats, tokens)[0]))(params)
  (l0, g0), (l1, g1) = grad(model), grad(dataclasses.replace(model, remat=True))
  np.testing.assert_allclose(l0, l1, rtol=1e-6)
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), g0, g1)
  l_bf16 = jax.jit(NextToken(dataclasses.replace(model, dtype="bfloat16")).loss)(
      params, stats, tokens)[0]
  assert l_bf16.dtype == jnp.float32 and abs(float(l_bf16) - float(l0)) < 0.05


def test_empty_pretext_head_partition():
  model = _model()
  params, stats = _init(model, 0)
  assert params["pretext_head"] == {} and stats == {"backbone": {}, "pretext_head": {}}
  partition.check_coverage(params, partition.make_masks(params))
  opt = partition.level_optimizer({"backbone": optax.adam(1e-3),
                                   "downstream_head": optax.adam(1e-3)}, params)
  state = opt.init(params)
  grads = jax.tree_util.tree_map(jnp.ones_like, params)
  updates, _ = jax.jit(opt.update)(grads, state, params)
  assert updates["pretext_head"] == {}
  assert float(jnp.abs(updates["backbone"]["tokens_embed"]).min()) > 0


def test_special_rows_get_gradients_only_from_downstream_losses():
  """Thesis §5.4.1: special rows are φ_D; the first V rows are θ and see both losses."""
  model = _model(num_special=3)
  params, stats = _init(model, 0)
  task = TextTask(model, "entailment")
  ids = model.special_ids
  v = MICRO.vocab_size
  tokens = jnp.array([[ids["start"], 1, 2, ids["delimiter"], 3, ids["end"]],
                      [ids["start"], 4, ids["delimiter"], 5, 6, ids["end"]]], jnp.int32)
  lm_batch = _tokens(6, (2, 6))

  def pretext(p):
    return NextToken(model).loss(p, stats, lm_batch)[0]

  def downstream(p):
    inputs = task.prepare(None, tokens, train=False)
    return task.loss(p["backbone"], p["downstream_head"], {}, inputs, jnp.array([0, 1]))[0]

  g_p, g_d = jax.jit(jax.grad(pretext))(params), jax.jit(jax.grad(downstream))(params)
  # L_P never touches the downstream head (special rows, output layer).
  for leaf in jax.tree_util.tree_leaves(g_p["downstream_head"]):
    assert float(jnp.abs(leaf).max()) == 0.0
  assert float(jnp.abs(g_d["downstream_head"]["special_embeddings"]).min()) > 0
  # Backbone token rows: gradients from both objectives.
  assert float(jnp.abs(g_p["backbone"]["tokens_embed"][:v]).sum()) > 0
  assert float(jnp.abs(g_d["backbone"]["tokens_embed"][:v]).sum()) > 0
  assert g_d["backbone"]["tokens_embed"].shape == (v, MICRO.width)


def test_upper_level_substitutes_only_backbone_rows():
  """L_D(θ_P, φ_D) uses θ_P's V rows beside φ_D's own special rows."""
  model = _model(num_special=2)
  p_d, _ = _init(model, 0)
  p_p, _ = _init(model, 1)
  task = TextTask(model, "classification")
  tokens = jnp.array([[MICRO.vocab_size, 3, 4, MICRO.vocab_size + 1]], jnp.int32)
  inputs = task.prepare(None, tokens, train=False)
  mixed = jax.jit(lambda b, h: task.logits(b, h, {}, inputs))(
      p_p["backbone"], p_d["downstream_head"])
  # The same computation on one full table built by hand.
  table = jnp.concatenate([p_p["backbone"]["tokens_embed"],
                           p_d["downstream_head"]["special_embeddings"]])
  big = gpt.GPT(dataclasses.replace(MICRO, vocab_size=MICRO.vocab_size + 2), num_special=0)
  backbone = {**p_p["backbone"], "tokens_embed": table}
  h, mask = _hidden(big, backbone, tokens)
  out = p_d["downstream_head"]["output"]
  expected = gpt.end_state(h, mask) @ out["kernel"] + out["bias"]
  np.testing.assert_allclose(mixed, expected, atol=1e-6)


def test_implicit_gradient_on_tiny_gpt_matches_dense_solve():
  """implicit_grad with L_P = next-token loss against (I + H/(λ+δ))⁻¹ v solved densely."""
  cfg = gpt.GPTConfig(vocab_size=7, context=5, width=4, depth=1, heads=2, mlp_width=8,
                      init_std=0.3)
  model = gpt.GPT(cfg, num_special=0)
  with jax.enable_x64(True):
    params, stats = _init(model, 0)
    backbone = jax.tree_util.tree_map(lambda x: x.astype(jnp.float64), params["backbone"])
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 7, (3, 5)), jnp.int32)
    flat, unravel = jax.flatten_util.ravel_pytree(backbone)

    def inner(b):
      return NextToken(model).loss({"backbone": b, "pretext_head": {}}, stats, tokens)[0]

    v = unravel(jnp.asarray(np.random.default_rng(1).normal(size=flat.size)))
    lam, damping = 0.1, 9.9  # the thesis's λ for GPT, BiSSL's δ
    solve = jax.jit(lambda b, g: implicit.implicit_grad(
        inner, b, g, lam=lam, damping=damping, solver="cg", maxiter=2 * flat.size,
        tol=1e-12, unroll=False)[0])
    x = solve(backbone, v)
    hessian = np.asarray(jax.jit(jax.hessian(lambda f: inner(unravel(f))))(flat))
    a = np.eye(flat.size) + hessian / (lam + damping)
    assert np.linalg.eigvalsh(a).min() > 0  # CG's precondition holds here
    expected = np.linalg.solve(a, np.asarray(jax.flatten_util.ravel_pytree(v)[0]))
    got = np.asarray(jax.flatten_util.ravel_pytree(x)[0])
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-8)
    assert not np.allclose(expected, np.asarray(jax.flatten_util.ravel_pytree(v)[0]),
                           atol=1e-3)  # the Hessian matters
