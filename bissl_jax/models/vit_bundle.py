"""The ViT model bundle: encoder (+ LoRA) and MAE decoder.

Follows :class:`bissl_jax.core.protocols.Model`::

  params      = {'backbone': ViT encoder incl. LoRA leaves,
                 'pretext_head': {'decoder': MAE decoder} or {},
                 'downstream_head': the downstream task's head}
  batch_stats = {'backbone': {}, 'pretext_head': {}}          (no BatchNorm)

:meth:`ViTModel.trainable` says which leaves train: with LoRA, the adapters (and the
backbone LayerNorms when ``train_norms``) of the backbone, all of the decoder except
its fixed position table, and the downstream head; without LoRA, everything except fixed
(sin-cos) position tables. The core solves the implicit gradient, takes the proximal
term and builds M-FAC blocks over the trainable leaves only (see ``docs/vit.md``).
"""
import dataclasses
from typing import Any, Optional, Tuple

import jax
import jax.numpy as jnp

from bissl_jax.models.lora import LoRAConfig, is_lora_path, path_names
from bissl_jax.models.mae_decoder import MAEDecoder
from bissl_jax.models.vit import ViT, build_vit, sample_drop_noise
from bissl_jax.types import PyTree


POOLS = ("token", "mean")
# The ViT names a config may use as ``model.arch`` (config validation reads this):
# the standard sizes at their usual patches, and the CPU test toy at patch 4.
ARCHITECTURES = ("vit_test_patch4", "vit_tiny_patch16", "vit_small_patch16",
                 "vit_base_patch16", "vit_large_patch16", "vit_huge_patch14")
_BACKBONE_NORMS = ("norm", "norm1", "norm2")


@dataclasses.dataclass(frozen=True)
class ViTModel:
  """Frozen, hashable bundle of the ViT networks (a static argument under jit).

  Attributes:
    encoder: the :class:`bissl_jax.models.vit.ViT` backbone f_θ.
    decoder: the MAE decoder φ_P, or None (no pretext head).
    pool: features for the classifier: ``'token'`` (class token, BiSSLight's default)
      or ``'mean'`` (mean of the normalised patch tokens).
    train_norms: with LoRA, train the backbone LayerNorms as well.
  """
  encoder: ViT
  decoder: Optional[MAEDecoder]
  pool: str = "token"
  train_norms: bool = False

  def __post_init__(self):
    if self.pool not in POOLS:
      raise ValueError(f"pool must be one of {POOLS}; got {self.pool!r}.")

  def init(self, rng: jax.Array, image_size: int, channels: int = 3
           ) -> Tuple[PyTree, PyTree]:
    """``(params, batch_stats)`` for ``image_size``² inputs (see the module docstring)."""
    # The third key is reserved for the downstream head (head_rng).
    k_enc, k_dec, _ = jax.random.split(rng, 3)
    x = jnp.zeros((1, image_size, image_size, channels), jnp.float32)
    enc = self.encoder.init(k_enc, x)["params"]
    tokens = jax.eval_shape(lambda p: self.encoder.apply({"params": p}, x), enc)
    head = {}
    if self.decoder is not None:
      n = tokens.shape[1] - 1
      latent = jnp.zeros(tokens.shape, jnp.float32)
      head = {"decoder": self.decoder.init(k_dec, latent,
                                           jnp.arange(n)[None])["params"]}
    params = {"backbone": enc, "pretext_head": head, "downstream_head": {}}
    return params, {"backbone": {}, "pretext_head": {}}

  @staticmethod
  def head_rng(rng: jax.Array) -> jax.Array:
    """The key :meth:`init`'s schedule reserves for the downstream head."""
    return jax.random.split(rng, 3)[2]

  def drop_noise(self, rng: jax.Array, batch: int) -> Optional[jax.Array]:
    """Drop-path uniforms for one batch, or None when the encoder has no drop-path."""
    if self.encoder.drop_path_rate <= 0.0:
      return None
    return sample_drop_noise(rng, batch, self.encoder.depth)

  def encode(self, backbone_params, images, *, keep_ids=None, drop_noise=None):
    """The encoder's token sequence ``(B, 1 + n, D)`` (float32)."""
    out = self.encoder.apply({"params": backbone_params}, images, keep_ids=keep_ids,
                             drop_noise=drop_noise)
    return out.astype(jnp.float32)

  def decode(self, decoder_params, latent, ids_restore):
    """The MAE decoder's pixel predictions ``(B, N, p·p·C)``."""
    if self.decoder is None:
      raise ValueError("This model has no decoder; build it with decoder='mae'.")
    return self.decoder.apply({"params": decoder_params}, latent, ids_restore)

  def features(self, backbone_params, backbone_stats, x, *, train: bool,
               rng: Optional[jax.Array] = None):
    """Pooled features ``(B, D)`` and the (empty, unchanged) statistics.

    Drop-path is active only when ``train`` and an ``rng`` key is given (its draws
    then come from that key alone).
    """
    noise = self.drop_noise(rng, x.shape[0]) if (train and rng is not None) else None
    tokens = self.encode(backbone_params, x, drop_noise=noise)
    feats = tokens[:, 0] if self.pool == "token" else jnp.mean(tokens[:, 1:], axis=1)
    return feats, backbone_stats

  def trainable(self, params: PyTree) -> PyTree:
    """Boolean tree over ``params``: True where a leaf trains (module docstring)."""
    with_lora = self.encoder.lora is not None

    def rule(path, _):
      names = path_names(path)
      group, leaf = names[0], names[-1]
      if leaf == "decoder_pos_embed":
        return False  # MAE's fixed sin-cos table
      if leaf == "pos_embed":  # a base weight: trains only when learned and no LoRA
        return self.encoder.posemb == "learn" and not with_lora
      if group != "backbone" or not with_lora:
        return True
      if is_lora_path(names):
        return True
      return self.train_norms and any(n in _BACKBONE_NORMS for n in names)

    return jax.tree_util.tree_map_with_path(rule, params)


def build_vit_model(arch: str, *, decoder: Optional[str] = "mae",
                    decoder_width: int = 512, decoder_depth: int = 8,
                    decoder_heads: int = 16, lora_rank: int = 0,
                    lora_alpha: Optional[float] = None,
                    lora_targets: Tuple[str, ...] = ("q", "v"), posemb: str = "sincos",
                    drop_path_rate: float = 0.0, remat: bool = False, dtype: Any = "float32",
                    pool: str = "token", train_norms: bool = False) -> ViTModel:
  """Builds a :class:`ViTModel` from config values.

  Args:
    arch: ``vit_{test,tiny,small,base,large,huge}_patch{P}``.
    decoder: ``'mae'`` for an MAE decoder as the pretext head, None for none.
    decoder_width, decoder_depth, decoder_heads: MAE's decoder (512, 8, 16).
    lora_rank: 0 for no adapters (full training), else the rank r.
    lora_alpha: α (None: α = r).
    lora_targets: subset of ``('q', 'k', 'v', 'proj', 'fc1', 'fc2')``.
    posemb, drop_path_rate, remat: :class:`bissl_jax.models.vit.ViT` options.
    dtype: compute dtype name (``'float32'`` or ``'bfloat16'``).
    pool: ``'token'`` or ``'mean'`` features for the downstream head.
    train_norms: with LoRA, also train the backbone LayerNorms.
  """
  compute = jnp.dtype(dtype)
  lora = LoRAConfig(int(lora_rank), lora_alpha, tuple(lora_targets)) if lora_rank else None
  encoder = build_vit(arch, posemb=posemb, drop_path_rate=float(drop_path_rate),
                      remat=bool(remat), lora=lora, dtype=compute)
  if decoder not in (None, "mae"):
    raise ValueError(f"decoder must be 'mae' or None; got {decoder!r}.")
  dec = None
  if decoder == "mae":
    dec = MAEDecoder(patch_size=encoder.patch_size, width=int(decoder_width),
                     depth=int(decoder_depth), num_heads=int(decoder_heads),
                     remat=bool(remat), dtype=compute)
  return ViTModel(encoder=encoder, decoder=dec, pool=pool,
                  train_norms=bool(train_norms))
