"""Checkpoint integrity: a damaged or non-finite step is named, set aside, and the previous one used.

The toy stage of ``test_stage_loop`` is interrupted after step 10 (steps 6 and 10
are on disk); step 10 is then damaged in each way the reliability review found
trusted blindly. The rerun must say so, fall back to step 6 and still end
bit-identical to an uninterrupted run.
"""
import glob
import json
import os
import shutil

import jax.numpy as jnp
import numpy as np
import pytest

from bissl_jax.core.state import LevelState
from bissl_jax.pipeline import checkpoint
from test_stage_loop import _assert_same, _run, _stage, _steps, _stop_at


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory):
  """A stage directory holding steps 6 and 10, and the uninterrupted final state."""
  directory = str(tmp_path_factory.mktemp("interrupted"))
  with pytest.raises(KeyboardInterrupt):
    _run(_stage(directory, callback=_stop_at(10, KeyboardInterrupt())))
  assert _steps(directory) == [6, 10]
  full, _ = _run(_stage(str(tmp_path_factory.mktemp("full"))))
  return directory, full.state


def _largest_data_file(step_dir):
  # The merged OCDBT data files orbax reads (ocdbt.process_*/ holds the per-process parts).
  return max(glob.glob(os.path.join(step_dir, "state", "d", "*")), key=os.path.getsize)


def _flip_bytes(step_dir):
  path = _largest_data_file(step_dir)
  data = bytearray(open(path, "rb").read())
  for i in range(len(data) // 2, min(len(data), len(data) // 2 + 16)):
    data[i] ^= 0xFF
  open(path, "wb").write(bytes(data))


def _truncate(step_dir):
  path = _largest_data_file(step_dir)
  with open(path, "r+b") as f:
    f.truncate(os.path.getsize(path) // 2)


def _drop_metadata(step_dir):
  os.remove(os.path.join(step_dir, "state", "_METADATA"))


def _garbage_json(step_dir):
  open(_extra_file(step_dir), "w").write("{not json")


DAMAGE = {"byte_flip": _flip_bytes, "truncation": _truncate,
          "missing_metadata": _drop_metadata, "garbage_json": _garbage_json}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_a_damaged_step_falls_back_to_the_previous_one(interrupted, tmp_path, damage):
  source, final = interrupted
  directory = str(tmp_path / "run")
  shutil.copytree(source, directory)
  DAMAGE[damage](os.path.join(directory, "ckpt", "10"))
  result, out = _run(_stage(directory))
  assert "checkpoint step 10 in" in out and "is unusable" in out, out
  assert "falling back to step 6" in out and "resuming at step 6 of 12" in out
  assert result.resumed_from == 6
  _assert_same(result.state, final)
  assert os.listdir(os.path.join(directory, "ckpt.corrupt"))  # kept aside, not deleted


def _extra_file(step_dir):
  (path,) = [f for f in glob.glob(os.path.join(step_dir, "extra", "*"))
             if not f.endswith("commit_success.txt")]
  return path


def test_bytes_that_read_back_differently_fail_the_checksum(interrupted, tmp_path):
  # A flip inside compressed data can decode silently into other values; the recorded
  # checksum then disagrees with what is read. Here the record is changed instead.
  source, final = interrupted
  directory = str(tmp_path / "run")
  shutil.copytree(source, directory)
  path = _extra_file(os.path.join(directory, "ckpt", "10"))
  record = json.load(open(path))
  json.dump(dict(record, checksum="0" * 64), open(path, "w"))
  ckpt = checkpoint.RunCheckpointer(os.path.join(directory, "ckpt"))
  template = LevelState(jnp.zeros(2), {}, {}, jnp.zeros((), jnp.int32))
  try:
    with pytest.raises(checkpoint.CorruptCheckpointError, match="checksum"):
      ckpt.restore(template, 10)
  finally:
    ckpt.close()
  result, out = _run(_stage(directory))
  assert "CorruptCheckpointError: its checksum does not match" in out
  assert result.resumed_from == 6
  _assert_same(result.state, final)


def test_a_step_with_nonfinite_parameters_is_never_resumed(interrupted, tmp_path):
  source, final = interrupted
  directory = str(tmp_path / "run")
  shutil.copytree(source, directory)
  ckpt = checkpoint.RunCheckpointer(os.path.join(directory, "ckpt"))
  _, extra = ckpt.restore(LevelState(jnp.zeros(2), {}, {}, jnp.zeros((), jnp.int32)), 10)
  assert "checksum" not in extra  # checked on restore, not handed back
  # A step written intact (valid checksum) whose parameters are NaN: step 11.
  ckpt.save(11, LevelState(jnp.full(2, jnp.nan), {}, {}, jnp.int32(11)), dict(extra, steps=11))
  ckpt.close()
  result, out = _run(_stage(directory))
  assert "checkpoint step 11" in out and "Non-finite toy parameters in the checkpoint" in out
  assert "falling back to step 10" in out and result.resumed_from == 10
  _assert_same(result.state, final)


def test_every_step_damaged_starts_afresh(interrupted, tmp_path):
  source, final = interrupted
  directory = str(tmp_path / "run")
  shutil.copytree(source, directory)
  for step in (6, 10):
    _garbage_json(os.path.join(directory, "ckpt", str(step)))
  result, out = _run(_stage(directory))
  assert "no earlier step is left, so the stage starts afresh" in out
  assert result.resumed_from == 0
  _assert_same(result.state, final)


def test_the_checksum_is_recorded_with_each_step(interrupted):
  source, _ = interrupted
  record = json.load(open(_extra_file(os.path.join(source, "ckpt", "10"))))
  assert len(record["checksum"]) == 64
  state = LevelState(np.zeros(2, np.float32), {}, {}, np.int32(0))
  assert checkpoint.tree_checksum(state) != checkpoint.tree_checksum(
      state.replace(params=np.ones(2, np.float32)))


def test_nan_weights_in_a_loaded_stage_output_blame_the_file(tmp_path):
  from bissl_jax.convert import stage_output
  from bissl_jax.runtime.errors import NonFiniteError
  path = str(tmp_path / "output")
  stage_output.export(path, {"params": {"w": np.array([1.0, np.nan], np.float32)},
                             "batch_stats": {}}, {"stage": "pretext"})
  with pytest.raises(NonFiniteError, match=r"output holds NaN/Inf weights.*\['params'\]\['w'\]"
                     r".*no learning rate of this run is to blame") as err:
    stage_output.load_export(path)
  assert err.value.field is None  # nothing to branch on: the file is at fault
