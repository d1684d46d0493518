"""The XLA:CPU loop cliff: conv-net derivatives inside lax loops vs unrolled (docs/implicit_grad.md).

A small conv net (three 3×3 stride-2 convolutions, ReLU, global pool, a linear layer;
softmax cross-entropy on the digits) is differentiated in straight-line code and
inside ``lax.fori_loop``/``lax.while_loop`` bodies, the same arithmetic either way:

* forward loss, gradient and Hessian-vector product: ``n`` dependent evaluations,
  unrolled vs in a ``fori_loop`` (with ``n = 1`` the loop runs one iteration);
* ``solvers.cg.cg`` with ``unroll=True`` vs its ``while_loop`` driver, and
  ``solvers.layerwise_cg.layerwise_cg`` unrolled vs its ``fori_loop`` driver, on ``A = I + H/(λ+δ)``.

The ratio looped/unrolled is the cliff; on CPU the library unrolls fixed-iteration
loops by default for this reason. Run it on a GPU to see the loops cost nothing there.

Run: ``python -m bench.loop_cliff --small`` (add ``--no-record`` to only print).
"""
import functools
from typing import List, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from bench import common
from bissl_jax.tasks import augment
from bissl_jax import implicit
from bissl_jax.implicit import tree_math as tm

LAM, DAMPING = 1e-3, 10.0


class SmallConvNet(nn.Module):
  """Three 3×3 stride-2 convolutions with ReLU, global average pool, linear classifier."""
  widths: Sequence[int]
  num_classes: int = common.NUM_CLASSES

  @nn.compact
  def __call__(self, x):
    for w in self.widths:
      x = nn.relu(nn.Conv(w, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))(x))
    return nn.Dense(self.num_classes)(jnp.mean(x, axis=(1, 2)))


def add_arguments(parser) -> None:
  parser.add_argument("--iters", type=int, default=None,
                      help="loop iterations / CG iterations (default 5; 2 at --tiny).")


def looped(body, init, count: int, unrolled: bool):
  """``count`` applications of ``body`` to ``init``: a Python loop or a ``fori_loop``."""
  if unrolled:
    for _ in range(count):
      init = body(init)
    return init
  return jax.lax.fori_loop(0, count, lambda _, carry: body(carry), init)


def main(argv: Optional[Sequence[str]] = None) -> List[common.Table]:
  """Runs the benchmark; returns (and prints, and records) its table."""
  args = common.parse_args(argv, __doc__, add_arguments)
  size, tiny = args.size, args.base_size == "tiny"
  iters = args.iters or (2 if tiny else 5)
  widths = tuple(max(1, int(round(64 * size.width * m))) for m in (1, 2, 4))
  net = SmallConvNet(widths)
  images, labels = common.sample_batch(np.random.default_rng(args.seed),
                                       common.image_pool(size), (size.downstream_batch,))
  x = augment.normalize(augment.to_float_rgb(jnp.asarray(images)))
  params = net.init(jax.random.PRNGKey(args.seed), x[:1])["params"]

  def loss(p):
    logits = net.apply({"params": p}, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

  grad = jax.grad(loss)
  tangent = tm.tree_scale(params, 1.0 / tm.tree_norm(params))
  step = 1e-3  # keeps the chained iterates next to the start point

  def forward_chain(p, unrolled):
    body = lambda acc: acc + loss(tm.tree_scale(p, 1.0 + step * acc))
    return looped(body, jnp.zeros(()), iters, unrolled)

  def grad_chain(p, unrolled):
    return looped(lambda g: grad(tm.tree_axpy(-step, g, p)), tm.tree_zeros_like(p), iters,
                  unrolled)

  def hvp_chain(p, v, unrolled):
    hess = lambda t: implicit.hvp(loss, p, t)
    return looped(lambda t: tm.tree_axpy(step, hess(t), t), v, iters, unrolled)

  def solve(p, v, solver, unrolled):
    return implicit.implicit_grad(loss, p, v, lam=LAM, damping=DAMPING, solver=solver,
                                  maxiter=iters, hessian_mode="jvp", unroll=unrolled)[0]

  pairs = {
      f"forward loss ×{iters}": lambda u: jax.jit(functools.partial(forward_chain, unrolled=u)),
      f"gradient ×{iters}": lambda u: jax.jit(functools.partial(grad_chain, unrolled=u)),
      f"HVP (jvp of grad) ×{iters}": lambda u: jax.jit(functools.partial(hvp_chain, unrolled=u)),
      f"cg, {iters} iterations (while_loop)": lambda u: jax.jit(
          functools.partial(solve, solver="cg", unrolled=u)),
      f"layerwise_cg, {iters} iterations (fori_loop)": lambda u: jax.jit(
          functools.partial(solve, solver="layerwise_cg", unrolled=u)),
  }
  if tiny:  # the smoke test: compile time is its limit
    pairs = {k: v for k, v in pairs.items() if k.startswith(("gradient", "layerwise"))}
  gradient_1 = jax.jit(grad)
  contenders, compile_s = {}, {}
  grad_c, compile_s["gradient"] = common.compile_timed(gradient_1, params)
  contenders["gradient"] = lambda: grad_c(params)
  for label, make in pairs.items():
    for unrolled in (True, False):
      fn = make(unrolled)
      fn_args = (params,) if label.startswith(("forward", "gradient")) else (params, tangent)
      name = (label, unrolled)
      compiled, compile_s[name] = common.compile_timed(fn, *fn_args)
      contenders[name] = functools.partial(compiled, *fn_args)
  times = common.interleaved_timings(contenders, args.repeats)

  grad_t = times["gradient"]
  rows = [["one gradient, plain jit (reference)", compile_s["gradient"], "–",
           common.median(grad_t), "–", 1.0]]
  for label in pairs:
    unrolled_t, looped_t = times[(label, True)], times[(label, False)]
    rows.append([label, compile_s[(label, True)], compile_s[(label, False)],
                 common.median(unrolled_t), common.median(looped_t),
                 common.paired_ratio(looped_t, unrolled_t)])
  device = jax.default_backend()
  table = common.Table(
      title=f"Loop cliff on {device}: unrolled vs lax loop — conv net {widths} channels, "
            f"{size.image_size} px, batch {size.downstream_batch}",
      columns=["Computation", "compile s (unrolled)", "compile s (loop)", "unrolled s",
               "loop s", "loop / unrolled"],
      rows=rows,
      notes=[f"{args.repeats} interleaved rounds after a warm-up; 'loop / unrolled' is the "
             "median of per-round ratios. Every chained evaluation depends on the previous "
             "one, so neither version can skip or merge work.",
             "The first row's last column is the gradient's own ratio (1)."])
  return common.finish("loop_cliff", [table], args)


if __name__ == "__main__":
  main()
