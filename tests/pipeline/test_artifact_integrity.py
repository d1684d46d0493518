"""Every artifact a run reads back is checked: stage outputs, JSON records, the metric log.

A damaged one (a flipped byte, garbage or missing metadata, garbage JSON, a line cut
short) is named, set aside and recomputed or ignored - never a traceback, never
loaded silently with other values.
"""
import glob
import json
import os

import numpy as np
import pytest

from bissl_jax.convert import stage_output
from bissl_jax.pipeline import comparison
from bissl_jax.pipeline import provenance
from bissl_jax.pipeline import results as results_lib
from bissl_jax.pipeline import run_log
from bissl_jax.pipeline import runner
from bissl_jax.pipeline import search
from configs import digits_simclr
from test_run_records import _fake_comparison

PROV = provenance.Provenance({"pretext.lr": 1.0}, {})


def _output(tmp_path):
  """A stage output as the pipeline writes it, with its provenance."""
  out_dir = str(tmp_path / "pretext" / "output")
  rng = np.random.default_rng(0)
  variables = {"params": {"w": rng.normal(size=(64, 64)).astype(np.float32)},
               "batch_stats": {"var": np.ones(64, np.float32)}}
  stage_output.export(out_dir, variables, {"stage": "pretext", provenance.RECORD_KEY:
                                           PROV.record()})
  return out_dir, variables


def _flip(out_dir):
  path = max(glob.glob(os.path.join(out_dir, "state", "**", "d", "*"), recursive=True),
             key=os.path.getsize)
  data = bytearray(open(path, "rb").read())
  for i in range(len(data) // 2, len(data) // 2 + 8):
    data[i] ^= 0x01
  open(path, "wb").write(bytes(data))


def _garbage_meta(out_dir):
  open(os.path.join(out_dir, "meta", "metadata"), "w").write("{garbage")


def _drop_state_metadata(out_dir):
  os.remove(os.path.join(out_dir, "state", "_METADATA"))


def _wrong_checksum(out_dir):
  # What a flip inside compressed data that still decodes looks like: other values.
  path = os.path.join(out_dir, "meta", "metadata")
  meta = json.load(open(path))
  json.dump(dict(meta, checksum="0" * 64), open(path, "w"))


DAMAGE = {"byte_flip": _flip, "garbage_meta": _garbage_meta,
          "missing_state_metadata": _drop_state_metadata, "checksum": _wrong_checksum}


def test_an_intact_output_is_reused_and_records_its_checksum(tmp_path):
  out_dir, variables = _output(tmp_path)
  assert provenance.reusable(out_dir, PROV, mode="recompute", name="pretext/seed0")
  loaded, meta = stage_output.load_export(out_dir)
  assert meta["checksum"] == stage_output.tree_checksum(variables)
  np.testing.assert_array_equal(loaded["params"]["w"], variables["params"]["w"])


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_a_damaged_stage_output_is_named_set_aside_and_recomputed(tmp_path, capsys, damage):
  out_dir, _ = _output(tmp_path)
  DAMAGE[damage](out_dir)
  assert not provenance.reusable(out_dir, PROV, mode="recompute", name="pretext/seed0")
  out = capsys.readouterr().out
  assert f"[pretext/seed0] the output in {out_dir} is damaged" in out, out
  assert "recomputing this stage" in out
  assert not os.path.exists(out_dir)
  assert glob.glob(str(tmp_path / "pretext" / "superseded" / "*" / "output"))


def test_loading_a_damaged_output_directly_is_refused(tmp_path):
  out_dir, _ = _output(tmp_path)
  _wrong_checksum(out_dir)
  with pytest.raises(stage_output.CorruptOutputError, match="checksum"):
    stage_output.load_export(out_dir)


def test_json_records_carry_a_checksum_and_damage_is_set_aside(tmp_path, capsys):
  path = str(tmp_path / "finetune" / "evaluation.json")
  results_lib.write_json(path, {"test": {"top1": 0.5}, "seeds": (0, 1)})
  assert results_lib.read_json(path) == {"test": {"top1": 0.5}, "seeds": [0, 1]}
  record = json.load(open(path))
  record["test"]["top1"] = 0.9  # edited: no longer matches its checksum
  json.dump(record, open(path, "w"))
  with pytest.raises(results_lib.DamagedRecordError, match="checksum"):
    results_lib.read_json(path)
  assert results_lib.read_record(path, "finetune/baseline/seed0") is None
  out = capsys.readouterr().out
  assert "[finetune/baseline/seed0]" in out and "damaged" in out and not os.path.exists(path)
  open(path, "w").write("{garbage")
  assert results_lib.read_record(path, "finetune/baseline/seed0") is None
  # A record written before checksums existed is read as it is.
  json.dump({"test": {"top1": 0.5}}, open(path, "w"))
  assert results_lib.read_json(path) == {"test": {"top1": 0.5}}


def test_a_garbage_search_record_restarts_the_search(tmp_path, capsys):
  path = str(tmp_path / "search" / "baseline.json")
  os.makedirs(os.path.dirname(path))
  open(path, "w").write("garbage")
  assert search.load_trials(path) == []
  assert "damaged" in capsys.readouterr().out


def test_a_truncated_last_metrics_line_is_dropped(tmp_path, capsys):
  logger = run_log.MetricLogger(str(tmp_path), tensorboard=False)
  logger.write("pretext/seed0", 1, {"loss": 1.0})
  logger.write("pretext/seed0", 2, {"loss": 0.5})
  with open(logger.path, "a") as f:
    f.write('{"stage": "pretext/seed0", "st')  # a full disk cut the write short
  assert logger.forget_after("pretext/seed0", 2) == 1
  assert "dropped 1 damaged line(s) (line 3" in capsys.readouterr().out
  logger.write("pretext/seed0", 3, {"loss": 0.25})
  steps = [json.loads(line)["step"] for line in open(logger.path)]
  assert steps == [1, 2, 3]


def test_garbage_results_json_of_a_finished_workdir_is_recomputed(tmp_path, monkeypatch,
                                                                   capsys):
  monkeypatch.setattr(comparison, "run_comparison", _fake_comparison)
  monkeypatch.setattr(results_lib, "plot_curves", lambda workdir: [])
  workdir = str(tmp_path / "run")
  config = digits_simclr.get_config("runlocal")
  runner.run(config, workdir)
  open(os.path.join(workdir, "results.json"), "w").write("{garbage")
  open(os.path.join(workdir, results_lib.WALL_TIMES_FILE), "w").write("[1, 2")
  results = runner.run(config, workdir)
  out = capsys.readouterr().out
  assert "results.json is not valid JSON" in out and "wall_times.json" in out
  assert results_lib.read_json(os.path.join(workdir, "results.json"))["pipelines"]
