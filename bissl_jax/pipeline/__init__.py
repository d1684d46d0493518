"""The end-to-end BiSSL pipeline: pretext → head warm-up → BiSSL → fine-tuning → test.

``run(config, workdir)`` is the single entry point (``python -m experiments.main``
calls it); see ``docs/pipeline.md``. The stage modules can also be used on their
own: :mod:`.pretrain`, :mod:`.supervised`, :mod:`.bissl_stage`, :mod:`.search`,
:mod:`.checkpoint`, :mod:`.logging`, :mod:`.results`.
"""
from bissl_jax.pipeline.runner import run

__all__ = ["run"]
