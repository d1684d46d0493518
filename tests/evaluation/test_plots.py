"""Training-curve PNGs and the JSON-lines reader (bissl_jax.evaluation.plots)."""
import json
import os

import numpy as np
import pytest
from PIL import Image

from bissl_jax.evaluation import plots


def _check_png(path):
  assert os.path.isfile(path)
  with Image.open(path) as image:
    image.verify()
  with Image.open(path) as image:
    assert image.format == "PNG" and image.mode in ("RGB", "RGBA")
    assert image.size[0] >= 300 and image.size[1] >= 200


def _history(n=12, keys=("lower_loss", "upper_loss", "cg_residual", "theta_distance")):
  out = []
  for t in range(1, n + 1):
    record = {"alternation": t, "lower_loss": 5.0 / t, "upper_loss": 2.0 / t,
              "cg_residual": 10.0 ** -t, "theta_distance": 0.01 * t}
    out.append({k: v for k, v in record.items() if k == "alternation" or k in keys})
  return out


def test_bissl_curves_write_one_png_per_panel(tmp_path):
  paths = plots.plot_bissl_curves(_history(), str(tmp_path / "plots"))
  assert [os.path.basename(p) for p in paths] == [
      "bissl_losses.png", "bissl_cg_residual.png", "bissl_theta_distance.png"]
  for path in paths:
    _check_png(path)


def test_bissl_curves_skip_missing_keys_and_nonfinite_values(tmp_path):
  history = _history(keys=("lower_loss", "theta_distance"))
  history[3]["lower_loss"] = float("nan")   # a bad record is dropped, not plotted
  history.append({"alternation": 13})        # a record without metrics
  paths = plots.plot_bissl_curves(history, str(tmp_path))
  assert [os.path.basename(p) for p in paths] == ["bissl_losses.png", "bissl_theta_distance.png"]
  assert not os.path.exists(tmp_path / "bissl_cg_residual.png")
  assert plots.plot_bissl_curves([{"alternation": 1}], str(tmp_path / "none")) == []


def test_series_uses_alternation_then_step_then_index():
  x, y = plots._series([{"step": 10, "a": 1.0}, {"step": 20, "a": 2.0}], "a")
  np.testing.assert_array_equal(x, [10, 20])
  x, y = plots._series([{"a": 1.0}, {"b": 0.0}, {"a": np.float32(3.0)}], "a")
  np.testing.assert_array_equal(x, [0, 2])
  np.testing.assert_array_equal(y, [1.0, 3.0])
  x, _ = plots._series([{"alternation": 4, "step": 99, "a": 1.0}], "a")
  np.testing.assert_array_equal(x, [4])


def test_validation_curves_single_and_several_seeds(tmp_path):
  curves = {"baseline": [0.1, 0.4, 0.6, 0.65],
            "BiSSL+FT": [[0.2, 0.5, 0.7, 0.72], [0.25, 0.55, 0.68, 0.74, 0.75]]}
  path = plots.plot_validation_curves(curves, str(tmp_path / "val" / "validation.png"))
  _check_png(path)
  assert plots.plot_validation_curves({"empty": []}, str(tmp_path / "none.png")) is None
  assert not os.path.exists(tmp_path / "none.png")


def test_seed_matrix_cuts_to_shortest_run():
  runs = plots._as_seed_matrix([[1, 2, 3], [4, 5]])
  np.testing.assert_array_equal(runs, [[1, 2], [4, 5]])
  np.testing.assert_array_equal(plots._as_seed_matrix([1.0, 2.0]), [[1.0, 2.0]])


def test_read_jsonl(tmp_path):
  path = tmp_path / "metrics.jsonl"
  records = [{"stage": "bissl", "step": i, "lower_loss": 1.0 / (i + 1)} for i in range(3)]
  path.write_text("\n".join(json.dumps(r) for r in records) + "\n\n" + '{"stage": "bi')
  assert plots.read_jsonl(str(path)) == records  # truncated last line dropped
  path.write_text(json.dumps(records[0]) + "\nnot json\n" + json.dumps(records[1]) + "\n")
  with pytest.raises(ValueError, match="metrics.jsonl:2"):
    plots.read_jsonl(str(path))


def test_plot_run_reads_the_pipeline_log(tmp_path):
  lines = []
  for seed in (0, 1):
    for t in range(1, 6):
      lines.append({"stage": f"bissl/seed{seed}", "step": t, "time": 0.0, "lower_loss": 4.0 / t,
                    "upper_loss": 2.0 / t, "cg_residual": 0.1 / t, "theta_distance": 0.1 * t})
    for pipeline in ("baseline", "bissl"):
      for epoch in range(1, 4):
        lines.append({"stage": f"finetune/{pipeline}/seed{seed}/val", "step": epoch,
                      "score": 0.2 * epoch, "loss": 1.0})
      lines.append({"stage": f"finetune/{pipeline}/seed{seed}", "step": 7, "loss": 0.5})
  lines.append({"stage": "search/baseline/trial0/val", "step": 1, "score": 0.9})
  (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in lines) + "\n")
  paths = plots.plot_run(str(tmp_path))
  rel = sorted(os.path.relpath(p, tmp_path) for p in paths)
  assert rel == sorted(
      [f"plots/seed{s}/{n}.png" for s in (0, 1)
       for n in ("bissl_losses", "bissl_cg_residual", "bissl_theta_distance")]
      + ["plots/validation.png"])
  for path in paths:
    _check_png(path)
  assert plots.plot_run(str(tmp_path / "empty")) == []
