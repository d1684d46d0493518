"""The one training loop of the pipeline: every stage is a step function handed to it.

:func:`run_stage` does, in one place, what every stage needs:

* **restore or start fresh**: the latest checkpoint of ``<stage>/ckpt`` if there is
  one (after checking that it was written with the same config fingerprint), else
  the fresh state it is given; it says when it resumes;
* **progress** with rate and ETA (:class:`~bissl_jax.pipeline.run_log.Progress`) and
  **metric logging** every ``log_every`` steps and at the last one (records of steps
  that a resume redoes are dropped first, so each step has one record);
* **non-finite stop**: the loss (on every logged step), the parameters and the
  whole state - statistics such as BatchNorm running variances, optimizer state,
  tracked values such as the best validation loss (at every epoch end, so before
  every checkpoint) - must be finite; otherwise
  :class:`~bissl_jax.runtime.errors.NonFiniteError` names the stage, the step, what became
  non-finite and the field to change. Nothing non-finite is ever saved or resumed;
* **checkpoints** every ``checkpoint_every`` epochs (and after the last step with
  ``save_last``), and **on interrupt**: Ctrl-C or SIGTERM asks the loop to stop after
  the current step; it saves that step, says how to resume and re-raises
  ``KeyboardInterrupt``. A second signal stops at once (the last completed step is
  still saved). An interrupted or failed stage prints no ``done`` line.

A stage is a :class:`Stage`: its step function ``step(state, i, batch) -> (state,
metrics)``, its data (:class:`EpochData`, or anything with ``batch``/``position``/
``restore``), an optional ``end_of_epoch`` hook (fine-tuning's validation and
best-epoch bookkeeping) and its checkpoint settings. The state is any pytree; the
stages use the training core's :class:`bissl_jax.core.state.LevelState` (parameters,
statistics, optimizer state, step counter) for each level they train.

A resumed stage ends bit-identical to an uninterrupted one: the state, the data
position (the stack position at the start of the current epoch plus the steps done)
and the step counter are saved together, and every step's randomness is
``fold_in(key, step)``.
"""
import contextlib
import dataclasses
import json
import os
import re
from typing import Any, Callable, Mapping, NamedTuple, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from bissl_jax.runtime.errors import NonFiniteError
from bissl_jax.pipeline import branch
from bissl_jax.pipeline import checkpoint
from bissl_jax.pipeline import compile_watch
from bissl_jax.pipeline import run_log
from bissl_jax.pipeline.epoch_data import (EpochData, StageData, epoch_data,  # noqa: F401
                                          restore_stack, stack_position)
from bissl_jax.pipeline import stop_signals
from bissl_jax.pipeline.stop_signals import StopRequested, install_stop_handlers  # noqa: F401
from bissl_jax.types import PyTree


@dataclasses.dataclass
class Stage:
  """One training stage for :func:`run_stage`.

  Attributes:
    name: label of logs, progress lines and messages, e.g. ``'pretext/seed0'``.
    total_steps: steps of the whole stage.
    step: ``step(state, i, batch) -> (state, metrics)``; ``metrics`` may stay on device.
    data: the stage's batches (:class:`EpochData` or another :class:`StageData`).
    logger: metric logger (None: log nothing).
    log_every: steps between metric records (and loss checks); the last step is
      always logged.
    steps_per_epoch: steps per epoch, the unit of ``checkpoint_every``, of the
      parameter check and of ``end_of_epoch``.
    end_of_epoch: ``hook(state, epochs_done) -> state`` after every epoch's
      parameter check, before its checkpoint.
    checkpoint_dir: where run checkpoints go; None keeps none.
    checkpoint_every: epochs between checkpoints (0: only on interrupt).
    save_last: also save after the last step.
    fingerprint: the config values the stage's result depends on (dotted names);
      a checkpoint written with other values is not resumed.
    reuse: what a checkpoint with another fingerprint gets: ``'strict'`` refuses
      (ConfigError), ``'recompute'`` sets it aside and starts the stage afresh.
    place: applied to the state before the first step (e.g. replicate on the mesh).
    params_to_check: ``fn(state) -> {what: (params, fix[, field])}``: trees that
      must stay finite, the advice when one does not and the config field to blame
      (default: the first ``config.<field>`` the advice names). Also checked on every
      restored checkpoint, which is never resumed when it fails.
    state_to_check: ``fn(state) -> tree``: the part of the state that must be
      finite, beyond the parameters, before every save and in every restored
      checkpoint (default: the whole state; fine-tuning leaves out its "no best
      epoch yet" -inf/inf record). Only floating-point leaves are checked.
    loss_key: metric that must stay finite on logged steps (None: not checked).
    loss_fix: advice when it does not.
    on_divergence: if given, a non-finite value stops the stage quietly:
      ``on_divergence(state, error)`` is called and :func:`run_stage` returns
      (random-search trials, whose sampled learning rates may be too large).
    show: ``{label: metric key}`` shown on the progress line.
    unit: the name of a step ('step', 'alt').
    items_per_step: examples per step, for the images/s figure.
    callback: ``callback(steps_done, state, metrics)`` after every step (and its
      checkpoint); an exception raised there stops the stage like a crash.
  """
  name: str
  total_steps: int
  step: Callable[[Any, int, Any], Tuple[Any, Mapping[str, Any]]]
  data: StageData
  logger: Optional[run_log.MetricLogger] = None
  log_every: int = 1
  steps_per_epoch: int = 1
  end_of_epoch: Optional[Callable[[Any, int], Any]] = None
  checkpoint_dir: Optional[str] = None
  checkpoint_every: int = 0
  save_last: bool = False
  fingerprint: Optional[Mapping[str, Any]] = None
  reuse: str = "strict"
  place: Callable[[Any], Any] = lambda state: state
  params_to_check: Optional[Callable[[Any], Mapping[str, Tuple[PyTree, str]]]] = None
  state_to_check: Optional[Callable[[Any], PyTree]] = None
  loss_key: Optional[str] = "loss"
  loss_fix: str = ""
  on_divergence: Optional[Callable[[Any, NonFiniteError], None]] = None
  show: Mapping[str, str] = dataclasses.field(default_factory=lambda: {"loss": "loss"})
  unit: str = "step"
  items_per_step: int = 0
  callback: Optional[Callable[[int, Any, Mapping[str, Any]], None]] = None


class StageResult(NamedTuple):
  """What :func:`run_stage` returns.

  Attributes:
    state: the final state (the last good one after a quiet divergence stop).
    steps_done: steps completed.
    resumed_from: the step the stage resumed at (0 when it started fresh).
    diverged: the :class:`NonFiniteError` that stopped it quietly, else None.
  """
  state: Any
  steps_done: int
  resumed_from: int
  diverged: Optional[NonFiniteError]


def _inexact(x) -> bool:
  # Integer counters and typed PRNG keys are always "finite" (and isfinite rejects keys).
  return jnp.issubdtype(jnp.result_type(x), jnp.inexact)


# Leaves are checked in groups of at most this many entries, each group flattened into one
# array and reduced by one kernel: a state of a few hundred leaves then compiles to a
# handful of kernels instead of one reduction per leaf (at XLA's lowest optimisation, 0.14
# against 0.48 s for 240 leaves), while the copy a group makes stays small (16 MB in float32).
_GROUP_ENTRIES = 1 << 22


def _leaf_groups(leaves):
  groups, current, size = [], [], 0
  for x in leaves:
    if current and size + x.size > _GROUP_ENTRIES:
      groups.append(current)
      current, size = [], 0
    current.append(x)
    size += x.size
  return groups + [current] if current else groups


@jax.jit
def _all_finite(tree) -> jax.Array:
  leaves = [x for x in jax.tree_util.tree_leaves(tree) if _inexact(x)]
  flags = [jnp.all(jnp.isfinite(jnp.concatenate([jnp.ravel(x) for x in group])))
           for group in _leaf_groups(leaves)]
  return jnp.all(jnp.stack(flags)) if flags else jnp.bool_(True)


def is_finite(tree: PyTree) -> bool:
  """True if every entry of every floating-point leaf of ``tree`` is finite."""
  return bool(jax.device_get(_all_finite(tree)))


def nonfinite_parts(tree: PyTree, limit: int = 3) -> str:
  """Names the leaves of ``tree`` holding NaN/Inf: ``"['bn']['var'] (11 of 64 entries, inf)"``."""
  found = []
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    if not _inexact(leaf):
      continue
    x = np.asarray(jax.device_get(leaf))
    bad = ~np.isfinite(x)
    if bad.any():
      kinds = "/".join(k for k, m in (("nan", np.isnan(x)), ("inf", np.isinf(x))) if m.any())
      found.append(f"{jax.tree_util.keystr(path) or 'value'} ({int(bad.sum())} of {x.size} "
                   f"entries, {kinds})")
  more = f" and {len(found) - limit} more" if len(found) > limit else ""
  return ", ".join(found[:limit]) + more


def _normalise(record) -> Any:
  return json.loads(json.dumps(record, sort_keys=True, default=str))


def _fingerprint_changes(fingerprint: Optional[dict], extra: dict) -> list:
  if fingerprint is None:
    return []
  saved = extra.get("config") or {}
  return sorted(k for k in set(fingerprint) | set(saved)
                if fingerprint.get(k) != saved.get(k))


def _refuse_or_set_aside(stage: Stage, changed: list, directory: str) -> None:
  """A checkpoint of other config values: refuse (strict) or move it aside (recompute)."""
  from bissl_jax.config_validation import ConfigError  # pylint: disable=g-import-not-at-top
  from bissl_jax.pipeline import provenance  # pylint: disable=g-import-not-at-top
  if stage.reuse != "recompute":
    raise ConfigError(
        f"The checkpoint in {directory} was written with different config fields "
        f"{changed}; resuming would mix two runs. Restore those values, use a fresh "
        f"--workdir, or let the stage start again (config.reuse='recompute').")
  moved = provenance.set_aside(os.path.dirname(directory), [directory])
  print(f"[{stage.name}] the checkpoint in {directory} was written with other values of "
        f"{changed}: starting this stage afresh (the old checkpoint is kept in {moved}).",
        flush=True)


def _check_params(stage: Stage, state, where: str, source: Optional[str] = None) -> None:
  """Raises NonFiniteError if a tree of ``stage.params_to_check(state)`` is not finite.

  ``source`` (e.g. a loaded checkpoint) replaces the stage's advice: then the
  learning rates are not to blame.
  """
  checks = dict(stage.params_to_check(state)) if stage.params_to_check is not None else {}
  # Then the rest of the state (statistics, optimizer state, tracked losses): a
  # checkpoint with inf BatchNorm variances is no "last good checkpoint".
  rest = state if stage.state_to_check is None else stage.state_to_check(state)
  checks["values in the state"] = (rest, stage.loss_fix)
  for what, (tree, fix, *field) in checks.items():
    if not is_finite(tree):
      parts = nonfinite_parts(tree)
      if source is not None:
        raise NonFiniteError(f"Non-finite {what} {where} of {stage.name} ({parts}): {source}.")
      raise NonFiniteError(f"Non-finite {what} {where} of {stage.name} ({parts}); nothing "
                           f"of it was saved. {fix}".rstrip(),
                           field=(field or [_field_in(fix)])[0])


def _field_in(fix: str) -> Optional[str]:
  """The first ``config.<field>`` an advice names (the field a branch would change)."""
  found = re.search(r"config\.([A-Za-z_][\w.]*[A-Za-z0-9_])", fix or "")
  return found.group(1) if found else None


def _arrays_deleted(tree) -> bool:
  # A state donated to a step that was interrupted mid-call can no longer be read.
  return any(isinstance(x, jax.Array) and x.is_deleted() for x in jax.tree_util.tree_leaves(tree))


def run_stage(stage: Stage, state: PyTree) -> StageResult:
  """Runs (or resumes) ``stage`` from the fresh ``state``; see the module docstring.

  Args:
    stage: the stage.
    state: the fresh state (also the structure a checkpoint is restored into).

  Returns:
    A :class:`StageResult`.

  Raises:
    NonFiniteError: a checked value became non-finite (unless ``on_divergence``).
    KeyboardInterrupt: Ctrl-C or SIGTERM; the last completed step was saved.
    ConfigError: the checkpoint was written with another config fingerprint.
  """
  total, unit = int(stage.total_steps), stage.unit
  ckpt = checkpoint.RunCheckpointer(stage.checkpoint_dir) if stage.checkpoint_dir else None
  fingerprint = None if stage.fingerprint is None else _normalise(dict(stage.fingerprint))
  stage_dir = os.path.dirname(os.path.abspath(stage.checkpoint_dir or "."))
  if fingerprint is not None and branch.lineage(stage_dir) is not None:
    fingerprint["branch"] = branch.lineage(stage_dir)  # resumed from a parent run's step
  last_saved = -1
  progress = None
  completed, diverged = False, None
  try:
    ckpt, state, done, resumed = _resume(stage, ckpt, state, fingerprint, stage_dir)
    if resumed:
      last_saved = done
    resumed_from = done
    if stage.logger is not None:
      stage.logger.forget_after(stage.name, done)  # steps past the checkpoint are redone
    state = stage.place(state)
    # (steps done, state, data position) always change together in one assignment (of
    # cell[0]), so whatever stops the loop, inside a step's epoch end or callback too,
    # sees a consistent triple to save.
    cell = [(done, state, stage.data.position(done))]

    def save(count, saved_state, position):
      nonlocal last_saved
      position, iterators = _split_iterators(position)
      ckpt.save(count, saved_state, {"steps": count, "data": position, "config": fingerprint},
                iterators=iterators)
      last_saved = count

    def check_params(saved_state, count):
      _check_params(stage, saved_state, f"after {unit} {count} of {total}")

    progress = run_log.Progress(total, stage.name, initial=done, unit=unit,
                                items_per_step=stage.items_per_step)
    with stop_signals.deferred_signals(stage.name) as stop_requested:
      try:
        if stop_requested() and stop_signals.take_pending():  # received between stages
          raise StopRequested(f"stop requested before {unit} {done + 1}")
        while cell[0][0] < total:
          _one_step(stage, cell, resumed_from, progress, ckpt, save, check_params)
          if stop_requested() and stop_signals.take_pending():  # honoured here
            raise StopRequested(f"stop requested after {unit} {cell[0][0]}")
        completed = True
      except NonFiniteError as err:
        if stage.on_divergence is None:
          raise
        diverged = err
        stage.on_divergence(cell[0][1], err)
      except KeyboardInterrupt:
        _save_on_interrupt(stage, ckpt, cell[0], last_saved, save, check_params)
        raise
  finally:
    if progress is not None:
      progress.close(completed=completed)
    if ckpt is not None:
      ckpt.close()
    if hasattr(stage.data, "close"):  # streamed data: stop its worker processes
      stage.data.close()
  return StageResult(cell[0][1], cell[0][0], resumed_from, diverged)


def _resume(stage: Stage, ckpt, state, fingerprint, stage_dir):
  """``(checkpointer, state, steps done, resumed)``: the latest good checkpoint, else the
  fresh state.

  A step that does not read back intact, or holds non-finite parameters, is set aside
  and the previous one tried (never resumed into). A step of another config is adopted
  as a branch, or refused or set aside (``config.reuse``).
  """
  good = None
  if ckpt is not None and ckpt.latest_step() is not None:
    good = ckpt.restore_good(state, name=stage.name, check=lambda s: _check_params(
        stage, s, "in the checkpoint", "a corrupt or diverged checkpoint"))
  changed = [] if good is None else _fingerprint_changes(fingerprint, good[2])
  adopted = changed and branch.adopt(stage_dir, good[0], changed)
  if adopted:
    fingerprint["branch"] = _normalise(adopted)
    print(f"[{stage.name}] branch: resuming the parent's {stage.unit} {good[0]} "
          f"({adopted['parent']}) with new values of {changed}.", flush=True)
  elif changed:
    ckpt.close()
    _refuse_or_set_aside(stage, changed, ckpt.directory)
    ckpt, good = checkpoint.RunCheckpointer(stage.checkpoint_dir), None
  if good is None:
    return ckpt, state, 0, False
  good_step, restored, extra = good
  done = int(extra["steps"])
  # The iterators of the step that read back intact (maybe an earlier fallback).
  stage.data.restore(_join_iterators(extra["data"], ckpt.restore_iterators(good_step)), done)
  print(f"[{stage.name}] resuming at {stage.unit} {done} of {int(stage.total_steps)} from "
        f"{ckpt.directory}", flush=True)
  return ckpt, restored, done, True


def _one_step(stage: Stage, cell: list, resumed_from: int, progress, ckpt, save,
              check_params) -> None:
  """Step ``cell[0][0] + 1``: the step, its log line, and the epoch's end when it is one.

  ``cell[0]`` is the committed ``(steps done, state, data position)``, updated as soon as
  each part is done (before the epoch-end checks and hooks, as before the callback).
  """
  total, spe, unit = int(stage.total_steps), max(1, int(stage.steps_per_epoch)), stage.unit
  i, state, _ = cell[0]
  # The session's first step compiles; nothing since the checkpoint is unsaved.
  with (compile_watch.nothing_unsaved(stage.name) if i == resumed_from
        else contextlib.nullcontext()):
    state, metrics = stage.step(state, i, stage.data.batch(i))
  n = i + 1
  postfix = {}
  if n % stage.log_every == 0 or n == total:
    metrics = jax.device_get(metrics)
    if stage.loss_key is not None and not np.all(np.isfinite(metrics[stage.loss_key])):
      raise NonFiniteError(
          f"Non-finite {stage.loss_key} at {unit} {n} of {total} of {stage.name}; "
          f"nothing of it was saved. {stage.loss_fix}".rstrip(),
          field=_field_in(stage.loss_fix))
    if stage.logger is not None:
      stage.logger.write(stage.name, n, metrics)
    postfix = {label: metrics[key] for label, key in stage.show.items() if key in metrics}
  cell[0] = (n, state, stage.data.position(n))
  progress.update(1, **postfix)
  if n % spe == 0:
    check_params(state, n)
    if stage.end_of_epoch is not None:
      state = stage.end_of_epoch(state, n // spe)
      cell[0] = (n, state, cell[0][2])
    epochs = n // spe
    if ckpt is not None and (
        (stage.checkpoint_every and epochs % stage.checkpoint_every == 0 and n < total)
        or (stage.save_last and n == total)):
      save(n, state, cell[0][2])
  if stage.callback is not None:
    stage.callback(n, state, metrics)


# Streamed data (``bissl_jax.data.grain_stream``) puts its iterators' states under this
# key of its position; they are saved as the checkpoint's own item.
def _split_iterators(position: dict) -> Tuple[dict, Optional[dict]]:
  position = dict(position)
  return position, position.pop(checkpoint.ITERATORS, None)


def _join_iterators(position: dict, iterators: dict) -> dict:
  return {**position, checkpoint.ITERATORS: iterators} if iterators else position


def _save_on_interrupt(stage: Stage, ckpt, committed, last_saved: int, save, check_params):
  count, state, position = committed
  where = f"{stage.unit} {count} of {stage.total_steps}"
  if ckpt is None:
    print(f"[{stage.name}] interrupted at {where}; this stage keeps no checkpoints, so a "
          f"rerun starts it again.", flush=True)
    return
  if count == 0:
    print(f"[{stage.name}] interrupted before its first {stage.unit} finished; nothing to "
          f"save.", flush=True)
    return
  if count > last_saved:
    if _arrays_deleted(state):
      print(f"[{stage.name}] interrupted inside a step: {where} could not be saved; a "
            f"rerun resumes from the last checkpoint in {ckpt.directory}.", flush=True)
      return
    try:
      check_params(state, count)
    except NonFiniteError as err:
      print(f"[{stage.name}] interrupted; not saving {where}: {err}", flush=True)
      return
    save(count, state, position)
  print(f"[{stage.name}] interrupted: {where} is saved in {ckpt.directory}; rerun the same "
        f"command (same --workdir) to resume from it.", flush=True)
