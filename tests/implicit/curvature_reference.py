"""Small models and NumPy pieces shared by the K-FAC and EK-FAC tests (built by hand)."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np


class TwoLayerMLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    h = jnp.tanh(nn.Dense(5, name="fc1")(x))
    return nn.Dense(3, name="fc2")(h)


class SmallConv(nn.Module):
  @nn.compact
  def __call__(self, x):
    s = nn.Conv(3, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)), name="conv")(x)
    return s.mean(axis=(1, 2))


def random_vector(params, seed):
  leaves, tdef = jax.tree_util.tree_flatten(params)
  keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
  return jax.tree_util.tree_unflatten(
      tdef, [jax.random.normal(k, l.shape) for k, l in zip(keys, leaves)])


def with_ones(a):
  """The inputs with a column of ones: the bias as one more input."""
  return np.concatenate([a, np.ones(a.shape[:-1] + (1,))], axis=-1)


def patches(x, k=3, stride=2, pad=1):
  """im2col by hand: per (example, output position) the (kh, kw, c_in) patch."""
  xp = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  n, hp, wp, _ = xp.shape
  ho, wo = (hp - k) // stride + 1, (wp - k) // stride + 1
  rows = [xp[i, r * stride:r * stride + k, c * stride:c * stride + k, :].ravel()
          for i in range(n) for r in range(ho) for c in range(wo)]
  return np.array(rows), ho * wo


def conv_problem(n):
  """SmallConv on ``n`` random 5×5×2 inputs with a squared loss, and by hand its patches
  ``a`` (rows = examples × positions) and the output gradient ``g`` of the spatial
  mean, (pooled − y)/N/positions at every position.

  Returns ``(params, loss, a, positions, g)``.
  """
  rng = np.random.default_rng(1)
  x, y = rng.normal(size=(n, 5, 5, 2)), rng.normal(size=(n, 3))
  model = SmallConv()
  params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 5, 5, 2)))["params"]
  loss = lambda p: 0.5 * jnp.mean(jnp.sum((model.apply({"params": p}, x) - y) ** 2, -1))
  a, positions = patches(x)
  kernel = np.asarray(params["conv"]["kernel"], np.float64)
  pooled = (a @ kernel.reshape(-1, 3)).reshape(n, positions, 3).mean(1) + np.asarray(
      params["conv"]["bias"])
  g = np.repeat((pooled - y) / n / positions, positions, axis=0)
  return params, loss, a, positions, g
