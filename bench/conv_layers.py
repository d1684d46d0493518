"""Each convolution of ResNet-18 alone: its gradient under XLA's kernels and PyTorch's.

Part of ``bench/cpu_conv.py`` (docs/benchmarks/cpu_conv.md): the network's pretext gradient
there is slower than PyTorch's, and this splits the convolutions' share of it by layer
shape (stem, the four stages, the 1×1 downsampling convolutions), each timed as
``∇_{x,w} sum(conv(x, w)²)`` (the forward and both backward convolutions) in the
default and the fast-kernel workers (NHWC) and the PyTorch worker (NCHW).
"""
from typing import List

import numpy as np

from bench import common


# Calls per timed layer sample: one layer's gradient takes milliseconds, about as long
# as a round trip to the worker, which would otherwise be part of every sample.
LAYER_CALLS = 10


def network_layers(size) -> List[tuple]:
  """ResNet-18's distinct convolutions (CIFAR stem): (name, c_in, c_out, px, stride, k, count)."""
  c, s = int(round(64 * size.width)), size.image_size
  out = [("stem 3×3", 3, c, s, 1, 3, 1), (f"3×3 {c}→{c}", c, c, s, 1, 3, 4)]
  for i in range(1, 4):
    cin, cout, px = c * 2 ** (i - 1), c * 2 ** i, s // 2 ** (i - 1)
    out += [(f"3×3 {cin}→{cout} /2", cin, cout, px, 2, 3, 1),
            (f"1×1 {cin}→{cout} /2", cin, cout, px, 2, 1, 1),
            (f"3×3 {cout}→{cout}", cout, cout, px // 2, 1, 3, 3)]
  return out


def jax_contenders(jax, jnp, size, seed):
  """Every distinct convolution's gradient (input and kernel) at the network's shapes."""
  b, key, out = 2 * size.pretext_batch, jax.random.PRNGKey(seed), {}
  for name, cin, cout, px, stride, k, _ in network_layers(size):
    x = jax.random.normal(key, (b, px, px, cin))
    w = jax.random.normal(jax.random.fold_in(key, 1), (k, k, cin, cout)) * 0.05
    pad = (k - 1) // 2

    def f(x, w, stride=stride, pad=pad):
      y = jax.lax.conv_general_dilated(x, w, (stride, stride), ((pad, pad), (pad, pad)),
                                       dimension_numbers=("NHWC", "HWIO", "NHWC"))
      return jnp.sum(y ** 2)
    g = jax.jit(jax.grad(f, argnums=(0, 1)))
    out[f"layer {name}"] = lambda g=g, x=x, w=w: [g(x, w) for _ in range(LAYER_CALLS)]
  return out


def torch_contenders(torch, size):
  b, out = 2 * size.pretext_batch, {}
  for name, cin, cout, px, stride, k, _ in network_layers(size):
    x = torch.randn(b, cin, px, px, requires_grad=True)
    w = (torch.randn(cout, cin, k, k) * 0.05).requires_grad_()

    def g(x=x, w=w, stride=stride, pad=(k - 1) // 2):
      for _ in range(LAYER_CALLS):
        y = torch.nn.functional.conv2d(x, w, stride=stride, padding=pad)
        grads = torch.autograd.grad((y ** 2).sum(), (x, w))
      return grads
    out[f"layer {name}"] = g
  return out


def table(block, fast: str, size) -> common.Table:
  """Each distinct convolution's gradient: default kernels, the fast ones, PyTorch."""
  rows, totals = [], {"default": 0.0, fast: 0.0, "PyTorch": 0.0}
  for name, cin, cout, px, stride, k, count in network_layers(size):
    t = {w: np.asarray(block[(w, f"layer {name}")]) / LAYER_CALLS for w in totals}
    for w in totals:
      totals[w] += count * common.median(t[w])
    rows.append([f"{name} @{px} px", count, 1e3 * common.median(t["default"]),
                 1e3 * common.median(t[fast]), 1e3 * common.median(t["PyTorch"]),
                 common.paired_ratio(t[fast], t["PyTorch"])])
  rows.append(["network (count × median)", 20, 1e3 * totals["default"], 1e3 * totals[fast],
               1e3 * totals["PyTorch"], totals[fast] / totals["PyTorch"]])
  return common.Table(
      title=f"Each convolution of the network: gradient (input and kernel) in ms, batch "
            f"{2 * size.pretext_batch}",
      columns=["convolution", "count", "default ms", "fast kernels ms", "PyTorch ms",
               "fast / PyTorch"],
      rows=rows,
      notes=[f"'fast kernels' is the option '{fast}' (the library's cpu_kernels='fast'), "
             "timed in its own rounds beside the default and PyTorch; each entry is the "
             "forward convolution and both of its backward convolutions of "
             f"sum(conv(x, w)²), NHWC for XLA, NCHW for PyTorch, per call (each sample "
             f"times {LAYER_CALLS} calls in a row)."])
