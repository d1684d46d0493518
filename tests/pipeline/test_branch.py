"""A branch resumes the parent's last good checkpoint with the changed value, and says so.

The toy stage of ``test_stage_loop`` diverges at step 9 (steps 3 and 6 saved). Its
branch (``branch.start``) runs the same stage with another ``toy.lr`` in the
fingerprint and clean data: it adopts step 6, finishes, records the branch point in
its checkpoints, and a rerun of the branch resumes without any complaint.
"""
import json
import os

import pytest

from bissl_jax.config_validation import ConfigError
from bissl_jax.runtime.errors import NonFiniteError
from bissl_jax.pipeline import branch
from bissl_jax.pipeline import checkpoint
from test_stage_loop import Toy, _fresh, _run, _stage, _steps


def _parent(tmp_path):
  parent = str(tmp_path / "parent")
  stage_dir = os.path.join(parent, "seed0", "toy")
  with pytest.raises(NonFiniteError):
    _run(_stage(stage_dir, data=Toy(poison_after=7), checkpoint_every=1))
  assert _steps(stage_dir) == [3, 6]
  with open(os.path.join(parent, "config.json"), "w") as f:
    json.dump({"toy": {"lr": 0.5}}, f)
  return parent


def test_a_branch_adopts_the_parents_last_good_step(tmp_path):
  parent = _parent(tmp_path)
  child = str(tmp_path / "child")
  assert branch.start(parent, child)
  stage_dir = os.path.join(child, "seed0", "toy")
  result, out = _run(_stage(stage_dir, checkpoint_every=1, fingerprint={"toy.lr": 0.1}))
  assert "branch: resuming the parent's step 6" in out and "['toy.lr']" in out
  assert result.resumed_from == 6 and result.steps_done == 12
  record = json.load(open(os.path.join(stage_dir, branch.BRANCH_FILE)))
  assert record["adopted"] == {"parent": os.path.join(parent, "seed0", "toy"), "step": 6}
  ckpt = checkpoint.RunCheckpointer(os.path.join(stage_dir, "ckpt"))
  _, extra = ckpt.restore(_fresh())
  ckpt.close()
  assert extra["config"]["branch"]["step"] == 6 and extra["config"]["toy.lr"] == 0.1
  # The parent is untouched, and rerunning the branch resumes its own checkpoint.
  assert _steps(os.path.join(parent, "seed0", "toy")) == [3, 6]
  result, out = _run(_stage(stage_dir, checkpoint_every=1, fingerprint={"toy.lr": 0.1}))
  assert "branch:" not in out and "afresh" not in out, out
  assert result.resumed_from == 9  # the last periodic step (save_last is off)


def test_a_branch_needs_a_new_directory_and_a_parent(tmp_path):
  parent = _parent(tmp_path)
  with pytest.raises(ConfigError, match="new --workdir"):
    branch.start(parent, parent)
  with pytest.raises(ConfigError, match="no run there"):
    branch.start(str(tmp_path / "nothing"), str(tmp_path / "x"))
  child = str(tmp_path / "child")
  assert branch.start(parent, child) and not branch.start(parent, child)  # idempotent
