"""Vision transformers (Dosovitskiy et al. 2021) in Flax linen, MAE/timm layout.

Pre-norm blocks ``x + attn(norm1(x))``, ``x + mlp(norm2(x))`` with LayerNorm ε = 1e-6,
exact (erf) GELU and a fused ``qkv`` projection, a class token and 2-D position
embeddings, a final LayerNorm. Module and parameter names follow the official MAE /
timm state dicts one-to-one, so :mod:`bissl_jax.convert.mae` only renames
``blocks_3`` ↔ ``blocks.3`` and ``kernel``/``scale`` ↔ ``weight``::

  patch_embed/proj/{kernel,bias}   cls_token   pos_embed   norm/{scale,bias}
  blocks_{i}/norm1, attn/qkv, attn/proj, norm2, mlp/fc1, mlp/fc2

Position embeddings are a parameter either way: ``posemb='learn'`` trains them,
``posemb='sincos'`` (MAE) initialises them to the fixed 2-D sin-cos table and keeps
them fixed (``stop_gradient`` in the forward, and ``Model.trainable`` marks them
frozen). LoRA adapters (:mod:`bissl_jax.models.lora`) sit inside the blocks.

Drop-path (stochastic depth) needs randomness, which is never taken from Flax's rng
collections: the caller passes ``drop_noise``, uniform draws of shape ``(B, depth, 2)``
(one per sample, block and residual branch; :func:`sample_drop_noise`), and a sample's
branch is dropped where its draw is ≥ the keep probability. Without ``drop_noise``
the network is deterministic, so a loss is a pure function of its inputs (the
Hessian of BiSSL's upper stage is taken on fixed inputs).
"""
import math
import re
from typing import Any, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from bissl_jax.models.lora import LoRAConfig, maybe_lora

LN_EPSILON = 1e-6
POSEMBS = ("sincos", "learn")

# (width, depth, heads) of the standard sizes; 'test' is a CPU-test toy.
SIZES = {
    "test": (16, 2, 2),
    "tiny": (192, 12, 3),
    "small": (384, 12, 6),
    "base": (768, 12, 12),
    "large": (1024, 24, 16),
    "huge": (1280, 32, 16),
}
_ARCH = re.compile(r"vit_(test|tiny|small|base|large|huge)_patch(\d+)")

dense_init = nn.initializers.xavier_uniform()   # MAE / the JAX ViT
token_init = nn.initializers.normal(0.02)
# Xavier on the flattened (p·p·C, D) patch projection, as MAE initialises it.
patch_init = nn.initializers.variance_scaling(1.0, "fan_avg", "uniform",
                                              in_axis=(0, 1, 2), out_axis=3)


def sincos_1d(dim: int, positions: np.ndarray) -> np.ndarray:
  """``[sin(p·ω), cos(p·ω)]`` with ``ω_k = 10000^(−k/(dim/2))``, shape ``(M, dim)``."""
  if dim % 2:
    raise ValueError(f"sin-cos embeddings need an even width; got {dim}.")
  omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
  out = np.outer(positions.reshape(-1).astype(np.float64), omega)
  return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def sincos_2d(dim: int, grid_size: int, class_token: bool = True) -> np.ndarray:
  """MAE's fixed 2-D table ``(1 + g², dim)`` (a zero row for the class token).

  The first half of the channels encodes the column, the second half the row, for
  patches in row-major order, exactly as MAE's ``get_2d_sincos_pos_embed``.
  """
  if dim % 4:
    raise ValueError(f"2-D sin-cos embeddings need a width divisible by 4; got {dim}.")
  rows, cols = np.meshgrid(np.arange(grid_size), np.arange(grid_size), indexing="ij")
  table = np.concatenate([sincos_1d(dim // 2, cols), sincos_1d(dim // 2, rows)], axis=1)
  if class_token:
    table = np.concatenate([np.zeros((1, dim)), table], axis=0)
  return table.astype(np.float32)


def grid_side(num_patches: int) -> int:
  side = int(round(math.sqrt(num_patches)))
  if side * side != num_patches:
    raise ValueError(f"Square patch grids only; got {num_patches} patches.")
  return side


def sincos_init(key, shape, dtype=jnp.float32):
  """Parameter initialiser giving :func:`sincos_2d` for a ``(1, 1 + g², D)`` shape."""
  del key
  return jnp.asarray(sincos_2d(shape[-1], grid_side(shape[1] - 1))[None], dtype)


def sample_drop_noise(rng: jax.Array, batch: int, depth: int) -> jax.Array:
  """Uniform ``(batch, depth, 2)`` draws for drop-path (see the module docstring)."""
  return jax.random.uniform(rng, (batch, depth, 2))


def drop_path(x, u, rate: float):
  """Per-sample stochastic depth: zero the branch where ``u ≥ 1 − rate``, scale the rest."""
  if u is None or rate <= 0.0:
    return x
  keep = 1.0 - rate
  mask = (u < keep).astype(x.dtype) / jnp.asarray(keep, x.dtype)
  return x * mask.reshape((-1,) + (1,) * (x.ndim - 1))


def layer_norm(name: str, dtype) -> nn.LayerNorm:
  return nn.LayerNorm(epsilon=LN_EPSILON, dtype=dtype, name=name)


class Attention(nn.Module):
  """Multi-head self-attention with a fused qkv projection (timm ``Attention``)."""
  num_heads: int
  lora: Optional[LoRAConfig] = None
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    batch, length, width = x.shape
    if width % self.num_heads:
      raise ValueError(f"width {width} is not divisible by num_heads={self.num_heads}.")
    head_dim = width // self.num_heads
    qkv = nn.Dense(3 * width, kernel_init=dense_init, dtype=self.dtype, name="qkv")(x)
    q, k, v = jnp.split(qkv, 3, axis=-1)
    q = q + maybe_lora(self.lora, "q", width, x, self.dtype)
    k = k + maybe_lora(self.lora, "k", width, x, self.dtype)
    v = v + maybe_lora(self.lora, "v", width, x, self.dtype)
    heads = lambda t: t.reshape(batch, length, self.num_heads, head_dim)
    logits = jnp.einsum("bqhd,bkhd->bhqk", heads(q), heads(k)) / math.sqrt(head_dim)
    weights = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(self.dtype)
    out = jnp.einsum("bhqk,bkhd->bqhd", weights, heads(v)).reshape(batch, length, width)
    y = nn.Dense(width, kernel_init=dense_init, dtype=self.dtype, name="proj")(out)
    return y + maybe_lora(self.lora, "proj", width, out, self.dtype)


class Mlp(nn.Module):
  """fc1 → exact GELU → fc2 (timm ``Mlp``)."""
  hidden: int
  lora: Optional[LoRAConfig] = None
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    width = x.shape[-1]
    h = nn.Dense(self.hidden, kernel_init=dense_init, dtype=self.dtype, name="fc1")(x)
    h = nn.gelu(h + maybe_lora(self.lora, "fc1", self.hidden, x, self.dtype),
                approximate=False)
    y = nn.Dense(width, kernel_init=dense_init, dtype=self.dtype, name="fc2")(h)
    return y + maybe_lora(self.lora, "fc2", width, h, self.dtype)


class Block(nn.Module):
  """Pre-norm transformer block with drop-path on both residual branches.

  ``drop_u`` is None (deterministic) or the ``(B, 2)`` uniforms of this block.
  """
  num_heads: int
  mlp_ratio: float = 4.0
  drop_path_rate: float = 0.0
  lora: Optional[LoRAConfig] = None
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, drop_u=None):
    width = x.shape[-1]
    u1 = None if drop_u is None else drop_u[:, 0]
    u2 = None if drop_u is None else drop_u[:, 1]
    y = Attention(self.num_heads, self.lora, self.dtype, name="attn")(
        layer_norm("norm1", self.dtype)(x))
    x = x + drop_path(y, u1, self.drop_path_rate)
    y = Mlp(int(width * self.mlp_ratio), self.lora, self.dtype, name="mlp")(
        layer_norm("norm2", self.dtype)(x))
    return x + drop_path(y, u2, self.drop_path_rate)


def block_stack(x, *, depth: int, num_heads: int, mlp_ratio: float, drop_path_rate: float,
                lora: Optional[LoRAConfig], dtype, remat: bool, prefix: str,
                drop_noise=None):
  """``depth`` blocks named ``{prefix}{i}``; drop rates rise linearly 0 → rate (timm)."""
  block_cls = nn.remat(Block) if remat else Block
  rates = np.linspace(0.0, drop_path_rate, depth)
  for i in range(depth):
    u = None if drop_noise is None else drop_noise[:, i]
    x = block_cls(num_heads, mlp_ratio, float(rates[i]), lora, dtype,
                  name=f"{prefix}{i}")(x, u)
  return x


class PatchEmbed(nn.Module):
  """Non-overlapping p×p patches → width (a stride-p convolution named ``proj``)."""
  patch_size: int
  width: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, images):
    p = self.patch_size
    x = nn.Conv(self.width, (p, p), strides=(p, p), padding="VALID", kernel_init=patch_init,
                dtype=self.dtype, name="proj")(images.astype(self.dtype))
    return x.reshape(x.shape[0], -1, self.width)   # row-major (h, w), as torch flatten(2)


class ViT(nn.Module):
  """The ViT encoder; returns the normalised token sequence ``(B, 1 + n, width)``.

  Attributes:
    patch_size: side of the square patches (16 or 14 for the standard models).
    width, depth, num_heads, mlp_ratio: the transformer's size.
    posemb: ``'sincos'`` (fixed, MAE) or ``'learn'``.
    drop_path_rate: stochastic depth of the last block (linear from 0).
    remat: recompute each block in the backward pass (``nn.remat``): activation memory
      of one block instead of all, for about one extra forward.
    lora: adapters in every block, or None.
    dtype: compute dtype (e.g. ``jnp.bfloat16``); parameters are float32.
  """
  patch_size: int = 16
  width: int = 768
  depth: int = 12
  num_heads: int = 12
  mlp_ratio: float = 4.0
  posemb: str = "sincos"
  drop_path_rate: float = 0.0
  remat: bool = False
  lora: Optional[LoRAConfig] = None
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, images, *, keep_ids=None, drop_noise=None):
    """Encodes NHWC images.

    Args:
      images: ``(B, H, W, C)`` float, H and W multiples of ``patch_size``.
      keep_ids: optional ``(B, n)`` int indices of the patches to keep (MAE: the
        visible ones); all patches when None.
      drop_noise: optional ``(B, depth, 2)`` drop-path uniforms; None = no drop-path.

    Returns:
      ``(B, 1 + n, width)``: the class token, then the kept patch tokens.
    """
    if self.posemb not in POSEMBS:
      raise ValueError(f"posemb must be one of {POSEMBS}; got {self.posemb!r}.")
    p = self.patch_size
    if images.shape[1] % p or images.shape[2] % p:
      raise ValueError(f"Image size {images.shape[1:3]} is not a multiple of the patch "
                       f"size {p}; resize the inputs or change patch_size.")
    x = PatchEmbed(p, self.width, self.dtype, name="patch_embed")(images)
    batch, num_patches = x.shape[0], x.shape[1]
    cls = self.param("cls_token", token_init, (1, 1, self.width))
    pos_init = sincos_init if self.posemb == "sincos" else token_init
    pos = self.param("pos_embed", pos_init, (1, num_patches + 1, self.width))
    if self.posemb == "sincos":
      pos = jax.lax.stop_gradient(pos)
    pos = pos.astype(self.dtype)
    x = x + pos[:, 1:]
    if keep_ids is not None:
      x = jnp.take_along_axis(x, keep_ids[..., None].astype(jnp.int32), axis=1)
    cls = jnp.broadcast_to((cls.astype(self.dtype) + pos[:, :1]), (batch, 1, self.width))
    x = jnp.concatenate([cls, x], axis=1)
    x = block_stack(x, depth=self.depth, num_heads=self.num_heads, mlp_ratio=self.mlp_ratio,
                    drop_path_rate=self.drop_path_rate, lora=self.lora, dtype=self.dtype,
                    remat=self.remat, prefix="blocks_", drop_noise=drop_noise)
    return layer_norm("norm", self.dtype)(x)


def parse_arch(arch: str) -> Tuple[str, int]:
  """``'vit_base_patch16'`` → ``('base', 16)``."""
  m = _ARCH.fullmatch(str(arch))
  if not m:
    raise ValueError(f"Unknown ViT arch {arch!r}; use vit_{{{'|'.join(SIZES)}}}_patch{{P}}, "
                     "e.g. 'vit_base_patch16' or 'vit_huge_patch14'.")
  return m.group(1), int(m.group(2))


def build_vit(arch: str, **kwargs) -> ViT:
  """A :class:`ViT` by name (``'vit_base_patch16'``, ``'vit_test_patch4'``, ...).

  Args:
    arch: ``vit_{test,tiny,small,base,large,huge}_patch{P}``.
    **kwargs: further :class:`ViT` fields (posemb, drop_path_rate, remat, lora, dtype).
  """
  size, patch = parse_arch(arch)
  width, depth, heads = SIZES[size]
  return ViT(patch_size=patch, width=width, depth=depth, num_heads=heads, **kwargs)
