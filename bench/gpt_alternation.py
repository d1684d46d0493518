"""Cost of one BiSSL alternation on GPT, in next-token gradients (thesis ch. 7).

The unit is one gradient of the next-token loss L_P on the pretext batch. Timed, each
as its own jitted program and interleaved (see ``bench.common``):

* ``lower step``: gradient of L_P + (λ/2)‖θ_P − θ_D‖² and an Adam update;
* ``downstream gradient``: gradient of L_task + ν·L_GPT in (θ, φ_D);
* ``upper step (<solver>)``: the downstream gradient at θ_P plus the implicit
  gradient ``(I + H/(λ+δ))⁻¹ v`` with ``maxiter`` solver iterations, the Hessian of
  L_P built once by ``jax.linearize``.

The alternation estimate is ``N_L·lower + N_U·upper`` (thesis: N_L = 20, N_U = 4,
5 iterations of layerwise CG, λ = 0.1, δ = 10).

Sizes: ``--tiny`` (smoke test), ``--small`` (``gpt_tiny``, V = 1024, k = 64, batch 32,
minutes on a 2-core CPU), default: the original GPT at batch 64 × 512 (an accelerator).

Run: ``python -m bench.gpt_alternation --small`` (add ``--no-record`` to only print).
"""
import argparse
import sys
from typing import List, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from bench import common
from bissl_jax import implicit
from bissl_jax.core.params import init_params
from bissl_jax.models import gpt
from bissl_jax.implicit import tree_math
from bissl_jax.tasks.pretext.next_token import NextToken
from bissl_jax.implicit.solvers import SOLVERS
from bissl_jax.tasks.downstream.text import TextTask

SIZES = {  # (config, vocab, context, pretext batch, downstream batch)
    "tiny": ("gpt_micro", 32, 16, 4, 4),
    "small": ("gpt_tiny", 1024, 64, 32, 32),
    "full": ("gpt", 40478, 512, 64, 64),
}
LAM, DAMPING, N_L, N_U = 0.1, 10.0, 20, 4


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
  argv = list(sys.argv[1:] if argv is None else argv)
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  group = parser.add_mutually_exclusive_group()
  group.add_argument("--small", action="store_true")
  group.add_argument("--tiny", action="store_true")
  parser.add_argument("--repeats", type=int, default=None)
  parser.add_argument("--maxiter", type=int, default=5)
  parser.add_argument("--dtype", default="float32")
  parser.add_argument("--remat", action="store_true")
  parser.add_argument("--no-record", action="store_true")
  parser.add_argument("--doc", default=None)
  args = parser.parse_args(argv)
  args.size = "tiny" if args.tiny else "small" if args.small else "full"
  args.repeats = args.repeats or {"tiny": 1, "small": 5, "full": 10}[args.size]
  args.argv = argv
  return args


def main(argv: Optional[Sequence[str]] = None) -> List[common.Table]:
  """Runs the benchmark; returns (and prints, and records) its tables."""
  args = parse_args(argv)
  name, vocab, context, pretext_batch, downstream_batch = SIZES[args.size]
  model = gpt.GPT(gpt.gpt_config(name, vocab_size=vocab, context=context), num_special=3,
                  dtype=args.dtype, remat=args.remat)
  pretext, task = NextToken(model), TextTask(model, "entailment")
  params, stats = jax.jit(lambda k: init_params(model, task, k, 0))(jax.random.PRNGKey(0))
  rng = np.random.default_rng(0)
  lm_tokens = jnp.asarray(rng.integers(0, vocab, (pretext_batch, context)), jnp.int32)
  ds_tokens = jnp.asarray(rng.integers(0, vocab, (downstream_batch, context)), jnp.int32)
  ds_tokens = ds_tokens.at[:, 0].set(model.special_ids["start"])
  ds_tokens = ds_tokens.at[:, -1].set(model.special_ids["end"])
  labels = jnp.asarray(rng.integers(0, 2, downstream_batch), jnp.int32)
  inputs = task.prepare(jax.random.PRNGKey(1), ds_tokens, train=True)
  theta, head = params["backbone"], params["downstream_head"]
  adam = optax.adam(1e-4)
  opt_state = adam.init(theta)

  def lp(b):
    return pretext.loss({"backbone": b, "pretext_head": {}}, stats, lm_tokens)[0]

  def ld(b, h):
    return task.loss(b, h, {}, inputs, labels)[0]

  @jax.jit
  def pretext_grad(b):
    return jax.grad(lp)(b)

  @jax.jit
  def lower_step(b, anchor, state):
    g = jax.grad(lambda x: lp(x) + 0.5 * LAM * tree_math.tree_vdot(
        tree_math.tree_sub(x, anchor), tree_math.tree_sub(x, anchor)))(b)
    updates, state = adam.update(g, state, b)
    return optax.apply_updates(b, updates), state

  @jax.jit
  def downstream_grad(b, h):
    return jax.grad(ld, argnums=(0, 1))(b, h)

  def upper_step(solver):
    @jax.jit
    def step(b, h):
      g_b, g_h = jax.grad(ld, argnums=(0, 1))(b, h)
      v, _ = implicit.implicit_grad(lp, b, g_b, lam=LAM, damping=DAMPING, solver=solver,
                                    maxiter=args.maxiter)
      return v, g_h
    return step

  solvers = [s for s in ("layerwise_cg", "cg", "mfac") if s in SOLVERS]
  contenders = {
      "pretext gradient": lambda: pretext_grad(theta),
      "lower step": lambda: lower_step(theta, theta, opt_state),
      "downstream gradient": lambda: downstream_grad(theta, head),
  }
  steps = {s: upper_step(s) for s in solvers}
  for s, fn in steps.items():
    contenders[f"upper step ({s}, {args.maxiter} it.)"] = (lambda fn=fn: fn(theta, head))
  times = common.interleaved_timings(contenders, args.repeats)
  unit = times["pretext gradient"]
  rows = [[k, common.median(t), common.paired_ratio(t, unit)] for k, t in times.items()]
  description = (f"{name}: V = {vocab}, k = {context}, {gpt.count_params(params):,} "
                 f"parameters, pretext batch {pretext_batch}, downstream batch "
                 f"{downstream_batch}, {args.dtype}{', remat' if args.remat else ''}")
  parts = common.Table(title=f"GPT alternation parts ({description})",
                       columns=["part", "seconds", "pretext gradients"], rows=rows)
  lower = common.paired_ratio(times["lower step"], unit)
  alternation = [[s, N_L * lower + N_U * common.paired_ratio(
      times[f"upper step ({s}, {args.maxiter} it.)"], unit)] for s in solvers]
  estimate = common.Table(
      title=f"One alternation, N_L = {N_L}, N_U = {N_U} (estimate from the parts)",
      columns=["solver", "pretext gradients"], rows=alternation,
      notes=["The thesis's T = 200 alternations cost 200× this; solvers missing from "
             "the registry are not listed."])
  return common.finish("gpt_alternation", [parts, estimate], args)


if __name__ == "__main__":
  main()
