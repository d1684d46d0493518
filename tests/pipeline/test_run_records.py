"""What a run records about itself: wall time across reruns, data checks, the banner."""
import json
import os

import pytest

from bissl_jax import data as data_lib
from bissl_jax.pipeline import comparison
from bissl_jax.pipeline import results as results_lib
from bissl_jax.pipeline import runner
from configs import digits_simclr


def _inv(*entries):
  return [{"seconds": s, "finished": f} for s, f in entries]


def test_wall_times_from_invocations():
  # One uninterrupted run, then two reruns of the finished workdir.
  assert results_lib.wall_times(_inv((410.0, True), (4.0, True), (3.0, True))) == {
      "wall_time_s": 410.0, "resumed_wall_time_s": [4.0, 3.0]}
  # Interrupted twice, finished on the third invocation: the parts add up.
  assert results_lib.wall_times(_inv((100.0, False), (50.0, False), (260.0, True))) == {
      "wall_time_s": 410.0, "resumed_wall_time_s": []}
  # A workdir finished before invocations were recorded keeps its results.json time.
  previous = {"wall_time_s": 410.0, "resumed_wall_time_s": [5.0]}
  assert results_lib.wall_times(_inv((4.0, True)), previous) == {
      "wall_time_s": 410.0, "resumed_wall_time_s": [5.0, 4.0]}
  with pytest.raises(ValueError):
    results_lib.wall_times(_inv((4.0, False)))


def _fake_comparison(ctx, splits, pretext_set, bissl_callback=None):
  del ctx, splits, pretext_set, bissl_callback
  per_seed = {p: {0: {"top1": 0.5, "top5": 0.9, "val": 0.5}, 1: {"top1": 0.6, "top5": 0.9,
                                                                 "val": 0.6}}
              for p in ("baseline", "bissl")}
  return results_lib.build_results(per_seed, multilabel=False, hyperparams={},
                                   info={"seeds": [0, 1]})


def test_rerun_of_a_finished_workdir_keeps_the_original_wall_time(tmp_path, monkeypatch):
  """runner.run twice on one workdir; the comparison is faked, the clock is ours."""
  monkeypatch.setattr(comparison, "run_comparison", _fake_comparison)
  monkeypatch.setattr(results_lib, "plot_curves", lambda workdir: [])
  clock = {"now": 1000.0}
  monkeypatch.setattr(runner.time, "time", lambda: clock["now"])
  config = digits_simclr.get_config("runlocal")
  workdir = str(tmp_path / "run")

  def run_taking(seconds):
    real_fake = comparison.run_comparison

    def slow(*args, **kwargs):
      clock["now"] += seconds
      return real_fake(*args, **kwargs)
    monkeypatch.setattr(comparison, "run_comparison", slow)
    try:
      return runner.run(config, workdir)
    finally:
      monkeypatch.setattr(comparison, "run_comparison", real_fake)

  first = run_taking(410.0)
  assert first["wall_time_s"] == 410.0 and first["resumed_wall_time_s"] == []
  second = run_taking(4.0)
  assert second["wall_time_s"] == 410.0 and second["resumed_wall_time_s"] == [4.0]
  with open(os.path.join(workdir, "results.json")) as f:
    saved = json.load(f)
  assert saved["wall_time_s"] == 410.0 and saved["resumed_wall_time_s"] == [4.0]
  with open(os.path.join(workdir, "results.md")) as f:
    text = f.read()
  assert "Wall time: 410 s" in text and "Reruns after completion: 4 s." in text


def test_interrupted_invocation_counts_towards_the_wall_time(tmp_path, monkeypatch):
  clock = {"now": 0.0}
  monkeypatch.setattr(runner.time, "time", lambda: clock["now"])
  monkeypatch.setattr(results_lib, "plot_curves", lambda workdir: [])

  def interrupted(*args, **kwargs):
    clock["now"] += 100.0
    raise KeyboardInterrupt
  monkeypatch.setattr(comparison, "run_comparison", interrupted)
  config = digits_simclr.get_config("runlocal")
  workdir = str(tmp_path / "run")
  with pytest.raises(KeyboardInterrupt):
    runner.run(config, workdir)

  def rest(*args, **kwargs):
    clock["now"] += 310.0
    return _fake_comparison(*args, **kwargs)
  monkeypatch.setattr(comparison, "run_comparison", rest)
  assert runner.run(config, workdir)["wall_time_s"] == 410.0


def test_check_prepared_names_every_missing_dataset_once(tmp_path):
  prepared = tmp_path / "dtd" / "3.0.1"
  prepared.mkdir(parents=True)
  (prepared / "dataset_info.json").write_text("{}")
  data_lib.check_prepared([("pretext", "digits"), ("downstream", "dtd")], str(tmp_path))
  with pytest.raises(data_lib.DatasetNotFoundError) as err:
    data_lib.check_prepared([("pretext", "stl10"), ("downstream", "voc/2007"),
                             ("downstream", "voc2007"), ("downstream", "dtd"),
                             ("downstream", "aircraft")], str(tmp_path))
  message = str(err.value)
  assert message.startswith("3 datasets are not prepared")
  assert message.count("'voc2007'") == 1 and "'dtd'" not in message
  assert f"tfds build stl10 --data_dir={tmp_path}" in message
  assert f"tfds build voc/2007 --data_dir={tmp_path}" in message
  assert "fgvc-aircraft-2013b.tar.gz" in message


def test_banner_says_fresh_or_resumed(tmp_path):
  config = digits_simclr.get_config("runlocal")
  fresh = runner.banner(config, str(tmp_path), source="configs/digits_simclr.py",
                        resumed=False)
  assert "backend cpu" in fresh and "mesh data=1" in fresh
  assert "configs/digits_simclr.py" in fresh and f"{tmp_path} (fresh)" in fresh
  assert "8 px" in fresh
  assert "(resumed" in runner.banner(config, str(tmp_path), source="x", resumed=True)
