"""K-FAC's Kronecker factors of a Flax model's loss, read off one forward/backward pass.

For every ``nn.Dense`` and ``nn.Conv`` call whose kernel is a leaf of ``params`` it
records the layer input ``a`` and the gradient ``g = ∂L/∂s`` of the loss with respect
to the layer output ``s``, and returns per layer

    A = mean over rows of ã ãᵀ,      G = N · Σ_rows g gᵀ,

with ``ã = [a; 1]`` when the layer's bias is a leaf of ``params`` too, a *row* one
example at one position (a token, a spatial output position), and ``N`` the number of
examples (the leading axis of the input, summed over the calls of a layer). With a
loss that is the mean over the N examples, ``N·g`` is one example's own output
gradient, so ``A ⊗ G`` is the empirical Fisher of the layer's weights under K-FAC's
independence assumption (Martens & Grosse 2015). For a convolution ``a`` is the im2col
patch of one output position (Grosse & Martens 2016, KFC: rows are examples ×
positions); a dense layer applied to tokens (an attention projection, an MLP of a ViT
block) is treated the same way, positions being the tokens.

How: ``flax.linen.intercept_methods`` wraps every ``Dense``/``Conv`` ``__call__``. A
first, abstract pass (``jax.eval_shape``) finds which calls own a leaf of ``params``
(by object identity of the kernel the module reads); the second pass adds a zero
"probe" to each such output and differentiates the loss with respect to the probes,
which gives the output gradients, while the intercepted inputs come back as ``aux``.

Not captured (no block; :mod:`bissl_jax.implicit.solvers.kfac` leaves them to its
fallback): ``DenseGeneral``, ``Embed``, grouped, circular or non-2D convolutions,
BatchNorm/LayerNorm scales, parameters a module reads with ``self.param`` outside a
``Dense``/``Conv`` (LoRA adapters, tokens, position embeddings), layers whose
kernel is frozen (not a leaf of ``params``), and layers inside a lifted transform that
re-traces its parameters (``nn.remat``, ``nn.scan``: the kernel the module reads is
then not the leaf itself; keep ``config.model.remat=False`` with K-FAC) or runs under an
inner ``vmap`` (GeSSL's per-task losses: its inputs cannot leave that trace).
"""
from typing import Callable, List, NamedTuple, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from bissl_jax.types import PyTree

_HIGHEST = lax.Precision.HIGHEST


class LayerCall(NamedTuple):
  """One captured call of a Dense/Conv layer (static).

  Attributes:
    kernel: index of its kernel among ``tree_leaves(params)``.
    bias: index of its bias, or None (no bias, or a frozen one).
    conv: None for a dense layer; for a convolution ``(kernel_size, strides, padding,
      kernel_dilation, input_dilation)`` as ``lax`` takes them.
  """
  kernel: int
  bias: Optional[int]
  conv: Optional[tuple]


def _conv_geometry(module: nn.Conv, x) -> Optional[tuple]:
  """The convolution's lax geometry, or None if K-FAC here has no block for it."""
  kernel_size = tuple(module.kernel_size)
  rank = len(kernel_size)
  if rank != 2 or x.ndim != 4 or module.feature_group_count != 1:
    return None
  padding = module.padding
  if isinstance(padding, str) and padding not in ("SAME", "VALID"):
    return None   # CIRCULAR / CAUSAL pad by hand in flax
  padding = nn.linear.canonicalize_padding(padding, rank)
  if not isinstance(padding, str):   # hashable: the geometry is a pytree's static data
    padding = tuple(tuple(int(p) for p in pair) for pair in padding)
  expand = lambda v: (1,) * rank if v is None else ((v,) * rank if isinstance(v, int)
                                                    else tuple(v))
  return (kernel_size, expand(module.strides), padding, expand(module.kernel_dilation),
          expand(module.input_dilation))


def _param_index(module: nn.Module, name: str, ids: dict) -> Optional[int]:
  params = module.variables.get("params", {})
  return ids.get(id(params[name])) if name in params else None


def _outside_transforms(x, kernel) -> bool:
  """Whether the layer runs at the loss's own trace level: an input traced by an inner
  transform (a ``vmap`` over tasks, as GeSSL's) cannot be handed out of it."""
  if not isinstance(x, jax.core.Tracer):
    return True
  return getattr(x, "_trace", None) is getattr(kernel, "_trace", object())


def _is_layer(context) -> bool:
  return context.method_name == "__call__" and type(context.module) in (nn.Dense, nn.Conv)


def discover(loss_fn: Callable[[PyTree], jnp.ndarray], params: PyTree
             ) -> List[Optional[LayerCall]]:
  """Every Dense/Conv call of ``loss_fn(params)`` in order: a :class:`LayerCall` where
  its kernel is a leaf of ``params`` and K-FAC has a block for it, else None."""
  calls: List[Optional[LayerCall]] = []

  def traced(p):
    ids = {id(leaf): i for i, leaf in enumerate(jax.tree_util.tree_leaves(p))}

    def interceptor(next_fun, args, kwargs, context):
      if _is_layer(context):
        module, x = context.module, args[0]
        kernel = _param_index(module, "kernel", ids)
        conv = _conv_geometry(module, x) if isinstance(module, nn.Conv) else None
        supported = ((isinstance(module, nn.Dense) or conv is not None) and kernel is not None
                     and _outside_transforms(x, module.variables["params"]["kernel"]))
        calls.append(LayerCall(kernel, _param_index(module, "bias", ids), conv)
                     if kernel is not None and supported and x.ndim >= 2 else None)
      return next_fun(*args, **kwargs)

    with nn.intercept_methods(interceptor):
      return loss_fn(p)

  jax.eval_shape(traced, params)
  return calls


def _rows(call: LayerCall, x: jnp.ndarray) -> jnp.ndarray:
  """The layer's input rows ``a`` (examples × positions, features), float32; for a
  convolution its im2col patches, features ordered like the kernel's (kh, kw, c_in)."""
  x = x.astype(jnp.float32)
  if call.conv is None:
    return x.reshape(-1, x.shape[-1])
  kernel_size, strides, padding, kernel_dilation, input_dilation = call.conv
  patches = lax.conv_general_dilated_patches(
      x, kernel_size, strides, padding, lhs_dilation=input_dilation,
      rhs_dilation=kernel_dilation, dimension_numbers=("NHWC", "HWIO", "NHWC"),
      precision=_HIGHEST)
  # lax orders a patch's features (c_in, kh, kw); the flax kernel is (kh, kw, c_in, c_out).
  c_in = x.shape[-1]
  patches = patches.reshape(patches.shape[:-1] + (c_in,) + tuple(kernel_size))
  patches = jnp.moveaxis(patches, -3, -1)
  return patches.reshape(-1, c_in * kernel_size[0] * kernel_size[1])


def captured_rows(loss_fn: Callable[[PyTree], jnp.ndarray], params: PyTree,
                  calls: List[Optional[LayerCall]]) -> List[Tuple[jnp.ndarray, jnp.ndarray, int]]:
  """Per captured call (in order, None calls skipped): ``(a rows, g rows, N)``."""
  blocks = [i for i, call in enumerate(calls) if call is not None]

  def loss_of_probes(probes):
    inputs, position = {}, [0]

    def interceptor(next_fun, args, kwargs, context):
      if not _is_layer(context):
        return next_fun(*args, **kwargs)
      k = position[0]
      position[0] += 1
      out = next_fun(*args, **kwargs)
      if k in probes:
        inputs[k] = args[0]
        out = out + probes[k].astype(out.dtype)
      return out

    with nn.intercept_methods(interceptor):
      loss = loss_fn(params)
    return loss, inputs

  out_shapes = _output_shapes(loss_fn, params, blocks)
  probes = {k: jnp.zeros(out_shapes[k], jnp.float32) for k in blocks}
  grads, inputs = jax.grad(loss_of_probes, has_aux=True)(probes)
  out = []
  for k in blocks:
    x, g = inputs[k], grads[k].astype(jnp.float32)
    out.append((_rows(calls[k], x), g.reshape(-1, g.shape[-1]), x.shape[0]))
  return out


def _output_shapes(loss_fn, params, blocks) -> dict:
  """The output shape of each captured call (an abstract pass)."""
  shapes = {}

  def traced(p):
    position = [0]

    def interceptor(next_fun, args, kwargs, context):
      if not _is_layer(context):
        return next_fun(*args, **kwargs)
      out = next_fun(*args, **kwargs)
      if position[0] in blocks:
        shapes[position[0]] = out.shape
      position[0] += 1
      return out

    with nn.intercept_methods(interceptor):
      return loss_fn(p)

  jax.eval_shape(traced, params)
  return shapes


def kronecker_factors(loss_fn: Callable[[PyTree], jnp.ndarray], params: PyTree
                      ) -> Tuple[List[LayerCall], List[jnp.ndarray], List[jnp.ndarray]]:
  """Per layer (calls of one layer merged): its :class:`LayerCall` (of the first call),
  ``A`` and ``G`` as in the module docstring, float32."""
  calls = discover(loss_fn, params)
  return factors_from_rows(calls, captured_rows(loss_fn, params, calls))


def with_bias_column(call: LayerCall, a: jnp.ndarray) -> jnp.ndarray:
  """``ã``: the rows with a 1 appended when the layer's bias is a leaf of ``params``."""
  if call.bias is None:
    return a
  return jnp.concatenate([a, jnp.ones((a.shape[0], 1), a.dtype)], axis=1)


def factors_from_rows(calls: List[Optional[LayerCall]], rows
                      ) -> Tuple[List[LayerCall], List[jnp.ndarray], List[jnp.ndarray]]:
  """:func:`kronecker_factors` from :func:`captured_rows`'s output (one pass, reused)."""
  merged = {}   # kernel leaf -> [call, Σ ãᵀã, number of rows, Σ gᵀg, N]
  for call, (a, g, n) in zip([c for c in calls if c is not None], rows):
    a = with_bias_column(call, a)
    entry = merged.setdefault(call.kernel, [call, 0.0, 0, 0.0, 0])
    entry[1] = entry[1] + jnp.matmul(a.T, a, precision=_HIGHEST)
    entry[2] += a.shape[0]
    entry[3] = entry[3] + jnp.matmul(g.T, g, precision=_HIGHEST)
    entry[4] += n
  layers = [merged[k] for k in sorted(merged)]
  return ([e[0] for e in layers], [e[1] / e[2] for e in layers],
          [e[3] * e[4] for e in layers])
