"""``run(config, workdir)``: from a config to a finished run (BiSSL paper Fig. 1, §4.2).

``run`` validates and resolves the config, opens the data (a missing dataset fails
here, before any compute), builds the context and runs ``config.stages``:

* ``'all'``: the comparison of :mod:`bissl_jax.pipeline.comparison`, then
  ``results.{json,md}`` and the training-curve plots;
* a single stage (:func:`run_single_stage`), reading the previous stage's exported
  output from the path fields named in ``bissl_jax.config_validation.STAGE_INPUTS``.

Directory layout (every stage resumes from, or skips to, what is already there)::

  workdir/config.json, metrics.jsonl, tensorboard/, results.{json,md}, plots/
  workdir/seed<s>/pretext/{ckpt,output}
  workdir/seed<s>/pretext_baseline/{ckpt,output}   (only with pretext.baseline_epochs)
  workdir/seed<s>/baseline/finetune/{ckpt,output,evaluation.json}
  workdir/seed<s>/bissl/head_warmup/{ckpt,output}
  workdir/seed<s>/bissl/bissl/{ckpt,output}
  workdir/seed<s>/bissl/finetune/{ckpt,output,evaluation.json}
  workdir/search/{baseline,bissl}.json
  workdir/<stage>/...        (single-stage runs)
"""
import contextlib
import copy
import json
import os
import sys
import time
from typing import Callable, Optional

import jax

from bissl_jax.runtime import cpu_kernels
from bissl_jax.config_validation import validate_config
from bissl_jax.convert import stage_output
from bissl_jax.pipeline import branch
from bissl_jax.pipeline import bissl_stage
from bissl_jax.pipeline import comparison
from bissl_jax.pipeline import invocation_clock
from bissl_jax.pipeline import compile_watch
from bissl_jax.pipeline import preflight
from bissl_jax.pipeline.provenance import digest_of
from bissl_jax.pipeline import results as results_lib
from bissl_jax.pipeline import supervised
from bissl_jax.pipeline import workdir_lock
from bissl_jax.pipeline.context import StageContext, build_context  # noqa: F401
from bissl_jax.pipeline.datasets import load_data
from bissl_jax.pipeline.inputs import check_inputs
from bissl_jax.pipeline.pretrain import pretrain
from bissl_jax.runtime import mesh as parallel


def run_single_stage(ctx: StageContext, stage: str, splits, pretext_set) -> dict:
  """Runs one stage for ``config.seed``; returns a small JSON record of what it wrote."""
  config, seed = ctx.config, ctx.config.seed
  if stage == "pretext":
    directory = ctx.path("pretext")
    pretrain(ctx, pretext_set, seed=seed, directory=directory)
    return {"stage": stage, "output": os.path.join(directory, "output")}
  if stage == "head_warmup":
    pre = comparison.load_pretext_model(ctx, config.pretext.checkpoint)
    directory = ctx.path("head_warmup")
    comparison.warmed_up_model(ctx, pre, splits["train"], seed=seed, directory=directory,
                               inputs={"pretext": digest_of(config.pretext.checkpoint)})
    return {"stage": stage, "output": os.path.join(directory, "output")}
  if stage == "bissl":
    warm, _ = stage_output.load_export(config.bissl.init_checkpoint)
    directory = ctx.path("bissl")
    bissl_stage.run_bissl(ctx, warm, pretext_set, splits["train"], seed=seed,
                          directory=directory, name=f"bissl/seed{seed}",
                          inputs={"head_warmup": digest_of(config.bissl.init_checkpoint)})
    return {"stage": stage, "output": os.path.join(directory, "output")}
  if stage == "finetune":
    variables, meta = stage_output.load_export(config.finetune.init_checkpoint)
    after_bissl = meta.get("stage") == "bissl"
    lr = config.finetune.bissl_lr if after_bissl else config.finetune.lr
    wd = config.finetune.bissl_weight_decay if after_bissl else config.finetune.weight_decay
    directory = ctx.path("finetune")
    record = comparison.finetune_and_evaluate(
        ctx, comparison.backbone_of(variables["params"], variables["batch_stats"]), splits,
        pipeline="bissl" if after_bissl else "baseline", lr=lr, weight_decay=wd, seed=seed,
        directory=directory, inputs={"backbone": digest_of(config.finetune.init_checkpoint)},
        pretext_head=variables["params"].get("pretext_head"))
    return dict(record, output=os.path.join(directory, "output"))
  if stage == "evaluate":
    variables, _ = stage_output.load_export(config.evaluate.checkpoint)
    params, stats = variables["params"], variables["batch_stats"]
    record = {"stage": stage, "checkpoint": config.evaluate.checkpoint,
              "validation": supervised.evaluate(ctx, params, stats, splits["validation"]),
              "test": supervised.evaluate(ctx, params, stats, splits["test"])}
    for split in ("validation", "test"):
      supervised.check_evaluation(
          record[split], f"the {split} evaluation of {config.evaluate.checkpoint}",
          "The loaded model is diverged or corrupt: evaluate another checkpoint.")
    results_lib.write_json(ctx.path("evaluate", "evaluation.json"), record)
    return record
  raise ValueError(f"Unknown stage {stage!r}.")


_NEEDS = preflight.NEEDS  # stage -> (pretext data, downstream data)


def with_reuse(config, reuse: str):
  """A copy of ``config`` with ``config.reuse = reuse``."""
  config = copy.deepcopy(config)
  unlock = getattr(config, "unlocked", None)
  with (unlock() if unlock is not None else contextlib.nullcontext()):
    config["reuse"] = reuse
  return config


def _write_config(workdir: str, config) -> None:
  if not parallel.is_writer():  # process 0 writes every file of the workdir
    return
  with open(os.path.join(workdir, "config.json"), "w") as f:
    f.write(config.to_json_best_effort(indent=2) if hasattr(config, "to_json_best_effort")
            else json.dumps(dict(config), indent=2, default=str))


def _has_earlier_run(workdir: str) -> bool:
  """Whether ``workdir`` holds saved work to resume: a checkpoint or a stage output.

  A config.json or a metrics log alone (a run stopped before its first save) is
  nothing to resume from, so the banner says "fresh" then.
  """
  if os.path.exists(os.path.join(workdir, "results.json")):
    return True
  for root, dirs, _ in os.walk(workdir):
    if any(name in ("output", "ckpt") and os.listdir(os.path.join(root, name))
           for name in dirs):
      return True
  return False


def banner(config, workdir: str, *, source: str, resumed: bool) -> str:
  """The start-up lines of a run: backend, devices, mesh, config, workdir, fresh/resumed."""
  devices = jax.devices()
  mesh = parallel.make_mesh()
  kinds = sorted({d.device_kind for d in devices})
  text = config.data.downstream_dataset in _text_datasets()
  size = f"{config.data.context} tokens" if text else f"{config.data.image_size} px"
  state = ("resumed: finished stages are loaded, an unfinished one continues from its "
           "checkpoint" if resumed else "fresh")
  return "\n".join([
      f"bissl-jax: backend {jax.default_backend()}, {len(devices)} device(s) "
      f"({', '.join(kinds)}), {jax.process_count()} process(es), mesh "
      + " x ".join(f"{name}={size}" for name, size in mesh.shape.items()),
      f"  config   {source} (stages={config.stages}, downstream "
      f"{config.data.downstream_dataset}, pretext {config.data.pretext_dataset}, "
      f"{size}, seeds {tuple(config.seeds)})",
      f"  workdir  {workdir} ({state})"]
      + ([f"  kernels  XLA:CPU {config.model.cpu_kernels} (config.model.cpu_kernels; "
          "docs/benchmarks/cpu_conv.md)"] if jax.default_backend() == "cpu" else []))


def _text_datasets():
  from bissl_jax.data import text_sets  # pylint: disable=g-import-not-at-top
  return text_sets.TEXT_DATASETS


def run(config, workdir: str, *, bissl_callback: Optional[Callable] = None,
        announce: Optional[str] = None, reuse: Optional[str] = None,
        branch_from: Optional[str] = None) -> dict:
  """Runs ``config.stages`` in ``workdir`` (resuming whatever is already there).

  Args:
    config: a pipeline ``ConfigDict`` (see ``configs/``).
    workdir: the run directory.
    bissl_callback: optional ``callback(alternations_done, state, metrics)`` called
      after every BiSSL alternation (tests use it to interrupt a run).
    announce: the config's name (e.g. its file); when given, a start-up banner
      (backend, devices, mesh, config, workdir, fresh or resumed) is printed once the
      config and the data are checked.
    reuse: overrides ``config.reuse``: ``'recompute'`` (a stage output or checkpoint
      written with other config values is set aside and recomputed, with everything
      downstream) or ``'strict'`` (refuse).
    branch_from: a parent run directory: ``workdir`` (new) becomes its branch
      (:mod:`bissl_jax.pipeline.branch`): its finished stages are reused where they
      still match, and an unfinished stage resumes from the parent's last good
      checkpoint with this config's values.

  Returns:
    For ``'all'`` the results record (also written to ``results.json`` and
    ``results.md``); for a single stage a record of its outputs.

  Raises:
    ConfigError: an invalid config field (before any compute), or
      ``preflight.InputsError``: an unusable workdir, missing datasets, weights or
      tokenizer, all named together before anything is written.
    NonFiniteError: training diverged; the last good checkpoint is kept.
    KeyboardInterrupt: Ctrl-C/SIGTERM; the running stage saved its last step.
  """
  start = time.time()
  if reuse is not None:
    config = with_reuse(config, reuse)
  config = validate_config(config)
  # What the stages record must be the kernels in use, not the ones asked for.
  notice = cpu_kernels.reconcile(config, jax.default_backend())
  if notice and announce is not None and parallel.is_writer():
    print(notice, file=sys.stderr, flush=True)
  workdir = os.path.abspath(workdir)
  resumed = _has_earlier_run(workdir)
  need_pretext, need_downstream = _NEEDS[config.stages]
  # Before the banner and before anything is written: every problem with the workdir,
  # the data, the weights and the tokenizer, named together (no workdir is left behind).
  preflight.check(config, workdir, branch_from=branch_from)
  splits, pretext_set = load_data(config, need_pretext, need_downstream)
  created = not os.path.exists(workdir)
  os.makedirs(workdir, exist_ok=True)
  # One writer per workdir (process 0 writes every file): a second run is refused.
  lock = workdir_lock.acquire(workdir) if parallel.is_writer() else None
  try:
    with compile_watch.cleanup_on_exit(lock.release if lock else lambda: None):
      return _run_stages(config, workdir, start=start, resumed=resumed, splits=splits,
                         pretext_set=pretext_set, announce=announce,
                         bissl_callback=bissl_callback, branch_from=branch_from)
  finally:
    if lock is not None:
      lock.release()
    if created and not os.listdir(workdir):  # refused before writing anything
      os.rmdir(workdir)


def _run_stages(config, workdir: str, *, start: float, resumed: bool, splits, pretext_set,
                announce: Optional[str], bissl_callback: Optional[Callable],
                branch_from: Optional[str]) -> dict:
  """The body of :func:`run` once the workdir is locked."""
  if branch_from is not None:
    resumed = branch.start(branch_from, workdir) or resumed
  _write_config(workdir, config)
  if announce is not None and parallel.is_writer():
    print(banner(config, workdir, source=announce, resumed=resumed), flush=True)
  ctx = build_context(config, workdir)
  finished = False
  # Written as it runs: a killed invocation's time still counts towards the total.
  clock = (invocation_clock.InvocationClock(workdir, start)
           if config.stages == "all" and parallel.is_writer() else None)
  try:
    check_inputs(ctx)  # every input checkpoint fits the model, before any compute
    if config.stages != "all":
      record = run_single_stage(ctx, config.stages, splits, pretext_set)
      if parallel.is_writer():  # one report per run, like the results table
        print(json.dumps(record, indent=2, default=str), flush=True)
      return record
    results = comparison.run_comparison(ctx, splits, pretext_set,
                                        bissl_callback=bissl_callback)
    finished = True
    if parallel.is_writer():
      # The original run's time survives reruns of a finished workdir (which only
      # reload the stage outputs); later invocations are listed separately.
      previous = results_lib.read_record(os.path.join(workdir, "results.json"), "results")
      invocations = clock.finish(True)
      results.update(results_lib.wall_times(invocations, previous))
    results["devices"] = f"{jax.device_count()} x {jax.devices()[0].platform}"
    if parallel.is_writer():
      print(results_lib.write_results(workdir, results), flush=True)
      ctx.logger.flush()
      results["plots"] = results_lib.plot_curves(workdir)
    return results
  finally:
    if clock is not None and not finished:
      clock.finish(False)
    ctx.logger.close()
