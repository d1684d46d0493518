"""Downstream heads φ_D, owned by the downstream tasks that apply them.

A downstream task initialises its head from the backbone's outputs and applies it
itself (:meth:`bissl_jax.core.protocols.DownstreamTask.init_head`), so a new task
with its own head (a detector's RPN and box head, a segmentation decoder) changes no
model. The linear classifier here is the head of image classification; its
initialisation follows the backbone family's reference code, a task setting:

* ``'torch_linear'``: PyTorch's ``nn.Linear`` default, U(±1/√fan_in) on the weight
  and (as everywhere in this library) a zero bias; the ResNets' reference (BiSSL
  paper §4.2.1 trains torchvision ResNets).
* ``'trunc_normal'``: truncated normal with standard deviation 0.02 and zero bias,
  as MAE and BiSSLight initialise a ViT's classifier.
"""
import flax.linen as nn
import jax
import jax.numpy as jnp

HEAD_INITS = {
    "torch_linear": nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform"),
    "trunc_normal": nn.initializers.truncated_normal(0.02),
}


def pool_features(feats: jax.Array) -> jax.Array:
  """Pooled features ``(B, C)``: a feature map ``(B, H, W, C)`` (the backbone's output
  when its boundary moved) is averaged over space; vectors pass unchanged."""
  return jnp.mean(feats, axis=(1, 2)) if feats.ndim == 4 else feats


class LinearHead(nn.Module):
  """One Dense layer named ``dense`` (the parameter tree ``{'dense': {kernel, bias}}``).

  Attributes:
    num_classes: outputs.
    initializer: a key of :data:`HEAD_INITS`.
  """
  num_classes: int
  initializer: str = "torch_linear"

  @nn.compact
  def __call__(self, x):
    if self.initializer not in HEAD_INITS:
      raise ValueError(f"Unknown head initializer {self.initializer!r}; use one of "
                       f"{sorted(HEAD_INITS)}.")
    return nn.Dense(self.num_classes, kernel_init=HEAD_INITS[self.initializer],
                    name="dense")(x)
