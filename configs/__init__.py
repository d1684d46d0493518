"""Experiment configs (ml_collections): ``--config=configs/<name>.py[:arg]``.

Each file has ``get_config(arg)`` and starts from :func:`configs.common.base_config`,
the one source of defaults. The files import ``configs.common``, so the repository
root must be importable: it is when running ``python -m experiments.main`` from the
repository root, always under ``experiments/main.py`` (which puts the root on the
path), and after ``pip install -e .`` (which installs this package).
"""
