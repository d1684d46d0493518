"""RoIAlign (He et al., Mask R-CNN) as detectron2's ``ROIAlign(aligned=True)`` (``ROIAlignV2``).

For a box ``(x1, y1, x2, y2)`` in image pixels and ``spatial_scale`` s, the region on
the feature map starts at ``x1·s - 0.5`` (``aligned=True``: feature pixel centres sit
at half-integers) and is ``(x2 - x1)·s`` wide. It is cut into ``output_size²`` bins;
each bin averages bilinear samples of the features on a regular ``g_y × g_x`` grid at
the centres of its sub-cells. Bilinear sampling follows torchvision's kernel: a point
with ``y < -1`` or ``y > H`` (likewise x) contributes 0; otherwise coordinates are
clamped to ``[0, H-1]`` before interpolating, so boxes that cross the border see the
edge values.

Sampling grid: ``sampling_ratio > 0`` uses ``g = sampling_ratio`` per axis for every
box. ``sampling_ratio = 0`` (detectron2's default for C4 models) is adaptive:
``g_y = ceil(roi_height / output_size)`` per box and per axis, a data-dependent count.
Here the adaptive count is computed per box too, but it is capped at the static
``ceil(H / output_size)`` (likewise W) so shapes stay fixed: a box no taller than
the feature map (every clipped proposal and ground-truth box) is sampled exactly as
detectron2 does; a taller one gets fewer, still evenly spread, samples.

Because the sample grid of a box is a product of a y-grid and an x-grid, bilinear
interpolation followed by bin averaging is separable: the output is
``A_y · F · A_xᵀ`` with ``A_y (output_size, H)`` and ``A_x (output_size, W)``
interpolation matrices, computed per box and applied with one einsum (exact, not an
approximation; it is also differentiable in the features).
"""
import math

import jax
import jax.numpy as jnp


def _axis_weights(start, length, size: int, output_size: int, sampling_ratio: int,
                  max_grid: int):
  """Bin-averaged bilinear weights ``(R, output_size, size)`` along one axis.

  Args:
    start, length: ``(R,)`` region start (feature coordinates) and length.
    size: the feature map's extent along this axis.
    output_size: bins along this axis.
    sampling_ratio: fixed samples per bin, or 0 for adaptive.
    max_grid: static number of sample slots per bin.
  """
  bin_len = length / output_size
  if sampling_ratio > 0:
    grid = jnp.full_like(length, float(sampling_ratio))
  else:
    grid = jnp.clip(jnp.ceil(length / output_size), 0.0, float(max_grid))
  slot = jnp.arange(max_grid, dtype=length.dtype)
  bins = jnp.arange(output_size, dtype=length.dtype)
  # Sample positions (R, output_size, max_grid); slots beyond the grid get weight 0.
  pos = (start[:, None, None] + bins[None, :, None] * bin_len[:, None, None]
         + (slot[None, None, :] + 0.5) * (bin_len / jnp.maximum(grid, 1.0))[:, None, None])
  used = slot[None, None, :] < grid[:, None, None]
  inside = (pos >= -1.0) & (pos <= size)
  p = jnp.clip(pos, 0.0, None)
  low = jnp.floor(p)
  at_edge = low >= size - 1
  low = jnp.where(at_edge, size - 1, low)
  p = jnp.where(at_edge, low, p)
  frac = p - low
  high = jnp.minimum(low + 1, size - 1)
  cells = jnp.arange(size, dtype=length.dtype)
  w = ((1.0 - frac)[..., None] * (cells == low[..., None])
       + frac[..., None] * (cells == high[..., None]))
  w = w * (used & inside)[..., None]
  # Mean over the grid: count = max(g, 1) samples per axis (torchvision's max(gy·gx, 1)).
  return jnp.sum(w, axis=2) / jnp.maximum(grid, 1.0)[:, None, None]


def roi_align(features: jax.Array, boxes: jax.Array, output_size: int,
              spatial_scale: float, sampling_ratio: int = 0,
              aligned: bool = True) -> jax.Array:
  """Pools a fixed-size feature patch for every box.

  Args:
    features: ``(N, H, W, C)`` feature maps (NHWC).
    boxes: ``(N, R, 4)`` boxes ``(x1, y1, x2, y2)`` per image, in the input image's
      pixel coordinates (padded boxes are pooled too; mask them downstream).
    output_size: side of the pooled patch (14 for detectron2's C4 box head).
    spatial_scale: feature-map pixels per image pixel (1/16 on C4).
    sampling_ratio: samples per bin and axis; 0 is detectron2's adaptive grid (see
      the module docstring for its static cap).
    aligned: shift by half a feature pixel (detectron2 ``ROIAlignV2``). ``False`` is
      the original RoIAlign, which also widens regions to at least one pixel.

  Returns:
    ``(N, R, output_size, output_size, C)`` pooled features.
  """
  features, boxes = jnp.asarray(features), jnp.asarray(boxes)
  if sampling_ratio < 0:
    raise ValueError(f"sampling_ratio={sampling_ratio} must be >= 0 (0 = adaptive).")
  if features.ndim != 4 or boxes.ndim != 3 or boxes.shape[-1] != 4 \
      or boxes.shape[0] != features.shape[0]:
    raise ValueError(f"roi_align takes features (N, H, W, C) and boxes (N, R, 4) with the "
                     f"same N; got features {features.shape} and boxes {boxes.shape}.")
  _, height, width, _ = features.shape
  offset = 0.5 if aligned else 0.0

  def one_image(fmap, img_boxes):
    scaled = img_boxes * spatial_scale
    x0, y0 = scaled[:, 0] - offset, scaled[:, 1] - offset
    w, h = scaled[:, 2] - scaled[:, 0], scaled[:, 3] - scaled[:, 1]
    if not aligned:
      w, h = jnp.maximum(w, 1.0), jnp.maximum(h, 1.0)
    grid_y = sampling_ratio or math.ceil(height / output_size)
    grid_x = sampling_ratio or math.ceil(width / output_size)
    ay = _axis_weights(y0, h, height, output_size, sampling_ratio, grid_y)
    ax = _axis_weights(x0, w, width, output_size, sampling_ratio, grid_x)
    return jnp.einsum("rph,hwc,rqw->rpqc", ay.astype(fmap.dtype), fmap,
                      ax.astype(fmap.dtype))

  return jax.vmap(one_image)(features, boxes)
