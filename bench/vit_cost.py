"""Cost of BiSSL's pieces on a ViT + LoRA + MAE problem, in pretext-gradient units.

On one MAE batch and one LoRA model, side by side:

* one gradient of L_P with respect to the trainable leaves (LoRA + decoder): the unit;
* one gradient with respect to every backbone and decoder leaf (full fine-tuning), to
  show what freezing the base weights saves in the backward pass;
* one lower step: that gradient plus the proximal term and an AdamW update on the
  trainable half (``bissl_jax.core.partition.level_optimizer`` semantics);
* one implicit solve over the LoRA leaves (``implicit_grad``, ``hessian_mode=
  'linearize'``, ``cg`` with ``--cg-iters`` iterations), the upper level's main cost.

A second table times one BiSSL alternation (N_L lower + N_U upper steps) through
the library's own per-step pieces (``train_state.make_alternation_fn(setup)`` with
the ``'per_step'`` driver, as ``bench/solver_cost.py``), with the implicit gradient
by BiSSLight's ``mfac`` (per-layer blocks, m = N_L, no damping) and by the paper's
``layerwise_cg`` (``--cg-iters``, δ = 10), in the same pretext-gradient unit, with
XLA's compiled memory of one upper step (plus the M-FAC window).

Sizes: ``--tiny`` (the CPU test toy, seconds), ``--small`` (width 64, depth 4, 32 px,
for a 2-core CPU), default full size: MAE ViT-B/16 at 224 px, LoRA rank 64 on q and v,
pretext batch 256 (downstream batch 64), for an accelerator::

  python -m bench.vit_cost --small
  python -m bench.vit_cost            # ViT-B/16, on a GPU or TPU
"""
import argparse
import dataclasses
import sys
from typing import List, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from bench import common
from bench import solver_cost
from bissl_jax.core import state as bilevel
from bissl_jax.tasks.downstream import classification as downstream_lib
from bissl_jax import implicit
from bissl_jax.models import lora
from bissl_jax.core import partition
from bissl_jax.models.lora import LoRAConfig
from bissl_jax.models.mae_decoder import MAEDecoder
from bissl_jax.tasks.pretext.mae import MAE
from bissl_jax.models.vit import ViT
from bissl_jax.core.params import init_params
from bissl_jax.models.vit_bundle import ViTModel

LAM = 1e-3


@dataclasses.dataclass(frozen=True)
class ViTSize:
  """One benchmark size: encoder, decoder, LoRA rank, image side and batch."""
  name: str
  width: int
  depth: int
  heads: int
  patch: int
  image_size: int
  rank: int
  decoder: tuple  # (width, depth, heads)
  batch: int


SIZES = {
    "tiny": ViTSize("tiny", 16, 2, 2, 4, 8, 2, (8, 1, 2), 4),
    "small": ViTSize("small", 64, 4, 4, 4, 32, 8, (32, 1, 2), 16),
    "full": ViTSize("full", 768, 12, 12, 16, 224, 64, (512, 8, 16), 256),
}


def describe(s: ViTSize) -> str:
  return (f"ViT width {s.width}, depth {s.depth}, patch {s.patch}, {s.image_size} px, "
          f"LoRA r={s.rank} on q,v, decoder {s.decoder[0]}×{s.decoder[1]}, batch {s.batch}")


def build(s: ViTSize, seed: int = 0):
  encoder = ViT(patch_size=s.patch, width=s.width, depth=s.depth, num_heads=s.heads,
                lora=LoRAConfig(s.rank))
  decoder = MAEDecoder(patch_size=s.patch, width=s.decoder[0], depth=s.decoder[1],
                       num_heads=s.decoder[2])
  model = ViTModel(encoder, decoder)
  params, stats = jax.jit(lambda k: init_params(model, downstream_task(model, s.image_size), k,
                                                s.image_size))(jax.random.key(seed))
  task = MAE(model, image_size=s.image_size)
  images = np.random.default_rng(seed).integers(
      0, 256, (s.batch, s.image_size, s.image_size, 3), dtype=np.uint8)
  inputs = jax.jit(task.prepare)(jax.random.key(seed + 1), images)
  return model, task, params, stats, inputs


def downstream_task(model, image_size: int):
  """10-way classification with a ViT's head initialisation."""
  return downstream_lib.Classification(model, image_size, num_classes=10,
                                       head_init="trunc_normal")


def parse_args(argv):
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  group = parser.add_mutually_exclusive_group()
  group.add_argument("--small", action="store_true")
  group.add_argument("--tiny", action="store_true")
  parser.add_argument("--cg-iters", type=int, default=5)
  parser.add_argument("--lower-steps", type=int, default=None,
                      help="N_L of the alternation (default 20; 2 at --tiny).")
  parser.add_argument("--upper-steps", type=int, default=None,
                      help="N_U of the alternation (default 8; 2 at --tiny).")
  parser.add_argument("--repeats", type=int, default=None)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--no-record", action="store_true")
  parser.add_argument("--doc", default=None)
  args = parser.parse_args(argv)
  args.size = SIZES["tiny" if args.tiny else "small" if args.small else "full"]
  if args.repeats is None:
    args.repeats = common.DEFAULT_REPEATS[args.size.name]
  tiny = args.size.name == "tiny"
  args.lower_steps = args.lower_steps or (2 if tiny else 20)
  args.upper_steps = args.upper_steps or (2 if tiny else 8)
  args.argv = list(argv)
  return args


def alternation_setups(model, task, image_size: int, args) -> dict:
  """``{'mfac': setup, 'layerwise_cg': setup}``: the configs' BiSSL defaults, per step."""
  from configs import common as config_common  # pylint: disable=g-import-not-at-top
  config = config_common.base_config()
  cfg = config.bissl.to_dict()
  cfg.update(upper_lr=config.head_warmup.lr, upper_weight_decay=config.head_warmup.weight_decay,
             lam=LAM, lower_steps=args.lower_steps, upper_steps=args.upper_steps,
             cg_iters=args.cg_iters, stage_driver="per_step")
  down = downstream_task(model, image_size)
  variants = {"mfac": dict(solver="mfac", damping=0.0, mfac_blocks="per_layer"),
              "layerwise_cg": dict(solver="layerwise_cg", damping=10.0)}
  return {name: bilevel.BisslSetup.from_config(model, task, dict(cfg, **v), downstream=down)
          for name, v in variants.items()}


def alternation_table(model, task, params, stats, s: ViTSize, args, grad_unit) -> common.Table:
  """One alternation with ``mfac`` vs ``layerwise_cg``, in pretext gradients."""
  rng = np.random.default_rng(args.seed + 2)
  images = lambda *shape: rng.integers(0, 256, shape + (s.image_size, s.image_size, 3),
                                       dtype=np.uint8)
  down_batch = min(s.batch, 64)
  batches = bilevel.AlternationBatches(
      pretext=images(args.lower_steps, s.batch), hvp=images(s.batch),
      downstream_images=images(args.upper_steps, down_batch),
      downstream_labels=rng.integers(0, 10, (args.upper_steps, down_batch)).astype(np.int32))
  key = jax.random.key(args.seed + 3)
  contenders = {"gradient": grad_unit}
  setups = alternation_setups(model, task, s.image_size, args)
  memory, compile_s = solver_cost.solver_contenders(setups, params, stats, batches, key,
                                                    contenders)
  times = common.interleaved_timings(contenders, args.repeats)
  unit = times["gradient"]
  grads = lambda name: common.paired_ratio(times[name], unit)
  rows = [[name, grads(f"{name}: upper stage") / args.upper_steps,
           grads(f"{name}: upper stage"), grads(f"{name}: lower stage"),
           grads(f"{name}: alternation"), memory[name], compile_s[name]]
          for name in setups]
  speedup = common.paired_ratio(times["layerwise_cg: upper stage"], times["mfac: upper stage"])
  notes = [f"N_L = {args.lower_steps}, N_U = {args.upper_steps}, pretext batch {s.batch}, "
           f"downstream batch {down_batch}; layerwise_cg: {args.cg_iters} iterations, "
           f"δ = 10; mfac: per-layer blocks, m = N_L, δ = 0; λ = {LAM}.",
           f"Upper stage, layerwise_cg / mfac: {speedup:.1f}×. M-FAC window "
           f"({args.lower_steps} gradients of the LoRA leaves, float32): "
           f"{memory['mfac window']:.3g} MiB, included in its upper step's arguments.",
           f"Unit: one pretext gradient of the trainable leaves ({common.median(unit):.4g} s); "
           f"medians of per-round ratios over {args.repeats} interleaved rounds."]
  return common.Table(
      title=f"One BiSSL alternation on ViT + LoRA + MAE, mfac vs layerwise_cg — {describe(s)}",
      columns=["Solver", "per upper step", "upper stage", "lower stage", "alternation",
               "upper-step memory MiB", "compile s"], rows=rows, notes=notes)


def main(argv: Optional[Sequence[str]] = None) -> List[common.Table]:
  args = parse_args(list(sys.argv[1:] if argv is None else argv))
  s = args.size
  model, task, params, stats, inputs = build(s, args.seed)
  mask = model.trainable(params)
  train, frozen = partition.split(params, mask)
  loss_of = lambda t: task.loss(partition.merge(t, frozen), stats, inputs)[0]
  lower_keys = ("backbone", "pretext_head")
  full = {k: params[k] for k in lower_keys}
  full_loss = lambda p: task.loss(p, stats, inputs)[0]
  tx = optax.adamw(1e-3, b2=0.95, weight_decay=0.0)
  opt_state = tx.init(train)
  anchor = train  # θ_D's trainable half (identical at the start of an alternation)

  grad_trainable = jax.jit(jax.grad(loss_of))
  grad_full = jax.jit(jax.grad(full_loss))

  @jax.jit
  def lower_step(t, state):
    def objective(t):
      prox = sum(jnp.sum(jnp.square(a - b)) for a, b in zip(
          jax.tree_util.tree_leaves(t["backbone"]), jax.tree_util.tree_leaves(anchor["backbone"])))
      return loss_of(t) + 0.5 * LAM * prox
    updates, state = tx.update(jax.grad(objective)(t), state, t)
    return optax.apply_updates(t, updates), state

  lora_only = lora.lora_mask(params["backbone"])
  bb_train, bb_frozen = partition.split(params["backbone"], lora_only)

  @jax.jit
  def implicit_solve(t, v):
    lower = lambda b: task.loss(dict(params, backbone=partition.merge(b, bb_frozen)),
                                stats, inputs)[0]
    return implicit.implicit_grad(lower, t, v, lam=LAM, damping=10.0, solver="cg",
                                  maxiter=args.cg_iters)[0]

  v = jax.tree_util.tree_map(jnp.ones_like, bb_train)
  contenders = {
      "gradient, trainable leaves (unit)": lambda: grad_trainable(train),
      "gradient, all leaves (full fine-tuning)": lambda: grad_full(full),
      "lower step (gradient + proximal + AdamW)": lambda: lower_step(train, opt_state),
      f"implicit solve on LoRA leaves ({args.cg_iters} CG)": lambda: implicit_solve(bb_train, v),
  }
  times = common.interleaved_timings(contenders, args.repeats)
  unit = times["gradient, trainable leaves (unit)"]
  rows = [[name, common.median(t) * 1e3, common.paired_ratio(t, unit)]
          for name, t in times.items()]
  count = lambda tree: sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(tree))
  notes = [f"Trainable leaves: {count(train):,} of {count(params):,} parameters "
           f"({count(bb_train):,} LoRA leaves in the implicit solve).",
           f"λ = {LAM}, δ = 10; medians of {args.repeats} interleaved rounds."]
  table = common.Table(title=f"ViT + LoRA + MAE pieces — {describe(s)}",
                       columns=["Piece", "ms", "pretext gradients"], rows=rows, notes=notes)
  alternation = alternation_table(model, task, params, stats, s, args,
                                  lambda: grad_trainable(train))
  return common.finish("vit_cost", [table, alternation], args)


if __name__ == "__main__":
  main()
