"""Stage 3: the BiSSL loop, T alternations with per-level data stacks (BiSSL paper Algorithm 1, Appendix B.4).

Each alternation takes N_L pretext batches and then one more (the HVP batch of the
upper stage) from the lower level's stack, and N_U downstream batches from the
upper level's stack (``bissl_jax.data.BatchStack``: reshuffle only when a stage no
longer fits in the current epoch; a streamed dataset is decoded by Grain workers in
the same order, ``bissl_jax.data.grain_stream``), and calls the jitted alternation of
:mod:`bissl_jax.core.alternation`. The augmentation key of alternation t is
``fold_in(key, t)``, so the run is a pure function of the seed. Each process draws
only its rows of every batch (:func:`place_batches` assembles the global arrays);
when a level is streamed, ``config.data.device_prefetch`` alternations' batches are
placed ahead (``bissl_jax.data.prefetch``).

The loop is :func:`bissl_jax.pipeline.stage_loop.run_stage` with one alternation
per step. Checkpoints (``<directory>/ckpt``, every ``bissl.checkpoint_every``
alternations, after the last, and on Ctrl-C/SIGTERM) hold the whole
:class:`~bissl_jax.core.state.BilevelState` (both parameter sets, both optimizer
states, step counters, the CG warm start, BYOL's target) plus both stacks' positions
and the alternation counter. A rerun resumes from the latest one and ends in the
same state as an uninterrupted run. A non-finite loss, gradient or CG solution, or
non-finite parameters of either level, raise ``NonFiniteError`` naming the level
*before* anything of that alternation is saved.

Output ``<directory>/output``: θ_P as ``{'params': {'backbone', 'pretext_head'},
'batch_stats': ...}``.
"""
import functools
import os
from typing import Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from bissl_jax.core import state as bilevel
from bissl_jax.core import protocols
from bissl_jax.core import alternation as ts
from bissl_jax.convert import stage_output
from bissl_jax.data import BatchStack, grain_stream, prefetch, process_shard
from bissl_jax.data.image_records import ImageRecords
from bissl_jax.runtime.errors import NonFiniteError
from bissl_jax.pipeline import checkpoint
from bissl_jax.pipeline import provenance
from bissl_jax.pipeline import stage_loop
from bissl_jax.pipeline.context import StageContext, check_size
from bissl_jax.runtime.seeds import derive_seed
from bissl_jax.types import PyTree
from bissl_jax.runtime import mesh as parallel

# Fields that do not change the computation (a resume may change them).
_RESUME_FREE_FIELDS = ("checkpoint_every", "init_checkpoint")


class BisslOutput(NamedTuple):
  """θ_P (the stage output) and the final whole state (None when loaded from an export)."""
  params: PyTree
  batch_stats: PyTree
  state: Optional[bilevel.BilevelState]


def make_setup(ctx: StageContext) -> bilevel.BisslSetup:
  """The static BiSSL setup of this run: the one call into the training core's setup.

  ``ctx.config`` is resolved (``config_validation.resolve_config``), so
  ``config.bissl`` carries every BiSSL field with its final value; the upper level
  uses the run's downstream task, the one fine-tuning and evaluation use.
  """
  return bilevel.BisslSetup.from_config(ctx.model, ctx.task, ctx.config.bissl,
                                        downstream=ctx.downstream)


def stage_provenance(ctx: StageContext, seed: int, inputs=None) -> provenance.Provenance:
  """What θ_P depends on: the BiSSL, pretext-task, model and data fields, seed, inputs."""
  fields = provenance.config_fields(
      ctx.config, ("bissl", "pretext", "model", "data"),
      exclude=[f"bissl.{k}" for k in _RESUME_FREE_FIELDS]
      + [f"pretext.{k}" for k in ("checkpoint", "share_across_seeds", "baseline_epochs")]
      + list(provenance.FEED_FIELDS))
  fields["seed"] = int(seed)
  return provenance.Provenance(fields, dict(inputs or {}))


def _new_stack(num_examples: int, batch_size: int, seed: int, state=None) -> BatchStack:
  return BatchStack(num_examples, batch_size, seed=seed, state=state)


class _StackLevel:
  """An in-memory level: its :class:`BatchStack` and ``dataset.batch`` of this
  process's rows (``local``, a slice of every global batch)."""

  def __init__(self, dataset, new_stack, local: slice):
    self.dataset, self._new, self.local = dataset, new_stack, local
    self.stack = new_stack()

  def draw(self, count: int) -> dict:
    return self.dataset.batch(self.stack.take(count)[:, self.local])

  def position(self) -> dict:
    return stage_loop.stack_position(self.stack)

  def restore(self, position: dict) -> None:
    self.stack = stage_loop.restore_stack(self._new, position)


class AlternationData:
  """Both levels' batch stacks (docs/sources.md, "Data stacks"): the data of one alternation per step.

  A level whose dataset is streamed (``bissl_jax.data.ImageRecords``) is a
  ``grain_stream.BatchStream`` planned with the same takes (``[N_L, 1] * T`` below,
  ``[N_U] * T`` above), so it draws the batches the in-memory stack would; its
  Grain state is saved as the checkpoint's ``iterators`` item. Each process draws
  only its rows of every global batch (``bissl_jax.data.process_shard``;
  :func:`place_batches` assembles the global arrays).

  Args:
    pretext_set, downstream_set: the lower and upper level's datasets.
    cfg: ``config.bissl``.
    seed: seed of the stacks.
    keys: the batch entries the pretext and downstream tasks read.
    process_index, process_count: this process's shard (default: JAX's).
  """

  def __init__(self, pretext_set, downstream_set, cfg, *, seed: int,
               keys: tuple = ("image", "image"), process_index: Optional[int] = None,
               process_count: Optional[int] = None):
    self.cfg = cfg
    self.keys = keys  # the batch entries the pretext and downstream tasks read
    sizes = {"lower": (pretext_set, cfg.pretext_batch_size, "bissl_lower",
                       [cfg.lower_steps, 1] * cfg.alternations),
             "upper": (downstream_set, cfg.downstream_batch_size, "bissl_upper",
                       [cfg.upper_steps] * cfg.alternations)}
    self.levels = {}
    for level, (dataset, batch_size, stream, takes) in sizes.items():
      level_seed = derive_seed(seed, stream)
      if isinstance(dataset, ImageRecords):
        self.levels[level] = grain_stream.level_stream(
            dataset, batch_size, seed=level_seed, takes=takes,
            process_index=process_index, process_count=process_count)
      else:
        first, rows = process_shard(batch_size, process_index, process_count)
        self.levels[level] = _StackLevel(dataset, functools.partial(
            _new_stack, len(dataset), batch_size, level_seed), slice(first, first + rows))

  @property
  def streamed(self) -> bool:
    """Whether a level is decoded by Grain (then its batches are worth prefetching)."""
    return any(not isinstance(s, _StackLevel) for s in self.levels.values())

  def batch(self, step: int) -> bilevel.AlternationBatches:
    del step  # the levels carry the position
    lower, upper = self.levels["lower"], self.levels["upper"]
    pretext_key, downstream_key = self.keys
    pretext = lower.draw(self.cfg.lower_steps)[pretext_key]
    hvp = lower.draw(1)[pretext_key][0]  # from the lower level's stream
    down = upper.draw(self.cfg.upper_steps)
    return bilevel.AlternationBatches(pretext=pretext, hvp=hvp,
                                      downstream_images=down[downstream_key],
                                      downstream_labels=down["label"])

  def position(self, steps_done: int) -> dict:
    del steps_done
    position, iterators = {}, {}
    for level, source in self.levels.items():
      if isinstance(source, _StackLevel):
        position[level] = source.position()
      else:
        iterators[level] = source.get_state()
    if iterators:
      position[checkpoint.ITERATORS] = iterators
    return position

  def restore(self, position: dict, steps_done: int) -> None:
    del steps_done
    for level, source in self.levels.items():
      if isinstance(source, _StackLevel):
        source.restore(position[level])
      else:
        source.set_state(position[checkpoint.ITERATORS][level])

  def close(self) -> None:
    for source in self.levels.values():
      if hasattr(source, "close"):
        source.close()


def place_batches(ctx: StageContext, batches: bilevel.AlternationBatches
                  ) -> bilevel.AlternationBatches:
  """This process's rows of an alternation's batches as global arrays on ``ctx.mesh``.

  The stacks ``(steps, rows, ...)`` are split along axis 1, the HVP batch along
  axis 0 (the shardings ``train_state.make_alternation_fn`` compiles for).
  """
  return bilevel.AlternationBatches(
      pretext=ctx.shard(batches.pretext, 1), hvp=ctx.shard(batches.hvp, 0),
      downstream_images=ctx.shard(batches.downstream_images, 1),
      downstream_labels=ctx.shard(batches.downstream_labels, 1))


def _params_to_check(state: bilevel.BilevelState) -> dict:
  lower_params, _ = ts.lower_result(state)
  return {
      "lower-level parameters (θ_P, φ_P)": (
          lower_params, "Lower config.bissl.lower_lr (or check the pretext data for NaN/Inf)."),
      "upper-level parameters (θ_D, φ_D)": (
          state.upper.params, "Lower config.bissl.upper_lr or raise config.bissl.damping."),
  }


def run_bissl(ctx: StageContext, warm: dict, pretext_set, downstream_set, *, seed: int,
              directory: str, name: str,
              callback: Optional[Callable[[int, bilevel.BilevelState, dict], None]] = None,
              inputs: Optional[dict] = None) -> BisslOutput:
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
    inputs: ``{name: digest}`` of the warm-up output it starts from (provenance).

  Returns:
    A :class:`BisslOutput`.

  Raises:
    NonFiniteError: a non-finite value appeared; that alternation is not saved.
  """
  out_dir = os.path.join(directory, "output")
  prov = stage_provenance(ctx, seed, inputs)
  if provenance.reusable(out_dir, prov, mode=ctx.config.get("reuse", "recompute"), name=name):
    variables, _ = stage_output.load_export(out_dir)
    return BisslOutput(variables["params"], variables["batch_stats"], None)

  cfg = ctx.config.bissl
  check_size(len(pretext_set), cfg.pretext_batch_size, "bissl.pretext_batch_size",
             "the pretext set")
  check_size(len(downstream_set), cfg.downstream_batch_size, "bissl.downstream_batch_size",
             "the downstream training split")
  setup = make_setup(ctx)
  alternate = ctx.cached(("alternation", setup),
                         lambda: ts.make_alternation_fn(setup, ctx.mesh))
  base_key = jax.random.key(derive_seed(seed, "bissl_aug"))

  warned = []

  def step(state, t, batches):
    new_state, metrics = alternate(state, place_batches(ctx, batches),
                                   jax.random.fold_in(base_key, t))
    metrics = jax.device_get(metrics)
    if bool(np.asarray(metrics["upper_nonfinite"])) or bool(
        np.asarray(metrics["lower_nonfinite"])):
      blame_lam_if_unstable(t, lam=float(cfg.lam), lower_lr=float(cfg.lower_lr),
                            momentum=float(cfg.lower_momentum))
    if bool(np.asarray(metrics["upper_nonfinite"])):
      blame_lower_if_it_overflowed(new_state, t, float(cfg.lower_lr))
    ts.raise_if_nonfinite(metrics, t)  # before anything of this alternation is saved
    if not warned and setup.solver_spec.needs_operator:
      warned.extend(warn_if_residual_above_one(name, t, metrics))
    unchecked = ("cg_residual", "cg_residual_last") if not metrics["residual_checks"] else ()
    return new_state, {k: v for k, v in metrics.items()
                       if not k.endswith("nonfinite") and k not in unchecked}

  data = AlternationData(pretext_set, downstream_set, cfg, seed=seed,
                         keys=(protocols.input_key(ctx.task),
                               protocols.input_key(ctx.downstream)))
  device_prefetch = ctx.device_feed()["device_prefetch"]
  if data.streamed and device_prefetch:  # a level decoded by Grain: copy batches ahead
    data = prefetch.PrefetchedData(data, functools.partial(place_batches, ctx),
                                   size=device_prefetch, total_steps=cfg.alternations)
  stage = stage_loop.Stage(
      name=name, total_steps=cfg.alternations, step=step,
      data=data,
      # Every alternation is logged: they are few (T ≤ 500), and the curves need them.
      logger=ctx.logger, log_every=1,
      checkpoint_dir=os.path.join(directory, "ckpt"),
      checkpoint_every=cfg.checkpoint_every, save_last=True,
      fingerprint=prov.fingerprint(), reuse=ctx.config.get("reuse", "recompute"),
      params_to_check=_params_to_check, loss_key=None,
      show={"lower_loss": "lower_loss", "upper_loss_sum": "upper_loss"}, unit="alt",
      items_per_step=cfg.lower_steps * cfg.pretext_batch_size, callback=callback)
  fresh = bilevel.init_bilevel_state(setup, warm["params"], warm["batch_stats"])
  state = stage_loop.run_stage(stage, fresh).state
  params, batch_stats = ts.lower_result(state)
  stage_output.export(out_dir, {"params": params, "batch_stats": batch_stats}, {
      "stage": "bissl", "seed": seed, "arch": ctx.config.model.arch,
      "task": ctx.config.pretext.task, "alternations": cfg.alternations,
      "downstream_dataset": ctx.config.data.downstream_dataset,
      "image_size": ctx.image_size,
      provenance.RECORD_KEY: provenance.with_lineage(prov, directory).record()})
  return BisslOutput(params, batch_stats, state)


@jax.jit
def _squared_norm(tree) -> jax.Array:
  return sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree_util.tree_leaves(tree))


def blame_lam_if_unstable(t: int, *, lam: float, lower_lr: float, momentum: float) -> None:
  """Raises a NonFiniteError blaming ``bissl.lam`` if the regulariser alone diverges.

  The lower level descends ``L_P(θ_P) + λ/2 ‖θ_P − θ_D‖²`` (paper Eq. 5). LARS
  moves the biases and normalisation parameters by plain SGD with heavy-ball
  momentum β (no trust ratio); on the regulariser alone that multiplies their gap
  ``θ_P − θ_D`` by a factor of magnitude above 1 once ``η·λ > 2(1 + β)`` (η the
  peak lower LR): every lower step then amplifies the gap, whatever the loss does.
  After a divergence, that is the evidence against λ rather than the step sizes -
  when λ alone is out of range: unstable even at a lower LR of 1 (an ordinary LARS
  LR), ``λ > 2(1 + β)``. A far too large LR with an ordinary λ is the LR's fault
  (:func:`blame_lower_if_it_overflowed`, ``train_state.raise_if_nonfinite``).
  """
  bound = 2.0 * (1.0 + momentum)
  if not (lower_lr * lam > bound and lam > bound):
    return
  raise NonFiniteError(
      f"BiSSL diverged at alternation {t}: with config.bissl.lam={lam:.3g} the lower "
      f"level's steps on the regulariser λ/2‖θ_P − θ_D‖² are unstable (lower_lr·λ = "
      f"{lower_lr * lam:.3g} > 2(1 + lower_momentum) = {bound:.3g}), so θ_P − θ_D grows "
      f"every step. Nothing was checkpointed for this alternation. Lower config.bissl.lam "
      f"below {bound / lower_lr:.3g} (or config.bissl.lower_lr below {bound / lam:.3g}).",
      field="bissl.lam", suggestion=bound / lower_lr / 2)


def blame_lower_if_it_overflowed(state: bilevel.BilevelState, t: int, lower_lr: float) -> None:
  """Raises the lower level's NonFiniteError if θ_P, though finite, overflows the upper level.

  A far too large lower LR leaves θ_P finite but huge (|θ| ~ 1e29): the lower loss
  stays finite and only the upper level's regulariser ‖θ_D − θ_P‖² overflows, so
  the upper level alone would be flagged and blamed.
  """
  lower_params, _ = ts.lower_result(state)
  if bool(np.isfinite(np.asarray(_squared_norm(lower_params)))):
    return
  raise NonFiniteError(
      f"The lower-level parameters (θ_P, φ_P) grew so large at BiSSL alternation {t} that "
      f"their squared norm overflows (non-finite), which made the upper level's "
      f"regulariser non-finite. Nothing was checkpointed for this alternation. Lower "
      f"config.bissl.lower_lr (now {lower_lr:.3g}).",
      field="bissl.lower_lr")


def warn_if_residual_above_one(name: str, t: int, metrics: dict) -> list:
  """Prints one explanation when the solve's relative residual exceeds 1; returns [True] then."""
  residual = float(np.mean(metrics["cg_residual"]))  # NaN when no step checked it
  if not residual > 1.0:
    return []
  if not parallel.is_writer():  # every process computed it; process 0 reports
    return [True]
  print(f"[{name}] warning: at alternation {t} the implicit-gradient solve's relative "
        f"residual ‖A·v_IG − v‖/‖v‖ is {residual:.3g} > 1, so v_IG is further from solving "
        f"the system than 0 is (smallest curvature seen "
        f"{float(np.min(metrics['cg_min_curvature'])):.3g}: the damped operator is likely "
        f"indefinite). This is how the paper's solver behaves; to change it, try "
        f"config.bissl.solver='minres' (never worse than 0), "
        f"config.bissl.residual_guard=True (fall back to first order) or a larger "
        f"config.bissl.damping. Shown once per stage.", flush=True)
  return [True]


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
