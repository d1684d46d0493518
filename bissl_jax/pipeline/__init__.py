"""The end-to-end BiSSL pipeline: pretext → head warm-up → BiSSL → fine-tuning → test.

``run(config, workdir)`` is the single entry point (``python -m experiments.main``
calls it); see ``docs/pipeline.md`` for the module map. Every stage is a step
function handed to the one loop of :mod:`.stage_loop`: :mod:`.pretrain`,
:mod:`.supervised` (head warm-up, fine-tuning, evaluation), :mod:`.bissl_stage`.
Around them: :mod:`.context` (model, tasks, mesh), :mod:`.datasets`,
:mod:`.comparison` (baseline vs BiSSL over seeds), :mod:`.search`,
:mod:`.checkpoint`, :mod:`.run_log`, :mod:`.results`, :mod:`.runner` (``run``).
"""
from bissl_jax.pipeline.context import build_context
from bissl_jax.pipeline.datasets import load_data
from bissl_jax.pipeline.runner import run

__all__ = ["build_context", "load_data", "run"]
