"""On-device image augmentations for BiSSL (BiSSL paper §4.2.1; docs/sources.md), pure JAX and jit-able.

Each view is produced in two pure steps, so the random decisions can be inspected:

1. :func:`sample_view_params` draws every random quantity of one example
   (crop box, flip, jitter factors and order, grayscale, blur σ, solarize) as a
   :class:`ViewParams`; :func:`sample_batch_params` does so per example for a batch.
2. :func:`apply_view` applies them to one ``[0, 1]`` float image.

Batches are vmapped over per-example PRNG keys. Choices the spec leaves open follow
torchvision's tensor transforms:

* RandomResizedCrop: torchvision's rejection sampler (10 tries of area ∈ scale·HW and
  log-uniform aspect ratio, else a centre crop), then crop-and-resize with an
  antialiased bilinear filter; equal to torchvision's ``resized_crop`` with
  ``antialias=True`` (tested against torch).
* Colour jitter: factors ``b, c ∈ U[0.6, 1.4]``, ``s ∈ U[0.8, 1.2]``, hue shift
  ``∈ U[-0.1, 0.1]``, applied in a random order (torchvision and the BiSSL thesis);
  hue is shifted in HSV space; contrast blends towards the mean gray level.
* Grayscale: ITU-R 601 luma ``0.299 R + 0.587 G + 0.114 B``, repeated to 3 channels.
* Gaussian blur: kernel size 23 (the thesis; BYOL's 23 at 224 px), reduced to the
  largest odd size below ``2·size`` on tiny images; reflect padding; σ ∈ U[0.1, 2].
* Solarize: pixels ``≥ 0.5`` become ``1 − x`` (torchvision's threshold 128/255 ≈ 0.5).

Unlike a PIL pipeline, intermediates are not re-quantised to 8 bits.
"""
import dataclasses
import math
from typing import NamedTuple, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_LUMA = (0.299, 0.587, 0.114)
EVAL_CROP_FRACTION = 0.875


@dataclasses.dataclass(frozen=True)
class ViewConfig:
  """Probabilities and strengths of one augmentation view (static under jit)."""
  crop_scale: Tuple[float, float] = (0.5, 1.0)
  crop_ratio: Tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0)
  flip_prob: float = 0.5
  jitter_prob: float = 0.8
  brightness: float = 0.4
  contrast: float = 0.4
  saturation: float = 0.2
  hue: float = 0.1
  grayscale_prob: float = 0.2
  blur_prob: float = 1.0
  blur_sigma: Tuple[float, float] = (0.1, 2.0)
  blur_kernel_size: int = 23
  solarize_prob: float = 0.0
  solarize_threshold: float = 0.5


PRETEXT_VIEW1 = ViewConfig(blur_prob=1.0, solarize_prob=0.0)
PRETEXT_VIEW2 = ViewConfig(blur_prob=0.1, solarize_prob=0.2)
DOWNSTREAM_TRAIN = ViewConfig(jitter_prob=0.0, grayscale_prob=0.0, blur_prob=0.0,
                              solarize_prob=0.0)


class ViewParams(NamedTuple):
  """The random draws of one augmented view (leading batch axis when batched)."""
  crop_box: jax.Array       # int32 (y0, x0, h, w)
  flip: jax.Array           # bool
  jitter: jax.Array         # bool
  jitter_factors: jax.Array  # (brightness, contrast, saturation, hue shift)
  jitter_order: jax.Array   # permutation of 0..3 (indices into jitter_factors' ops)
  grayscale: jax.Array      # bool
  blur: jax.Array           # bool
  blur_sigma: jax.Array     # float
  solarize: jax.Array       # bool


# ----------------------------------------------------------------------------- primitives

def to_float_rgb(images: jax.Array) -> jax.Array:
  """uint8 ``(..., H, W, C)`` → float32 in [0, 1] with 3 channels (C=1 is repeated).

  Float inputs are taken to be in [0, 1] already.
  """
  channels = images.shape[-1]
  if channels not in (1, 3):
    raise ValueError(f"Images must have 1 or 3 channels (NHWC); got shape {images.shape}.")
  if images.dtype == jnp.uint8:
    x = images.astype(jnp.float32) / 255.0
  else:
    x = images.astype(jnp.float32)
  if channels == 1:
    x = jnp.repeat(x, 3, axis=-1)
  return x


def normalize(image: jax.Array) -> jax.Array:
  """``(x − mean)/std`` with the ImageNet RGB statistics."""
  return (image - jnp.asarray(IMAGENET_MEAN)) / jnp.asarray(IMAGENET_STD)


def sample_crop_box(rng: jax.Array, height: int, width: int,
                    scale: Tuple[float, float] = (0.5, 1.0),
                    ratio: Tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0),
                    attempts: int = 10) -> jax.Array:
  """torchvision's RandomResizedCrop box sampler, vectorised over its attempts.

  Args:
    rng: PRNG key.
    height, width: static image size.
    scale: range of the crop area as a fraction of the image area.
    ratio: range of the crop aspect ratio w/h (sampled log-uniformly).
    attempts: tries before falling back to a centre crop.

  Returns:
    int32 ``(y0, x0, h, w)``.
  """
  k_area, k_ratio, k_y, k_x = jax.random.split(rng, 4)
  area = height * width * jax.random.uniform(k_area, (attempts,), minval=scale[0],
                                             maxval=scale[1])
  log_r = jax.random.uniform(k_ratio, (attempts,), minval=math.log(ratio[0]),
                             maxval=math.log(ratio[1]))
  r = jnp.exp(log_r)
  ws = jnp.round(jnp.sqrt(area * r)).astype(jnp.int32)
  hs = jnp.round(jnp.sqrt(area / r)).astype(jnp.int32)
  ok = (ws > 0) & (ws <= width) & (hs > 0) & (hs <= height)
  first = jnp.argmax(ok)
  found = jnp.any(ok)
  # Fallback: the largest centred crop with the aspect ratio clamped into range.
  in_ratio = width / height
  if in_ratio < ratio[0]:
    fw, fh = width, int(round(width / ratio[0]))
  elif in_ratio > ratio[1]:
    fw, fh = int(round(height * ratio[1])), height
  else:
    fw, fh = width, height
  h = jnp.where(found, hs[first], fh)
  w = jnp.where(found, ws[first], fw)
  y0 = jnp.where(found, jax.random.randint(k_y, (), 0, height - h + 1), (height - fh) // 2)
  x0 = jnp.where(found, jax.random.randint(k_x, (), 0, width - w + 1), (width - fw) // 2)
  return jnp.stack([y0, x0, h, w]).astype(jnp.int32)


def _crop_resize_weights(start, length, in_size: int, out_size: int) -> jax.Array:
  """``(out_size, in_size)`` resampling matrix of the window ``[start, start+length)``.

  Triangle (bilinear) filter widened by the downscale factor (antialiasing, as PIL
  and torch's ``antialias=True``), restricted to the window and renormalised, so only
  cropped pixels contribute, exactly as crop-then-resize.
  """
  step = length / out_size
  centers = start + (jnp.arange(out_size, dtype=jnp.float32) + 0.5) * step
  support = jnp.maximum(step, 1.0)
  taps = jnp.arange(in_size, dtype=jnp.float32) + 0.5
  w = jnp.maximum(0.0, 1.0 - jnp.abs(taps[None, :] - centers[:, None]) / support)
  inside = (taps >= start) & (taps < start + length)
  w = jnp.where(inside[None, :], w, 0.0)
  return w / jnp.maximum(jnp.sum(w, axis=1, keepdims=True), 1e-12)


def resized_crop(image: jax.Array, box: jax.Array, *, size: int) -> jax.Array:
  """Crops ``box = (y0, x0, h, w)`` from ``(H, W, C)`` and resizes it to ``(size, size, C)``.

  Matches torchvision's ``resized_crop`` with bilinear ``antialias=True`` (half-pixel
  centres). The box may be traced; the output size is static.
  """
  box = box.astype(jnp.float32)
  rows = _crop_resize_weights(box[0], box[2], image.shape[0], size)
  cols = _crop_resize_weights(box[1], box[3], image.shape[1], size)
  out = jnp.einsum("oh,hwc->owc", rows, image, precision=jax.lax.Precision.HIGHEST)
  out = jnp.einsum("pw,owc->opc", cols, out, precision=jax.lax.Precision.HIGHEST)
  return jnp.clip(out, 0.0, 1.0)


def random_resized_crop(rng: jax.Array, image: jax.Array, *, size: int,
                        scale: Tuple[float, float] = (0.5, 1.0),
                        ratio: Tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0)) -> jax.Array:
  """RandomResizedCrop of one ``(H, W, C)`` float image to ``(size, size, C)``."""
  box = sample_crop_box(rng, image.shape[0], image.shape[1], scale, ratio)
  return resized_crop(image, box, size=size)


def rgb_to_gray(image: jax.Array) -> jax.Array:
  """Luma ``(..., H, W)`` of an RGB image."""
  return image @ jnp.asarray(_LUMA, image.dtype)


def to_grayscale(image: jax.Array) -> jax.Array:
  """Grayscale repeated to 3 channels."""
  return jnp.repeat(rgb_to_gray(image)[..., None], 3, axis=-1)


def adjust_brightness(image, factor):
  return jnp.clip(image * factor, 0.0, 1.0)


def adjust_contrast(image, factor):
  mean = jnp.mean(rgb_to_gray(image))
  return jnp.clip(factor * image + (1.0 - factor) * mean, 0.0, 1.0)


def adjust_saturation(image, factor):
  gray = rgb_to_gray(image)[..., None]
  return jnp.clip(factor * image + (1.0 - factor) * gray, 0.0, 1.0)


def rgb_to_hsv(image: jax.Array) -> jax.Array:
  """RGB in [0, 1] → HSV with h ∈ [0, 1) (torchvision's formulas, division-safe)."""
  r, g, b = image[..., 0], image[..., 1], image[..., 2]
  maxc = jnp.max(image, axis=-1)
  minc = jnp.min(image, axis=-1)
  flat = maxc == minc
  chroma = maxc - minc
  s = chroma / jnp.where(flat, 1.0, maxc)
  div = jnp.where(flat, 1.0, chroma)
  rc, gc, bc = (maxc - r) / div, (maxc - g) / div, (maxc - b) / div
  hr = jnp.where(maxc == r, bc - gc, 0.0)
  hg = jnp.where((maxc == g) & (maxc != r), 2.0 + rc - bc, 0.0)
  hb = jnp.where((maxc != g) & (maxc != r), 4.0 + gc - rc, 0.0)
  h = jnp.mod((hr + hg + hb) / 6.0 + 1.0, 1.0)
  return jnp.stack([h, s, maxc], axis=-1)


def hsv_to_rgb(hsv: jax.Array) -> jax.Array:
  """Inverse of :func:`rgb_to_hsv`."""
  h, s, v = hsv[..., 0], hsv[..., 1], hsv[..., 2]
  i = jnp.floor(h * 6.0)
  f = h * 6.0 - i
  i = jnp.mod(i.astype(jnp.int32), 6)
  p = jnp.clip(v * (1.0 - s), 0.0, 1.0)
  q = jnp.clip(v * (1.0 - s * f), 0.0, 1.0)
  t = jnp.clip(v * (1.0 - s * (1.0 - f)), 0.0, 1.0)
  sector = [i == k for k in range(6)]
  r = jnp.select(sector, [v, q, p, p, t, v])
  g = jnp.select(sector, [t, v, v, q, p, p])
  b = jnp.select(sector, [p, p, t, v, v, q])
  return jnp.stack([r, g, b], axis=-1)


def adjust_hue(image, shift):
  """Rotates hue by ``shift`` (a fraction of the colour wheel, in [-0.5, 0.5])."""
  hsv = rgb_to_hsv(image)
  hsv = hsv.at[..., 0].set(jnp.mod(hsv[..., 0] + shift, 1.0))
  return hsv_to_rgb(hsv)


_JITTER_OPS = (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)


def sample_jitter(rng: jax.Array, brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1
                  ) -> Tuple[jax.Array, jax.Array]:
  """Jitter factors ``(b, c, s, hue shift)`` and a random op order, as torchvision."""
  k_f, k_o = jax.random.split(rng)
  low = jnp.asarray([max(0.0, 1 - brightness), max(0.0, 1 - contrast),
                     max(0.0, 1 - saturation), -hue])
  high = jnp.asarray([1 + brightness, 1 + contrast, 1 + saturation, hue])
  factors = jax.random.uniform(k_f, (4,), minval=low, maxval=high)
  order = jax.random.permutation(k_o, 4).astype(jnp.int32)
  return factors, order


def apply_color_jitter(image: jax.Array, factors: jax.Array, order: jax.Array) -> jax.Array:
  """Applies brightness/contrast/saturation/hue with ``factors`` in the given ``order``."""
  branches = [lambda x, op=op, k=k: op(x, factors[k]) for k, op in enumerate(_JITTER_OPS)]
  # One loop body for the four positions: under vmap a switch computes all four ops and
  # selects, so four unrolled copies put sixteen ops (four HSV round trips) into every
  # augmenting program and doubled the jitter's compile time. Bit-identical, and as fast
  # (docs/benchmarks.md, "The test suite's wall time").
  return jax.lax.fori_loop(0, 4, lambda i, x: jax.lax.switch(order[i], branches, x), image)


def color_jitter(rng: jax.Array, image: jax.Array, brightness=0.4, contrast=0.4,
                 saturation=0.2, hue=0.1) -> jax.Array:
  """torchvision's ColorJitter (always applied; wrap with a coin flip for p < 1)."""
  factors, order = sample_jitter(rng, brightness, contrast, saturation, hue)
  return apply_color_jitter(image, factors, order)


def blur_kernel_size(requested: int, image_size: int) -> int:
  """``requested`` (odd), shrunk so reflect padding fits: at most ``2·image_size − 1``."""
  k = min(int(requested), 2 * int(image_size) - 1)
  return k if k % 2 == 1 else k - 1


def _reflect_index(i: np.ndarray, n: int) -> np.ndarray:
  """Reflect padding without edge repetition (torch 'reflect', scipy 'mirror')."""
  period = 2 * (n - 1)
  i = np.mod(i, period) if n > 1 else np.zeros_like(i)
  return np.where(i >= n, period - i, i)


def _blur_matrix(weights: jax.Array, n: int) -> jax.Array:
  """``(n, n)`` matrix applying the 1-D kernel ``weights`` with reflect padding."""
  k = weights.shape[0]
  radius = k // 2
  taps = _reflect_index(np.arange(n)[:, None] + np.arange(-radius, radius + 1)[None, :], n)
  one_hot = np.eye(n, dtype=np.float32)[taps]  # (n, k, n), static
  return jnp.einsum("d,idj->ij", weights, one_hot, precision=jax.lax.Precision.HIGHEST)


def gaussian_blur(image: jax.Array, sigma, kernel_size: int = 23) -> jax.Array:
  """Separable Gaussian blur of ``(H, W, C)`` with reflect padding (torchvision's kernel).

  Implemented as two small matrix products (the kernel folded with the padding into
  an ``H × H`` and a ``W × W`` matrix), which vmaps over per-example σ cheaply.

  Args:
    image: float image.
    sigma: standard deviation in pixels (may be traced).
    kernel_size: odd kernel size; shrunk to fit tiny images (:func:`blur_kernel_size`).
  """
  height, width = image.shape[0], image.shape[1]
  k = blur_kernel_size(kernel_size, min(height, width))
  x = jnp.arange(-(k // 2), k // 2 + 1, dtype=jnp.float32)
  weights = jnp.exp(-0.5 * jnp.square(x / sigma))
  weights = weights / jnp.sum(weights)
  hp = jax.lax.Precision.HIGHEST
  out = jnp.einsum("ih,hwc->iwc", _blur_matrix(weights, height), image, precision=hp)
  return jnp.einsum("jw,iwc->ijc", _blur_matrix(weights, width), out, precision=hp)


def solarize(image: jax.Array, threshold: float = 0.5) -> jax.Array:
  """Inverts pixels at or above ``threshold``."""
  return jnp.where(image >= threshold, 1.0 - image, image)


# ----------------------------------------------------------------------------- views

def sample_view_params(rng: jax.Array, height: int, width: int, config: ViewConfig
                       ) -> ViewParams:
  """Every random draw of one view of one ``height × width`` example."""
  keys = jax.random.split(rng, 8)
  coin = lambda key, p: jax.random.uniform(key) < p
  factors, order = sample_jitter(keys[3], config.brightness, config.contrast,
                                 config.saturation, config.hue)
  return ViewParams(
      crop_box=sample_crop_box(keys[0], height, width, config.crop_scale, config.crop_ratio),
      flip=coin(keys[1], config.flip_prob),
      jitter=coin(keys[2], config.jitter_prob),
      jitter_factors=factors,
      jitter_order=order,
      grayscale=coin(keys[4], config.grayscale_prob),
      blur=coin(keys[5], config.blur_prob),
      blur_sigma=jax.random.uniform(keys[6], minval=config.blur_sigma[0],
                                    maxval=config.blur_sigma[1]),
      solarize=coin(keys[7], config.solarize_prob))


def sample_batch_params(rng: jax.Array, batch: int, height: int, width: int,
                        config: ViewConfig) -> ViewParams:
  """:func:`sample_view_params` for ``batch`` examples with independent keys."""
  keys = jax.random.split(rng, batch)
  return jax.vmap(lambda k: sample_view_params(k, height, width, config))(keys)


def apply_view(image: jax.Array, params: ViewParams, *, size: int, config: ViewConfig
               ) -> jax.Array:
  """Crop → flip → jitter → grayscale → blur → solarize on one [0, 1] image.

  Transforms whose probability is 0 in ``config`` are skipped at trace time.

  Returns:
    ``(size, size, 3)`` float32 in [0, 1] (not normalised).
  """
  x = resized_crop(image, params.crop_box, size=size)
  if config.flip_prob > 0:
    x = jnp.where(params.flip, x[:, ::-1], x)
  if config.jitter_prob > 0:
    x = jnp.where(params.jitter, apply_color_jitter(x, params.jitter_factors,
                                                    params.jitter_order), x)
  if config.grayscale_prob > 0:
    x = jnp.where(params.grayscale, to_grayscale(x), x)
  if config.blur_prob > 0:
    x = jnp.where(params.blur, gaussian_blur(x, params.blur_sigma, config.blur_kernel_size), x)
  if config.solarize_prob > 0:
    x = jnp.where(params.solarize, solarize(x, config.solarize_threshold), x)
  return x


def augment_batch(rng: jax.Array, images: jax.Array, *, size: int, config: ViewConfig,
                  normalize_output: bool = True) -> jax.Array:
  """One augmented view of every image of a uint8 ``(B, H, W, C)`` batch.

  Returns:
    float32 ``(B, size, size, 3)``, ImageNet-normalised unless ``normalize_output=False``.
  """
  x = to_float_rgb(images)
  params = sample_batch_params(rng, x.shape[0], x.shape[1], x.shape[2], config)
  out = jax.vmap(lambda im, p: apply_view(im, p, size=size, config=config))(x, params)
  return normalize(out) if normalize_output else out


def pretext_views(rng: jax.Array, images: jax.Array, *, size: int,
                  normalize_output: bool = True) -> Tuple[jax.Array, jax.Array]:
  """The asymmetric SimCLR/BYOL pair (blur 1.0/0.1, solarize 0/0.2).

  Args:
    rng: PRNG key; every example and view gets its own draws.
    images: uint8 ``(B, H, W, C)``, C ∈ {1, 3}.
    size: output side.
    normalize_output: False returns the [0, 1] images (for inspection and tests).

  Returns:
    ``(v1, v2)``, each float32 ``(B, size, size, 3)``.
  """
  k1, k2 = jax.random.split(rng)
  return (augment_batch(k1, images, size=size, config=PRETEXT_VIEW1,
                        normalize_output=normalize_output),
          augment_batch(k2, images, size=size, config=PRETEXT_VIEW2,
                        normalize_output=normalize_output))


def downstream_train_view(rng: jax.Array, images: jax.Array, *, size: int,
                          normalize_output: bool = True) -> jax.Array:
  """RandomResizedCrop (scale (0.5, 1), ratio (3/4, 4/3)) → flip p0.5 → normalise."""
  return augment_batch(rng, images, size=size, config=DOWNSTREAM_TRAIN,
                       normalize_output=normalize_output)


def eval_resize_shape(height: int, width: int, size: int) -> Tuple[int, int]:
  """Shape after resizing the short side to ``int(size/0.875)`` (torchvision rounding)."""
  short = int(size / EVAL_CROP_FRACTION)
  if height <= width:
    return short, int(short * width / height)
  return int(short * height / width), short


def eval_view(rng: Optional[jax.Array], images: jax.Array, *, size: int,
              normalize_output: bool = True) -> jax.Array:
  """Resize the short side to ``size/0.875``, centre-crop ``size``, normalise.

  Args:
    rng: unused (may be None); kept so every view function has one signature.
    images: uint8 ``(B, H, W, C)``.
    size: output side.
    normalize_output: False returns [0, 1] images.

  Returns:
    float32 ``(B, size, size, 3)``.
  """
  del rng
  x = to_float_rgb(images)
  batch, height, width, _ = x.shape
  new_h, new_w = eval_resize_shape(height, width, size)
  x = jax.image.resize(x, (batch, new_h, new_w, 3), method="linear", antialias=True)
  top = int(round((new_h - size) / 2.0))
  left = int(round((new_w - size) / 2.0))
  x = jnp.clip(x[:, top:top + size, left:left + size, :], 0.0, 1.0)
  return normalize(x) if normalize_output else x
