"""MAE's decoder (He et al. 2022), the pretext head φ_P of the ViT bundle.

It gets the encoded visible tokens back in place among learned mask tokens, adds its
own fixed sin-cos position embeddings and predicts every patch's pixels. Parameter
names follow the official ``decoder_*``/``mask_token`` keys, so MAE checkpoints load.
"""
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from bissl_jax.models.vit import block_stack, dense_init, layer_norm, sincos_init, token_init


class MAEDecoder(nn.Module):
  """MAE's decoder; names as the official ``decoder_*``/``mask_token`` keys.

  Attributes:
    patch_size: encoder patch side (the prediction is p·p·channels per patch).
    width, depth, num_heads, mlp_ratio: decoder transformer (MAE: 512, 8, 16, 4).
    channels: image channels.
    remat, dtype: as in :class:`bissl_jax.models.vit.ViT`.
  """
  patch_size: int = 16
  width: int = 512
  depth: int = 8
  num_heads: int = 16
  mlp_ratio: float = 4.0
  channels: int = 3
  remat: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, latent, ids_restore):
    """Pixel predictions ``(B, N, p·p·C)`` for every patch.

    Args:
      latent: encoder output ``(B, 1 + n_visible, D_enc)`` (class token first).
      ids_restore: ``(B, N)``: position of each patch in the (visible, masked) order.
    """
    batch, num_patches = ids_restore.shape
    x = nn.Dense(self.width, kernel_init=dense_init, dtype=self.dtype,
                 name="decoder_embed")(latent)
    mask_token = self.param("mask_token", token_init, (1, 1, self.width))
    n_masked = num_patches - (x.shape[1] - 1)
    masked = jnp.broadcast_to(mask_token.astype(x.dtype), (batch, n_masked, self.width))
    tokens = jnp.concatenate([x[:, 1:], masked], axis=1)
    tokens = jnp.take_along_axis(tokens, ids_restore[..., None].astype(jnp.int32), axis=1)
    x = jnp.concatenate([x[:, :1], tokens], axis=1)
    pos = self.param("decoder_pos_embed", sincos_init, (1, num_patches + 1, self.width))
    x = x + jax.lax.stop_gradient(pos).astype(x.dtype)
    x = block_stack(x, depth=self.depth, num_heads=self.num_heads, mlp_ratio=self.mlp_ratio,
                    drop_path_rate=0.0, lora=None, dtype=self.dtype, remat=self.remat,
                    prefix="decoder_blocks_")
    x = layer_norm("decoder_norm", self.dtype)(x)
    x = nn.Dense(self.patch_size ** 2 * self.channels, kernel_init=dense_init,
                 dtype=self.dtype, name="decoder_pred")(x)
    return x[:, 1:].astype(jnp.float32)
