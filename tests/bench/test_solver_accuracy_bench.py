"""Smoke test of bench/solver_accuracy.py at --tiny (compile-bound: about a minute)."""
import math

import pytest

from bench import common
from bench import solver_accuracy


@pytest.mark.slow
def test_solver_accuracy_runs_tiny(tmp_path):
  doc = tmp_path / "solvers.md"
  tables = solver_accuracy.main(["--tiny", "--no-record", "--batches", "1",
                                 "--residual-batches", "1", "--doc", str(doc)])
  accuracy, frequency = tables
  labels = [row[0] for row in accuracy.rows]
  for name in ("layerwise_cg", "cg", "minres", "neumann", "first_order", "gauss_newton+cg"):
    assert name in labels
  assert any(label.startswith("mfac") for label in labels)
  for name in ("kfac, λ+δ", "cg + kfac preconditioner", "minres + kfac preconditioner"):
    assert name in labels
  rows = {row[0]: row for row in accuracy.rows}
  # minres never does worse than x = 0 on the true A; cosines are cosines.
  assert rows["minres"][4] <= 1.0 + 1e-4
  assert rows["minres + kfac preconditioner"][4] <= 1.0 + 1e-4
  assert rows["kfac, λ+δ"][5] < 1e-4            # exact on its own model
  for row in accuracy.rows:
    assert len(row) == len(accuracy.columns)
    if math.isfinite(row[2]):
      assert -1.0 - 1e-6 <= row[2] <= 1.0 + 1e-6
  assert all(0.0 <= row[1] <= 1.0 for row in frequency.rows)
  assert isinstance(frequency, common.Table)
  assert not doc.exists()
