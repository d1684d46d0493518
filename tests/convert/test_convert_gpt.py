"""Hugging Face openai-gpt → bissl_jax GPT: equivalence with transformers and strict checks."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bissl_jax.tasks.downstream.text import TextTask
from bissl_jax.models import gpt
from bissl_jax.convert import gpt as convert

pytestmark = pytest.mark.torch
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

CFG = gpt.GPTConfig(vocab_size=50, context=16, width=32, depth=2, heads=4, mlp_width=128)


@pytest.fixture(scope="module")
def hf_model():
  torch.manual_seed(0)
  config = transformers.OpenAIGPTConfig(vocab_size=CFG.vocab_size, n_positions=CFG.context,
                                        n_embd=CFG.width, n_layer=CFG.depth, n_head=CFG.heads,
                                        initializer_range=0.2)
  model = transformers.OpenAIGPTLMHeadModel(config).eval()
  with torch.no_grad():  # non-trivial LayerNorm and biases
    for name, p in model.named_parameters():
      if "ln_" in name or name.endswith("bias"):
        p.add_(0.1 * torch.randn_like(p))
  return model


def _state_dict(model):
  return {k: v.clone() for k, v in model.state_dict().items()}


def test_logits_match_transformers(hf_model):
  model = gpt.GPT(CFG, num_special=0)
  params, _ = convert.load_hf_gpt(_state_dict(hf_model), model)
  rng = np.random.default_rng(0)
  ids = rng.integers(0, CFG.vocab_size, (3, 12))
  mask = np.ones_like(ids)
  mask[1, 8:] = 0  # right padding
  mask[2, 5:] = 0
  with torch.no_grad():
    expected = hf_model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits
  tokens = jnp.asarray(np.where(mask == 1, ids, gpt.PAD), jnp.int32)
  h, _ = model.hidden(params["backbone"], tokens)
  got = np.asarray(model.lm_logits(params["backbone"], h))
  valid = mask.astype(bool)
  assert float(np.abs(expected.numpy()).max()) > 1.0  # a non-trivial check
  np.testing.assert_allclose(got[valid], expected.numpy()[valid], atol=1e-4, rtol=1e-4)


def test_checkpoint_files_round_trip(hf_model, tmp_path):
  model = gpt.GPT(CFG, num_special=3)
  pth = tmp_path / "pytorch_model.bin"
  torch.save(hf_model.state_dict(), pth)
  params, stats = convert.load_hf_gpt(pth, model, TextTask(model, "entailment"))
  np.testing.assert_array_equal(params["backbone"]["h_1"]["mlp"]["c_fc"]["kernel"],
                                hf_model.transformer.h[1].mlp.c_fc.weight.detach().numpy())
  np.testing.assert_array_equal(params["backbone"]["h_0"]["ln_2"]["scale"],
                                hf_model.transformer.h[0].ln_2.weight.detach().numpy())
  assert params["downstream_head"]["special_embeddings"].shape == (3, CFG.width)
  assert stats == {"backbone": {}, "pretext_head": {}}
  from safetensors.torch import save_file
  st = tmp_path / "model.safetensors"
  save_file({k: v for k, v in hf_model.transformer.state_dict().items()}, str(st))
  params_st, _ = convert.load_hf_gpt(st, model, TextTask(model, "entailment"))
  jax.tree_util.tree_map(np.testing.assert_array_equal, params["backbone"],
                         params_st["backbone"])


def test_resized_embedding_gives_special_rows(hf_model):
  sd = _state_dict(hf_model)
  table = sd["transformer.tokens_embed.weight"]
  sd["transformer.tokens_embed.weight"] = torch.cat([table, torch.randn(3, CFG.width)])
  sd["lm_head.weight"] = sd["transformer.tokens_embed.weight"]
  backbone, special = convert.hf_to_flax(sd, gpt.GPT(CFG, num_special=3))
  assert backbone["tokens_embed"].shape == (CFG.vocab_size, CFG.width)
  np.testing.assert_array_equal(special, sd["lm_head.weight"][-3:].numpy())


@pytest.mark.parametrize("edit, message", [
    (lambda sd: sd.pop("transformer.h.1.ln_1.bias"), "missing key h.1.ln_1.bias"),
    (lambda sd: sd.__setitem__("transformer.h.2.ln_1.bias", torch.zeros(CFG.width)),
     "unexpected key"),
    (lambda sd: sd.__setitem__("transformer.h.0.mlp.c_fc.weight", torch.zeros(CFG.width, 64)),
     "h.0.mlp.c_fc.weight has shape"),
    (lambda sd: sd["transformer.h.0.attn.c_proj.weight"].__setitem__((0, 0), float("nan")),
     "NaN"),
    (lambda sd: sd.__setitem__("lm_head.weight", torch.zeros(CFG.vocab_size, CFG.width)),
     "tied"),
    (lambda sd: sd.__setitem__("transformer.tokens_embed.weight",
                               torch.zeros(CFG.vocab_size + 1, CFG.width)), "tokens_embed"),
])
def test_strict_validation(hf_model, edit, message):
  sd = _state_dict(hf_model)
  edit(sd)
  with pytest.raises(ValueError, match=message):
    convert.hf_to_flax(sd, gpt.GPT(CFG, num_special=3))


def test_old_causal_mask_buffers_are_accepted(hf_model):
  sd = _state_dict(hf_model)
  sd["transformer.h.0.attn.bias"] = torch.tril(torch.ones(CFG.context, CFG.context))[None, None]
  convert.hf_to_flax(sd, gpt.GPT(CFG))
  sd["transformer.h.0.attn.bias"] = torch.ones(1, 1, CFG.context, CFG.context)
  with pytest.raises(ValueError, match="unexpected key"):
    convert.hf_to_flax(sd, gpt.GPT(CFG))


def test_non_pickle_and_missing_files(tmp_path):
  bad = tmp_path / "weights.bin"
  bad.write_text("this is not a checkpoint")
  with pytest.raises(ValueError, match="weights.bin"):
    convert.read_state_dict(bad)
  with pytest.raises(FileNotFoundError):
    convert.read_state_dict(tmp_path / "absent.bin")
