"""MAE checkpoint conversion, checked against a PyTorch MAE written here with MAE's names."""
import collections
import functools

import pytest

pytestmark = pytest.mark.torch
torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from bissl_jax.core.params import init_params
from bissl_jax.tasks.downstream.classification import Classification
from bissl_jax.tasks.pretext import mae  # noqa: E402
from bissl_jax.convert import mae as convert_mae  # noqa: E402
from bissl_jax.models.vit_bundle import build_vit_model  # noqa: E402

TOL = dict(rtol=1e-4, atol=1e-4)
WIDTH, DEPTH, HEADS, PATCH, SIZE = 16, 2, 2, 4, 8
DEC_WIDTH, DEC_DEPTH, DEC_HEADS = 8, 1, 2


# --------------------------------------------------------------------- torch reference
# MAE's models_mae.MaskedAutoencoderViT with timm's Block, Attention and Mlp, reduced
# to what the state dict and the forward pass need (same attribute names).


class Attention(nn.Module):
  def __init__(self, dim, heads):
    super().__init__()
    self.heads = heads
    self.qkv = nn.Linear(dim, 3 * dim)
    self.proj = nn.Linear(dim, dim)

  def forward(self, x):
    b, n, c = x.shape
    qkv = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    attn = (q @ k.transpose(-2, -1)) * (c // self.heads) ** -0.5
    out = attn.softmax(dim=-1) @ v
    return self.proj(out.transpose(1, 2).reshape(b, n, c))


class Mlp(nn.Module):
  def __init__(self, dim, hidden):
    super().__init__()
    self.fc1 = nn.Linear(dim, hidden)
    self.act = nn.GELU()
    self.fc2 = nn.Linear(hidden, dim)

  def forward(self, x):
    return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
  def __init__(self, dim, heads):
    super().__init__()
    self.norm1 = nn.LayerNorm(dim, eps=1e-6)
    self.attn = Attention(dim, heads)
    self.norm2 = nn.LayerNorm(dim, eps=1e-6)
    self.mlp = Mlp(dim, 4 * dim)

  def forward(self, x):
    x = x + self.attn(self.norm1(x))
    return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
  def __init__(self, patch, dim):
    super().__init__()
    self.proj = nn.Conv2d(3, dim, patch, patch)

  def forward(self, x):
    return self.proj(x).flatten(2).transpose(1, 2)


class TorchMAE(nn.Module):
  def __init__(self):
    super().__init__()
    n = (SIZE // PATCH) ** 2
    self.patch_embed = PatchEmbed(PATCH, WIDTH)
    self.cls_token = nn.Parameter(torch.randn(1, 1, WIDTH))
    self.pos_embed = nn.Parameter(torch.randn(1, n + 1, WIDTH), requires_grad=False)
    self.blocks = nn.ModuleList([Block(WIDTH, HEADS) for _ in range(DEPTH)])
    self.norm = nn.LayerNorm(WIDTH, eps=1e-6)
    self.decoder_embed = nn.Linear(WIDTH, DEC_WIDTH)
    self.mask_token = nn.Parameter(torch.randn(1, 1, DEC_WIDTH))
    self.decoder_pos_embed = nn.Parameter(torch.randn(1, n + 1, DEC_WIDTH),
                                          requires_grad=False)
    self.decoder_blocks = nn.ModuleList([Block(DEC_WIDTH, DEC_HEADS)
                                         for _ in range(DEC_DEPTH)])
    self.decoder_norm = nn.LayerNorm(DEC_WIDTH, eps=1e-6)
    self.decoder_pred = nn.Linear(DEC_WIDTH, PATCH ** 2 * 3)
    with torch.no_grad():  # random LayerNorm affines too, so they are tested
      for m in self.modules():
        if isinstance(m, nn.LayerNorm):
          m.weight.normal_(1.0, 0.2)
          m.bias.normal_(0.0, 0.2)
        if isinstance(m, Mlp):  # GELU inputs of order 1-3: tanh-GELU would be caught
          m.fc1.weight.mul_(12.0)

  def forward_encoder(self, imgs, noise, mask_ratio=0.75):
    x = self.patch_embed(imgs) + self.pos_embed[:, 1:, :]
    n, length, d = x.shape
    keep = int(length * (1 - mask_ratio))
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    x = torch.gather(x, 1, ids_shuffle[:, :keep].unsqueeze(-1).repeat(1, 1, d))
    mask = torch.ones(n, length)
    mask[:, :keep] = 0
    mask = torch.gather(mask, 1, ids_restore)
    cls = (self.cls_token + self.pos_embed[:, :1, :]).expand(n, -1, -1)
    x = torch.cat([cls, x], dim=1)
    for blk in self.blocks:
      x = blk(x)
    return self.norm(x), mask, ids_restore

  def forward_decoder(self, x, ids_restore):
    x = self.decoder_embed(x)
    tokens = self.mask_token.repeat(x.shape[0], ids_restore.shape[1] + 1 - x.shape[1], 1)
    x_ = torch.cat([x[:, 1:, :], tokens], dim=1)
    x_ = torch.gather(x_, 1, ids_restore.unsqueeze(-1).repeat(1, 1, x.shape[2]))
    x = torch.cat([x[:, :1, :], x_], dim=1) + self.decoder_pos_embed
    for blk in self.decoder_blocks:
      x = blk(x)
    return self.decoder_pred(self.decoder_norm(x))[:, 1:, :]

  def forward_loss(self, imgs, pred, mask):
    p = PATCH
    h = imgs.shape[2] // p
    x = imgs.reshape(imgs.shape[0], 3, h, p, h, p)
    target = torch.einsum("nchpwq->nhwpqc", x).reshape(imgs.shape[0], h * h, p * p * 3)
    mean, var = target.mean(dim=-1, keepdim=True), target.var(dim=-1, keepdim=True)
    target = (target - mean) / (var + 1.0e-6) ** 0.5
    loss = ((pred - target) ** 2).mean(dim=-1)
    return (loss * mask).sum() / mask.sum()


@functools.lru_cache(maxsize=None)
def _torch_model():
  torch.manual_seed(0)
  return TorchMAE().eval()


def _state_dict():
  return collections.OrderedDict((k, v.detach().clone())
                                 for k, v in _torch_model().state_dict().items())


def _numpy_state_dict():
  return collections.OrderedDict((k, v.numpy().copy()) for k, v in _state_dict().items())


def test_outputs_match_the_torch_mae():
  ref = _torch_model()
  params = convert_mae.mae_to_flax(_state_dict(), decoder_heads=DEC_HEADS)
  model = build_vit_model("vit_test_patch4", decoder_width=DEC_WIDTH,
                          decoder_depth=DEC_DEPTH, decoder_heads=DEC_HEADS)
  rng = np.random.default_rng(1)
  images = rng.normal(size=(3, SIZE, SIZE, 3)).astype(np.float32)
  noise = rng.uniform(size=(3, (SIZE // PATCH) ** 2)).astype(np.float32)
  with torch.no_grad():
    timgs = torch.from_numpy(images.transpose(0, 3, 1, 2).copy())
    latent_t, mask_t, restore_t = ref.forward_encoder(timgs, torch.from_numpy(noise))
    pred_t = ref.forward_decoder(latent_t, restore_t)
    loss_t = ref.forward_loss(timgs, pred_t, mask_t)
  ids_keep, ids_restore, mask = mae.masking_from_noise(jnp.asarray(noise), 0.75)
  np.testing.assert_array_equal(np.asarray(mask), mask_t.numpy())
  latent = model.encode(params["backbone"], jnp.asarray(images), keep_ids=ids_keep)
  np.testing.assert_allclose(latent, latent_t.numpy(), **TOL)
  pred = model.decode(params["pretext_head"]["decoder"], latent, ids_restore)
  np.testing.assert_allclose(pred, pred_t.numpy(), **TOL)
  task = mae.MAE(model)
  loss, _ = task.loss(params, {"backbone": {}, "pretext_head": {}},
                      {"images": jnp.asarray(images), "noise": jnp.asarray(noise)})
  np.testing.assert_allclose(loss, loss_t.item(), **TOL)
  # Unmasked encoder (the downstream backbone) against torch with nothing masked.
  with torch.no_grad():
    full_t, _, _ = ref.forward_encoder(timgs, torch.arange(4.0).repeat(3, 1), mask_ratio=0.0)
  np.testing.assert_allclose(model.encode(params["backbone"], jnp.asarray(images)),
                             full_t.numpy(), **TOL)


def test_round_trip_and_file_format(tmp_path):
  original = _numpy_state_dict()
  params = convert_mae.mae_to_flax(original, decoder_heads=DEC_HEADS)
  back = convert_mae.flax_to_mae_numpy(params)
  assert list(back) == list(convert_mae.flax_to_mae_numpy(params))
  assert set(back) == set(original)
  for k, v in original.items():
    np.testing.assert_array_equal(back[k], v, err_msg=k)
  path = tmp_path / "mae_tiny.pth"
  convert_mae.save_mae_torch(params, path)
  with pytest.raises(ValueError, match="decoder_heads"):
    convert_mae.mae_to_flax(str(path))
  again = convert_mae.mae_to_flax(str(path), arch="vit_test_patch4", image_size=SIZE,
                                  decoder_heads=DEC_HEADS)
  for a, b in zip(jax.tree_util.tree_leaves(again), jax.tree_util.tree_leaves(params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_encoder_only_and_merge_into_a_lora_model():
  enc_only = collections.OrderedDict(
      (k, v) for k, v in _numpy_state_dict().items()
      if not (k.startswith("decoder_") or k == "mask_token"))
  params = convert_mae.mae_to_flax(enc_only)
  assert params["pretext_head"] == {}
  with pytest.raises(ValueError, match="no decoder"):
    convert_mae.mae_to_flax(enc_only, decoder=True)
  full = convert_mae.mae_to_flax(_numpy_state_dict(), decoder_heads=DEC_HEADS)
  model = build_vit_model("vit_test_patch4", decoder_width=DEC_WIDTH,
                          decoder_depth=DEC_DEPTH, decoder_heads=DEC_HEADS, lora_rank=2)
  head = Classification(model, SIZE, num_classes=3, head_init="trunc_normal")
  init, _ = jax.jit(lambda k: init_params(model, head, k, SIZE))(jax.random.key(0))
  merged = convert_mae.merge_pretrained(init, full)
  qkv = merged["backbone"]["blocks_1"]["attn"]["qkv"]["kernel"]
  np.testing.assert_array_equal(qkv, full["backbone"]["blocks_1"]["attn"]["qkv"]["kernel"])
  lora_a = merged["backbone"]["blocks_1"]["attn"]["lora_q"]["lora_a"]
  assert lora_a is init["backbone"]["blocks_1"]["attn"]["lora_q"]["lora_a"]
  assert merged["downstream_head"]["dense"]["kernel"] is init["downstream_head"]["dense"]["kernel"]
  bigger = build_vit_model("vit_test_patch4", decoder=None)
  big_init, _ = jax.jit(bigger.init, static_argnums=1)(jax.random.key(0), 2 * SIZE)
  with pytest.raises(ValueError, match="pos_embed"):
    convert_mae.merge_pretrained(big_init, full)


def test_every_problem_is_listed_in_one_message():
  bad = _numpy_state_dict()
  del bad["blocks.1.mlp.fc2.bias"]
  bad["blocks.0.attn.extra.weight"] = np.zeros((2, 2), np.float32)
  bad["decoder_pred.weight"] = np.zeros((5, DEC_WIDTH), np.float32)
  bad["blocks.0.norm1.weight"] = np.full((WIDTH,), np.nan, np.float32)
  with pytest.raises(ValueError) as err:
    convert_mae.mae_to_flax(bad, decoder_heads=DEC_HEADS)
  msg = str(err.value)
  for fragment in ("1 unexpected keys: blocks.0.attn.extra.weight",
                   "1 missing keys: blocks.1.mlp.fc2.bias",
                   "decoder_pred.weight: (5, 8) (expected (48, 8))",
                   "non-finite (NaN/inf) weights: blocks.0.norm1.weight", "Fix:"):
    assert fragment in msg, msg


def test_wrong_files_and_sizes_say_what_to_do(tmp_path):
  text = tmp_path / "notes.pth"
  text.write_text("not a checkpoint")
  with pytest.raises(ValueError, match="not a PyTorch checkpoint"):
    convert_mae.mae_to_flax(str(text))
  with pytest.raises(FileNotFoundError):
    convert_mae.mae_to_flax(str(tmp_path / "missing.pth"))
  with pytest.raises(ValueError, match="arch='vit_test_patch4'"):
    convert_mae.mae_to_flax(_numpy_state_dict(), arch="vit_base_patch16")
  with pytest.raises(ValueError, match="image_size=8"):
    convert_mae.mae_to_flax(_numpy_state_dict(), image_size=224)
  wrapped = {"model": {"module." + k: v for k, v in _state_dict().items()}}
  path = tmp_path / "wrapped.pth"
  torch.save(wrapped, path)
  params = convert_mae.mae_to_flax(str(path), decoder_heads=DEC_HEADS)
  assert "decoder" in params["pretext_head"]


def test_official_layout_names():
  layout = convert_mae.expected_layout("vit_base_patch16")
  keys = {e.key: e.shape for e in layout}
  assert keys["patch_embed.proj.weight"] == (768, 3, 16, 16)
  assert keys["blocks.11.attn.qkv.weight"] == (2304, 768)
  assert keys["pos_embed"] == (1, 197, 768) and keys["decoder_pos_embed"] == (1, 197, 512)
  assert keys["decoder_blocks.7.mlp.fc2.bias"] == (512,)
  assert keys["decoder_pred.weight"] == (768, 512) and keys["mask_token"] == (1, 1, 512)
  assert len(keys) == 4 + 12 * 12 + 2 + 4 + 8 * 12 + 2 + 2  # 254 tensors
