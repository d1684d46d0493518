"""Branches of a run: continue a diverged run from its last good checkpoint with a new value.

``bissl-jax run ... --workdir=NEW --branch_from=OLD --config.bissl.lower_lr=0.05``
(``run(config, NEW, branch_from=OLD)``) copies the finished artifacts and the
checkpoints of ``OLD`` into the new run directory ``NEW`` and records its parent in
``NEW/branch.json``. The rerun then follows the provenance rule: finished stage
outputs whose fingerprint still matches are reused; stale ones are recomputed. A
stage that was unfinished in the parent (a checkpoint, no output) is marked with
``<stage dir>/branch.json``; when its checkpoint differs from the new config in
config fields only (not in its inputs), the stage loop *adopts* it once
(:func:`adopt`): it resumes from that step with the new values and from then on
carries ``branch = {'parent', 'step'}`` in its fingerprint and in its output's
provenance, so a branched result is never mistaken for an unbranched one.
"""
import json
import os
import shutil
import time
from typing import Optional

from bissl_jax.config_validation import ConfigError
from bissl_jax.runtime import mesh

BRANCH_FILE = "branch.json"
# What a branch does not copy: the parent's results and derived files.
_NOT_COPIED = ("run.lock", "results.json", "results.md", "plots", "tensorboard",
               "wall_times.json", "superseded", BRANCH_FILE)


def start(parent: str, workdir: str) -> bool:
  """Creates the branch ``workdir`` of ``parent`` (nothing if it already is one).

  Returns:
    True if the branch was created now, False if ``workdir`` already was that branch.

  Raises:
    ConfigError: ``parent`` holds no run, ``workdir`` is ``parent``, or ``workdir``
      already holds another run.
  """
  parent, workdir = os.path.abspath(parent), os.path.abspath(workdir)
  if parent == workdir:
    raise ConfigError(f"--branch_from={parent} is the --workdir itself; give the branch a "
                      f"new --workdir (e.g. {parent}-branch1).")
  if not os.path.exists(os.path.join(parent, "config.json")):
    raise ConfigError(f"--branch_from={parent}: no run there (no config.json).")
  record = _read(os.path.join(workdir, BRANCH_FILE))
  if record is not None:
    if record.get("parent") != parent:
      raise ConfigError(f"--workdir={workdir} is a branch of {record.get('parent')}, not of "
                        f"{parent}.")
    return False
  if os.path.exists(os.path.join(workdir, "config.json")):
    raise ConfigError(f"--workdir={workdir} already holds a run; a branch needs a new one.")
  # Every process has checked the same files above before process 0 copies (the copy
  # brings a config.json); the others wait until it is there.
  mesh.sync_processes("branch-checked")
  if mesh.is_writer():
    _copy(parent, workdir)
  mesh.sync_processes("branch-created")
  return True


def _copy(parent: str, workdir: str) -> None:
  shutil.copytree(parent, workdir, dirs_exist_ok=True,
                  ignore=lambda d, names: [n for n in names if n in _NOT_COPIED
                                           or n.endswith(".corrupt")])
  for root, dirs, _ in os.walk(workdir):
    if "ckpt" in dirs and "output" not in dirs:  # an unfinished stage of the parent
      _write(os.path.join(root, BRANCH_FILE),
             {"parent": os.path.join(parent, os.path.relpath(root, workdir)),
              "adopted": None})
  _write(os.path.join(workdir, BRANCH_FILE),
         {"parent": parent, "created": time.strftime("%Y-%m-%d %H:%M:%S")})
  print(f"Branched {parent} into {workdir}: finished stages are reused where their "
        f"config still matches; an unfinished one resumes from its last checkpoint with "
        f"the new values.", flush=True)


def lineage(stage_dir: str) -> Optional[dict]:
  """``{'parent', 'step'}`` if the stage in ``stage_dir`` resumed from a parent's checkpoint."""
  record = _read(os.path.join(stage_dir, BRANCH_FILE))
  return None if record is None else record.get("adopted")


def adopt(stage_dir: str, step: int, changed: list) -> Optional[dict]:
  """Adopts the parent's checkpoint of this stage once, if it is a branch point.

  Only a checkpoint that differs in config fields (not in its inputs, which would
  mean an upstream stage changed) is adopted.

  Returns:
    The lineage ``{'parent', 'step'}`` now in force, or None if not adoptable.
  """
  path = os.path.join(stage_dir, BRANCH_FILE)
  record = _read(path)
  if record is None or record.get("adopted") is not None:
    return None
  if any(k.startswith("input.") for k in changed):
    return None
  record["adopted"] = {"parent": record["parent"], "step": int(step)}
  record["changed"] = list(changed)
  # Every process has read the record (and so adopts) before process 0 rewrites it.
  mesh.sync_processes("branch-adopt")
  if mesh.is_writer():
    _write(path, record)
  return record["adopted"]


def _read(path: str) -> Optional[dict]:
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def _write(path: str, record: dict) -> None:
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(record, f, indent=2, sort_keys=True)
  os.replace(tmp, path)
