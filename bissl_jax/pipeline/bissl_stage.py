"""Stage 3: the BiSSL loop, T alternations with per-level data stacks (SPEC §2).

Each alternation takes N_L pretext batches and then one more (the HVP batch of the
upper stage) from the lower level's stack, and N_U downstream batches from the
upper level's stack (``bissl_jax.data.BatchStack``: reshuffle only when a stage no
longer fits in the current epoch), and calls the jitted alternation of
:mod:`bissl_jax.train_state`. The augmentation key of alternation t is
``fold_in(key, t)``, so the run is a pure function of the seed.

Checkpoints (``<directory>/ckpt``, every ``bissl.checkpoint_every`` alternations
and after the last) hold the whole :class:`~bissl_jax.train_state.BilevelState`
(both parameter sets, both optimizer states, step counters, the CG warm start,
BYOL's target) plus both stacks' positions and the alternation counter. A rerun
resumes from the latest one and ends in the same state as an uninterrupted run.
Ctrl-C (or SIGTERM, see ``experiments/main.py``) saves the last completed
alternation before stopping. A non-finite loss, gradient or CG solution raises
``NonFiniteError`` *before* anything of that alternation is saved.

Output ``<directory>/output``: θ_P as ``{'params': {'backbone', 'pretext_head'},
'batch_stats': ...}``.
"""
import os
from typing import Any, Callable, NamedTuple, Optional

import jax
import numpy as np

from bissl_jax import bilevel
from bissl_jax import train_state as ts
from bissl_jax.pipeline import checkpoint
from bissl_jax.pipeline import logging as plog
from bissl_jax.pipeline.context import StageContext, check_size, new_stack, stack_to_json
from bissl_jax.pipeline.search import derive_seed

PyTree = Any
# Fields that do not change the computation (a resume may change them).
_RESUME_FREE_FIELDS = ("checkpoint_every", "init_checkpoint")


class BisslOutput(NamedTuple):
  """θ_P (the stage output) and the final whole state (None when loaded from an export)."""
  params: PyTree
  batch_stats: PyTree
  state: Optional[bilevel.BilevelState]


def resolved_bissl_config(config) -> dict:
  """``config.bissl`` as a dict with the upper LR / weight decay defaults filled in.

  Unset ``upper_lr`` / ``upper_weight_decay`` take the head warm-up values (the
  paper uses Table 4 for both).
  """
  cfg = dict(config.bissl.to_dict() if hasattr(config.bissl, "to_dict") else config.bissl)
  if cfg.get("upper_lr") is None:
    cfg["upper_lr"] = float(config.head_warmup.lr)
  if cfg.get("upper_weight_decay") is None:
    cfg["upper_weight_decay"] = float(config.head_warmup.weight_decay)
  return cfg


def make_setup(ctx: StageContext) -> bilevel.BisslSetup:
  """The static BiSSL setup of this run."""
  from bissl_jax import downstream
  return bilevel.BisslSetup.from_config(
      ctx.model, ctx.task, resolved_bissl_config(ctx.config),
      downstream=downstream.Classification(ctx.model, ctx.image_size, ctx.multilabel))


def _fingerprint(ctx: StageContext) -> dict:
  cfg = resolved_bissl_config(ctx.config)
  return {k: v for k, v in sorted(cfg.items()) if k not in _RESUME_FREE_FIELDS}


def alternation_batches(pretext_set, downstream_set, lower, upper, *, lower_steps: int,
                        upper_steps: int) -> bilevel.AlternationBatches:
  """Host batches of one alternation, drawn from the two stacks."""
  pretext = pretext_set.batch(lower.take(lower_steps))["image"]
  hvp = pretext_set.batch(lower.take(1)[0])["image"]  # from the lower level's stream
  down = downstream_set.batch(upper.take(upper_steps))
  return bilevel.AlternationBatches(pretext=pretext, hvp=hvp, downstream_images=down["image"],
                               downstream_labels=down["label"])


def run_bissl(ctx: StageContext, warm: dict, pretext_set, downstream_set, *, seed: int,
              directory: str, name: str,
              callback: Optional[Callable[[int, bilevel.BilevelState, dict], None]] = None
              ) -> BisslOutput:
  """Runs, resumes, or loads the finished output of, the BiSSL stage.

  Args:
    ctx: the run context.
    warm: ``{'params': {'backbone', 'pretext_head', 'downstream_head'},
      'batch_stats': {'backbone', 'pretext_head'}}`` after the head warm-up.
    pretext_set: the pretext dataset (lower level).
    downstream_set: the downstream training split (upper level).
    seed: seed of the stacks and augmentation.
    directory: stage directory (``ckpt`` and ``output`` inside).
    name: label for logs.
    callback: ``callback(alternations_done, state, host_metrics)`` after every
      alternation (after its checkpoint, if one is due); an exception raised here
      stops the run like a crash would.

  Returns:
    A :class:`BisslOutput`.

  Raises:
    NonFiniteError: a non-finite value appeared; that alternation is not saved.
  """
  out_dir = os.path.join(directory, "output")
  if checkpoint.is_export(out_dir):
    variables, _ = checkpoint.load_export(out_dir)
    return BisslOutput(variables["params"], variables["batch_stats"], None)

  cfg = ctx.config.bissl
  n_l, n_u, total = cfg.lower_steps, cfg.upper_steps, cfg.alternations
  check_size(len(pretext_set), cfg.pretext_batch_size, "bissl.pretext_batch_size",
             "the pretext set")
  check_size(len(downstream_set), cfg.downstream_batch_size, "bissl.downstream_batch_size",
             "the downstream training split")
  setup = make_setup(ctx)
  alternate = ctx.cached(("alternation", setup),
                         lambda: ts.make_alternation_fn(setup, ctx.mesh))
  state = bilevel.init_bilevel_state(setup, warm["params"], warm["batch_stats"])
  lower_seed, upper_seed = derive_seed(seed, "bissl_lower"), derive_seed(seed, "bissl_upper")
  lower = new_stack(len(pretext_set), cfg.pretext_batch_size, seed=lower_seed)
  upper = new_stack(len(downstream_set), cfg.downstream_batch_size, seed=upper_seed)

  ckpt = checkpoint.RunCheckpointer(os.path.join(directory, "ckpt"))
  done = 0
  fingerprint = _fingerprint(ctx)
  if ckpt.latest_step() is not None:
    state, extra = ckpt.restore(state)
    if extra.get("config") != fingerprint:
      changed = sorted(k for k in fingerprint if extra.get("config", {}).get(k) != fingerprint[k])
      raise ValueError(
          f"The BiSSL checkpoint in {ckpt.directory} was written with different "
          f"config.bissl fields {changed}; resuming would mix two runs. Restore those "
          f"values or use a fresh --workdir.")
    done = int(extra["alternation"])
    lower = new_stack(len(pretext_set), cfg.pretext_batch_size, seed=lower_seed,
                      state=extra["lower_stack"])
    upper = new_stack(len(downstream_set), cfg.downstream_batch_size, seed=upper_seed,
                      state=extra["upper_stack"])

  def extra_record(count, stacks_json):
    return {"alternation": count, "lower_stack": stacks_json[0],
            "upper_stack": stacks_json[1], "config": fingerprint}

  base_key = jax.random.key(derive_seed(seed, "bissl_aug"))
  # (alternations done, state, stack positions) always change together in one
  # assignment, so an interrupt anywhere sees a consistent triple to save.
  committed = (done, state, (stack_to_json(lower), stack_to_json(upper)))
  last_saved = done if ckpt.latest_step() is not None else -1
  progress = plog.Progress(total, name, initial=done, unit="alt",
                           items_per_step=n_l * cfg.pretext_batch_size)
  try:
    while committed[0] < total:
      t, state, _ = committed
      batches = alternation_batches(pretext_set, downstream_set, lower, upper,
                                    lower_steps=n_l, upper_steps=n_u)
      new_state, metrics = alternate(state, batches, jax.random.fold_in(base_key, t))
      metrics = jax.device_get(metrics)
      ts.raise_if_nonfinite(metrics, t)  # before any save of this alternation
      committed = (t + 1, new_state, (stack_to_json(lower), stack_to_json(upper)))
      if (t + 1) % ctx.config.log_every == 0 or t + 1 == total:
        ctx.logger.write(name, t + 1, {k: v for k, v in metrics.items()
                                       if not k.endswith("nonfinite")})
      if (t + 1) % cfg.checkpoint_every == 0 or t + 1 == total:
        ckpt.save(t + 1, new_state, extra_record(t + 1, committed[2]))
        last_saved = t + 1
      progress.update(1, lower=metrics["lower_loss"], upper=metrics["upper_loss"])
      if callback is not None:
        callback(t + 1, new_state, metrics)
  except KeyboardInterrupt:
    count, state, stacks_json = committed
    if count > last_saved and count > 0:
      print(f"[{name}] interrupted: saving alternation {count} to {ckpt.directory}",
            flush=True)
      ckpt.save(count, state, extra_record(count, stacks_json))
    raise
  finally:
    progress.close()
    ckpt.close()
  state = committed[1]
  params, batch_stats = ts.lower_result(state)
  checkpoint.export(out_dir, {"params": params, "batch_stats": batch_stats}, {
      "stage": "bissl", "seed": seed, "arch": ctx.config.model.arch,
      "task": ctx.config.pretext.task, "alternations": total,
      "downstream_dataset": ctx.config.data.downstream_dataset,
      "image_size": ctx.image_size})
  return BisslOutput(params, batch_stats, state)


def load_final_state(ctx: StageContext, warm: dict, directory: str) -> bilevel.BilevelState:
  """The whole BilevelState of the newest BiSSL checkpoint in ``directory``."""
  setup = make_setup(ctx)
  template = bilevel.init_bilevel_state(setup, warm["params"], warm["batch_stats"])
  ckpt = checkpoint.RunCheckpointer(os.path.join(directory, "ckpt"))
  try:
    state, _ = ckpt.restore(template)
  finally:
    ckpt.close()
  return state


def tree_max_abs_diff(a: PyTree, b: PyTree) -> float:
  """Largest absolute difference over all leaves of two same-structure trees."""
  diffs = jax.tree_util.tree_map(
      lambda x, y: float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64))))
      if np.size(x) else 0.0, a, b)
  return max(jax.tree_util.tree_leaves(diffs), default=0.0)
