"""Masked autoencoders (He et al. 2022) as a BiSSL pretext task.

The encoder sees the visible patches only (``1 − mask_ratio`` of them, chosen per
sample); a light decoder (the pretext head φ_P) gets the encoded visible tokens back
in place among learned mask tokens, adds its own fixed sin-cos position embeddings
and predicts every patch's pixels. The loss is the mean squared error on the masked
patches only, against per-patch normalised pixels (``norm_pix_loss``, MAE's and
BiSSLight's default).

All randomness is drawn in :meth:`MAE.prepare`: the augmentation, the masking noise
(``(B, N)`` uniforms whose per-sample argsort chooses the visible patches, as MAE's
``random_masking``) and, when the encoder uses drop-path, its uniforms. Given these
inputs the loss is a deterministic, twice-differentiable function of the parameters.
Exactly ``round(mask_ratio·N)`` patches are masked in every sample.
"""
import dataclasses
from typing import Any, ClassVar, Optional, Tuple

import jax
import jax.numpy as jnp

from bissl_jax.tasks import augment
from bissl_jax.types import PyTree


NORM_PIX_EPS = 1e-6
# MAE's augmentation: RandomResizedCrop(scale=(0.2, 1)) + flip, nothing else.
MAE_VIEW = augment.ViewConfig(crop_scale=(0.2, 1.0), jitter_prob=0.0, grayscale_prob=0.0,
                              blur_prob=0.0, solarize_prob=0.0)


def patchify(images: jax.Array, patch_size: int) -> jax.Array:
  """NHWC ``(B, H, W, C)`` → ``(B, N, p·p·C)``, patches row-major, pixels (p, q, c)."""
  b, h, w, c = images.shape
  p = patch_size
  x = images.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, (h // p) * (w // p), p * p * c)


def num_masked(num_patches: int, mask_ratio: float) -> int:
  """``round(mask_ratio·N)``; at least one patch stays visible and one is masked."""
  n = int(round(mask_ratio * num_patches))
  if not 0 < n < num_patches:
    raise ValueError(f"mask_ratio={mask_ratio} masks {n} of {num_patches} patches; it "
                     "must leave at least one visible and mask at least one.")
  return n


def masking_from_noise(noise: jax.Array, mask_ratio: float):
  """MAE's per-sample random masking from uniform noise ``(B, N)``.

  The patches with the smallest noise are kept.

  Returns:
    ``(ids_keep (B, n_keep), ids_restore (B, N), mask (B, N))`` with mask 1 on masked
    patches, 0 on visible ones.
  """
  batch, n = noise.shape
  n_keep = n - num_masked(n, mask_ratio)
  ids_shuffle = jnp.argsort(noise, axis=1)
  ids_restore = jnp.argsort(ids_shuffle, axis=1)
  ordered = jnp.concatenate([jnp.zeros((batch, n_keep)), jnp.ones((batch, n - n_keep))], 1)
  mask = jnp.take_along_axis(ordered, ids_restore, axis=1)
  return ids_shuffle[:, :n_keep], ids_restore, mask


def reconstruction_loss(images, pred, mask, patch_size: int, norm_pix_loss: bool = True):
  """Mean over masked patches of the per-patch mean squared pixel error.

  With ``norm_pix_loss`` each target patch is standardised by its own mean and
  unbiased variance (+1e-6), as MAE.
  """
  target = patchify(images.astype(jnp.float32), patch_size)
  if norm_pix_loss:
    mean = jnp.mean(target, axis=-1, keepdims=True)
    var = jnp.var(target, axis=-1, keepdims=True, ddof=1)
    target = (target - mean) / jnp.sqrt(var + NORM_PIX_EPS)
  per_patch = jnp.mean(jnp.square(pred - target), axis=-1)
  return jnp.sum(per_patch * mask) / jnp.sum(mask)


@dataclasses.dataclass(frozen=True)
class MAE:
  """MAE pretext task (:class:`bissl_jax.core.protocols.PretextTask`, no target network).

  Attributes:
    model: a :class:`bissl_jax.models.vit_bundle.ViTModel` with a decoder.
    mask_ratio: fraction of patches masked per sample (0.75).
    norm_pix_loss: per-patch normalised pixel targets (True in BiSSLight).
    image_size: side of the augmented crops (default: the input side).
    crop_scale: RandomResizedCrop area range ((0.2, 1) in MAE).
  """
  model: Any
  mask_ratio: float = 0.75
  norm_pix_loss: bool = True
  image_size: Optional[int] = None
  crop_scale: Tuple[float, float] = (0.2, 1.0)
  has_target: ClassVar[bool] = False

  def __post_init__(self):
    if getattr(self.model, "decoder", None) is None:
      raise ValueError("MAE needs a model with a decoder; build it with "
                       "build_vit_model(..., decoder='mae') (model.decoder is None).")
    if not 0.0 < float(self.mask_ratio) < 1.0:
      raise ValueError(f"mask_ratio must be in (0, 1); got {self.mask_ratio}.")

  def prepare(self, rng, images):
    """Augmented, normalised crops and the masking (and drop-path) noise.

    Returns:
      ``{'images': (B, S, S, 3), 'noise': (B, N), 'drop_noise': (B, depth, 2) or None}``.
    """
    size = self.image_size or images.shape[1]
    k_aug, k_mask, k_drop = jax.random.split(rng, 3)
    view = dataclasses.replace(MAE_VIEW, crop_scale=tuple(self.crop_scale))
    x = augment.augment_batch(k_aug, images, size=size, config=view)
    p = self.model.encoder.patch_size
    noise = jax.random.uniform(k_mask, (x.shape[0], (size // p) ** 2))
    return {"images": x, "noise": noise,
            "drop_noise": self.model.drop_noise(k_drop, x.shape[0])}

  def loss(self, params: PyTree, batch_stats: PyTree, inputs, target=None
           ) -> Tuple[jax.Array, dict]:
    """``(loss, {'batch_stats': unchanged, 'metrics': {'loss'}})``.

    Args:
      params: ``{'backbone', 'pretext_head': {'decoder'}}``; other keys ignored.
      batch_stats: passed through (a ViT has no running statistics).
      inputs: from :meth:`prepare`.
      target: unused.
    """
    del target
    images = inputs["images"]
    ids_keep, ids_restore, mask = masking_from_noise(inputs["noise"], self.mask_ratio)
    latent = self.model.encode(params["backbone"], images, keep_ids=ids_keep,
                               drop_noise=inputs.get("drop_noise"))
    pred = self.model.decode(params["pretext_head"]["decoder"], latent, ids_restore)
    loss = reconstruction_loss(images, pred, mask, self.model.encoder.patch_size,
                               self.norm_pix_loss)
    stats = {"backbone": batch_stats.get("backbone", {}),
             "pretext_head": batch_stats.get("pretext_head", {})}
    return loss, {"batch_stats": stats, "metrics": {"loss": loss}}
