"""Augmentations: determinism, ranges, crop boxes, probabilities, and numerics of each op."""
import colorsys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.ndimage

from bissl_jax.tasks import augment as A

try:  # optional ([torch] extra): only the PyTorch-reference tests need it
  import torch
  import torch.nn.functional as F
except ImportError:
  torch = F = None

requires_torch = pytest.mark.torch  # skipped without torch (tests/conftest.py)


def _images(batch=3, height=20, width=16, channels=3, seed=0):
  rng = np.random.default_rng(seed)
  return jnp.asarray(rng.integers(0, 256, (batch, height, width, channels), dtype=np.uint8))


def _unnormalize(x):
  return np.asarray(x) * np.asarray(A.IMAGENET_STD) + np.asarray(A.IMAGENET_MEAN)


def test_pretext_views_shapes_determinism_and_range():
  jitted_views = jax.jit(A.pretext_views, static_argnames=("size", "normalize_output"))
  images = _images()
  v1, v2 = jitted_views(jax.random.key(0), images, size=12)
  assert v1.shape == v2.shape == (3, 12, 12, 3) and v1.dtype == jnp.float32
  w1, w2 = jitted_views(jax.random.key(0), images, size=12)
  np.testing.assert_array_equal(v1, w1)
  np.testing.assert_array_equal(v2, w2)
  u1, _ = jitted_views(jax.random.key(1), images, size=12)
  assert not np.allclose(u1, v1)
  assert not np.allclose(v1, v2)
  assert not np.allclose(v1[0], v1[1])
  for v in (v1, v2):  # [0, 1] before normalisation
    raw = _unnormalize(v)
    assert raw.min() >= -1e-5 and raw.max() <= 1 + 1e-5
  # View 1 is always blurred, view 2 mostly not: view 1 is smoother on average.
  tv = lambda v: np.abs(np.diff(_unnormalize(v), axis=1)).mean()
  assert tv(v1) < tv(v2)


def test_grayscale_input_and_downstream_view():
  gray = _images(batch=2, channels=1)
  rgb = np.asarray(A.to_float_rgb(gray))
  assert rgb.shape == (2, 20, 16, 3)
  np.testing.assert_allclose(rgb[..., 0], np.asarray(gray)[..., 0] / 255.0, rtol=1e-6)
  np.testing.assert_array_equal(rgb[..., 0], rgb[..., 2])
  view = jax.jit(A.downstream_train_view, static_argnames=("size", "normalize_output"))
  d = view(jax.random.key(0), gray, size=8, normalize_output=False)
  assert d.shape == (2, 8, 8, 3) and d.dtype == jnp.float32
  np.testing.assert_allclose(d[..., 0], d[..., 2], atol=1e-6)  # no colour ops downstream
  assert float(d.min()) >= 0.0 and float(d.max()) <= 1.0
  np.testing.assert_array_equal(d, view(jax.random.key(0), gray, size=8, normalize_output=False))
  with pytest.raises(ValueError, match="1 or 3 channels"):
    A.eval_view(None, _images(channels=4), size=8)


@requires_torch
def test_eval_view_matches_torch_resize_and_center_crop():
  images = _images(batch=2, height=37, width=50)
  got = A.eval_view(None, images, size=24, normalize_output=False)
  new_h, new_w = A.eval_resize_shape(37, 50, 24)
  assert (new_h, new_w) == (27, 36)  # int(24/0.875) = 27 on the short side
  t = torch.from_numpy(np.array(images)).permute(0, 3, 1, 2).float() / 255
  r = F.interpolate(t, size=(new_h, new_w), mode="bilinear", align_corners=False, antialias=True)
  top, left = round((new_h - 24) / 2), round((new_w - 24) / 2)
  ref = r[:, :, top:top + 24, left:left + 24].permute(0, 2, 3, 1).numpy()
  np.testing.assert_allclose(got, ref, atol=1e-5)
  np.testing.assert_allclose(A.eval_view(None, images, size=24),
                             (ref - np.asarray(A.IMAGENET_MEAN)) / np.asarray(A.IMAGENET_STD),
                             atol=1e-4)


@requires_torch
@pytest.mark.parametrize("box", [(3, 5, 27, 19), (3, 5, 10, 7), (0, 0, 40, 30), (10, 2, 20, 28)])
def test_resized_crop_matches_torch_crop_then_resize(box):
  img = np.random.default_rng(1).random((40, 30, 3)).astype(np.float32)
  y0, x0, h, w = box
  got = A.resized_crop(jnp.asarray(img), jnp.asarray(box), size=16)
  t = torch.from_numpy(img).permute(2, 0, 1)[None, :, y0:y0 + h, x0:x0 + w]
  ref = F.interpolate(t, size=(16, 16), mode="bilinear", align_corners=False, antialias=True)
  np.testing.assert_allclose(got, ref[0].permute(1, 2, 0).numpy(), atol=1e-5)


@pytest.mark.parametrize("height,width", [(32, 32), (24, 30)])
def test_crop_boxes_within_bounds(height, width):
  boxes = np.asarray(jax.jit(jax.vmap(lambda k: A.sample_crop_box(k, height, width)))(
      jax.random.split(jax.random.key(0), 2000)))
  y0, x0, h, w = boxes.T
  assert np.all(y0 >= 0) and np.all(x0 >= 0)
  assert np.all(y0 + h <= height) and np.all(x0 + w <= width)
  sampled = (h * w != height * width) | (height == width)
  area = h * w / (height * width)
  # Rounding h and w to integers moves the area by at most ~(h + w + 1)/HW.
  slack = (h + w + 1) / (height * width)
  assert np.all(area >= 0.5 - slack) and np.all(area <= 1.0)
  ratio = w / h
  assert np.all(ratio[sampled] >= 0.75 * (1 - 2 / h[sampled]))
  assert np.all(ratio[sampled] <= 4 / 3 * (1 + 2 / w[sampled]))
  assert area.std() > 0.05 and len(np.unique(y0)) > 3  # really random


@pytest.mark.parametrize("config,expected", [
    (A.PRETEXT_VIEW1, dict(flip=0.5, jitter=0.8, grayscale=0.2, blur=1.0, solarize=0.0)),
    (A.PRETEXT_VIEW2, dict(flip=0.5, jitter=0.8, grayscale=0.2, blur=0.1, solarize=0.2)),
    (A.DOWNSTREAM_TRAIN, dict(flip=0.5, jitter=0.0, grayscale=0.0, blur=0.0, solarize=0.0)),
])
def test_decision_frequencies(config, expected):
  n = 4000
  sample = jax.jit(A.sample_batch_params, static_argnums=(1, 2, 3, 4))
  params = sample(jax.random.key(3), n, 24, 24, config)
  for name, p in expected.items():
    freq = float(np.mean(np.asarray(getattr(params, name))))
    assert abs(freq - p) <= 4 * np.sqrt(p * (1 - p) / n) + 1e-9, (name, freq, p)
  factors = np.asarray(params.jitter_factors)
  lo = [0.6, 0.6, 0.8, -0.1]
  hi = [1.4, 1.4, 1.2, 0.1]
  assert np.all(factors >= lo) and np.all(factors <= hi)
  np.testing.assert_allclose(factors.mean(0), [1, 1, 1, 0], atol=0.02)
  orders = np.asarray(params.jitter_order)
  assert np.all(np.sort(orders, 1) == np.arange(4))
  assert len({tuple(o) for o in orders}) == 24  # every order occurs
  sigma = np.asarray(params.blur_sigma)
  assert sigma.min() >= 0.1 and sigma.max() <= 2.0


def _plain_params(size, **overrides):
  base = dict(crop_box=jnp.asarray([0, 0, size, size]), flip=jnp.asarray(False),
              jitter=jnp.asarray(False), jitter_factors=jnp.asarray([1.0, 1.0, 1.0, 0.0]),
              jitter_order=jnp.arange(4), grayscale=jnp.asarray(False), blur=jnp.asarray(False),
              blur_sigma=jnp.asarray(1.0), solarize=jnp.asarray(False))
  base.update({k: jnp.asarray(v) for k, v in overrides.items()})
  return A.ViewParams(**base)


def test_apply_view_follows_decisions():
  img = jnp.asarray(np.random.default_rng(2).random((10, 10, 3)), jnp.float32)
  cfg = A.PRETEXT_VIEW2
  jitted = jax.jit(lambda p: A.apply_view(img, p, size=10, config=cfg))
  apply = lambda **kw: np.asarray(jitted(_plain_params(10, **kw)))
  np.testing.assert_allclose(apply(), img, atol=1e-6)  # nothing applied → identity crop
  np.testing.assert_allclose(apply(flip=True), img[:, ::-1], atol=1e-6)
  np.testing.assert_allclose(apply(solarize=True), np.where(img >= 0.5, 1 - img, img), atol=1e-6)
  g = apply(grayscale=True)
  np.testing.assert_allclose(g[..., 0], np.asarray(img) @ np.array([0.299, 0.587, 0.114]),
                             atol=1e-6)
  np.testing.assert_allclose(g[..., 0], g[..., 1])
  b = apply(jitter=True, jitter_factors=[1.3, 1.0, 1.0, 0.0])
  np.testing.assert_allclose(b, np.clip(1.3 * np.asarray(img), 0, 1), atol=1e-6)
  assert not np.allclose(apply(blur=True), img, atol=1e-3)


def test_color_ops_match_closed_forms():
  img = np.random.default_rng(4).random((6, 5, 3)).astype(np.float32)
  x = jnp.asarray(img)
  luma = img @ np.array([0.299, 0.587, 0.114])
  np.testing.assert_allclose(A.adjust_contrast(x, 0.7),
                             np.clip(0.7 * img + 0.3 * luma.mean(), 0, 1), atol=1e-6)
  np.testing.assert_allclose(A.adjust_saturation(x, 1.2),
                             np.clip(1.2 * img - 0.2 * luma[..., None], 0, 1), atol=1e-6)
  hue = jax.jit(A.adjust_hue)
  shifted = np.asarray(hue(x, 0.08))
  for (i, j) in [(0, 0), (2, 3), (5, 4)]:  # colorsys: an independent HSV implementation
    h, s, v = colorsys.rgb_to_hsv(*img[i, j])
    np.testing.assert_allclose(shifted[i, j], colorsys.hsv_to_rgb((h + 0.08) % 1.0, s, v),
                               atol=1e-5)
  np.testing.assert_allclose(hue(x, 0.0), img, atol=1e-5)
  # Random order: brightness then contrast differs from contrast then brightness.
  f = jnp.asarray([1.3, 0.5, 1.0, 0.0])
  jitter = jax.jit(A.apply_color_jitter)
  bc = jitter(x, f, jnp.asarray([0, 1, 2, 3]))
  cb = jitter(x, f, jnp.asarray([1, 0, 2, 3]))
  np.testing.assert_allclose(bc, A.adjust_contrast(A.adjust_brightness(x, 1.3), 0.5), atol=1e-6)
  np.testing.assert_allclose(cb, A.adjust_brightness(A.adjust_contrast(x, 0.5), 1.3), atol=1e-6)
  assert not np.allclose(bc, cb)


@pytest.mark.parametrize("sigma,kernel", [(0.7, 5), (1.6, 23)])
def test_gaussian_blur_matches_scipy(sigma, kernel):
  img = np.random.default_rng(5).random((16, 13, 3)).astype(np.float32)
  got = A.gaussian_blur(jnp.asarray(img), sigma, kernel)
  radius = A.blur_kernel_size(kernel, 13) // 2
  # scipy's 'mirror' is torch's 'reflect' padding.
  ref = scipy.ndimage.gaussian_filter(img.astype(np.float64), sigma=(sigma, sigma, 0),
                                      mode="mirror", radius=(radius, radius, 0))
  np.testing.assert_allclose(got, ref, atol=1e-5)
  assert A.blur_kernel_size(23, 8) == 15 and A.blur_kernel_size(23, 96) == 23
