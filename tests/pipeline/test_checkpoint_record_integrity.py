"""The checkpoint checksum covers all of a step: state, ``extra`` and iterator states.

The toy stage of ``test_stage_loop`` is interrupted after step 10 (steps 6 and 10
on disk). Editing step 10's step counter or data cursor used to resume silently
from other positions; now the step is set aside and step 6 is resumed, ending
bit-identical to an uninterrupted run. A step written before the whole-step
checksum existed still resumes.
"""
import json
import os
import shutil

import pytest

from bissl_jax.pipeline import checkpoint
from test_checkpoint_integrity import _extra_file, interrupted  # noqa: F401  (fixture)
from test_stage_loop import _assert_same, _fresh, _run, _stage


def _edit_extra(directory, step, edit):
  path = _extra_file(os.path.join(directory, "ckpt", str(step)))
  record = json.load(open(path))
  edit(record)
  json.dump(record, open(path, "w"))
  return record


def _copy(interrupted, tmp_path):  # noqa: F811
  source, final = interrupted
  directory = str(tmp_path / "run")
  shutil.copytree(source, directory)
  return directory, final


@pytest.mark.parametrize("edit", ["steps", "cursor"])
def test_an_edited_step_record_is_set_aside(interrupted, tmp_path, edit):  # noqa: F811
  directory, final = _copy(interrupted, tmp_path)

  def change(record):
    if edit == "steps":
      record["steps"] += 1
    else:
      record["data"]["stack"]["cursor"] = (record["data"]["stack"]["cursor"] + 1) % 3
  _edit_extra(directory, 10, change)
  result, out = _run(_stage(directory))
  assert "checkpoint step 10 in" in out and "does not match its checksum" in out, out
  assert "falling back to step 6" in out and result.resumed_from == 6
  _assert_same(result.state, final)


def test_edited_iterator_states_are_set_aside(interrupted, tmp_path):  # noqa: F811
  directory, final = _copy(interrupted, tmp_path)
  ckpt = checkpoint.RunCheckpointer(os.path.join(directory, "ckpt"))
  state, extra = ckpt.restore(_fresh(), 10)
  ckpt.save(11, state, dict(extra), iterators={"grain": {"position": 3}})
  ckpt.close()
  iterators = os.path.join(directory, "ckpt", "11", checkpoint.ITERATORS)
  (path,) = [os.path.join(iterators, f) for f in os.listdir(iterators)
             if not f.endswith("commit_success.txt")]
  json.dump({"grain": {"position": 0}}, open(path, "w"))
  ckpt = checkpoint.RunCheckpointer(os.path.join(directory, "ckpt"))
  try:
    with pytest.raises(checkpoint.CorruptCheckpointError, match="iterator states"):
      ckpt.restore(_fresh(), 11)
    assert ckpt.restore(_fresh(), 10)[1]["steps"] == 10
  finally:
    ckpt.close()


def test_a_step_written_without_the_record_checksum_still_resumes(interrupted, tmp_path):  # noqa: F811
  directory, final = _copy(interrupted, tmp_path)
  record = _edit_extra(directory, 10, lambda r: r.pop("record_checksum"))
  assert "checksum" in record  # the older format: the state's checksum alone
  result, out = _run(_stage(directory))
  assert "unusable" not in out and result.resumed_from == 10
  _assert_same(result.state, final)


def test_the_record_checksum_is_written_with_each_step(interrupted):  # noqa: F811
  source, _ = interrupted
  record = json.load(open(_extra_file(os.path.join(source, "ckpt", "10"))))
  assert len(record["record_checksum"]) == 64
  assert record["record_checksum"] == checkpoint.record_checksum(
      record["checksum"], record, {})
