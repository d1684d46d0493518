"""Smoke test of bench/vit_cost.py at --tiny: it runs and returns a sane table."""
import math

import pytest

from bench import common
from bench import vit_cost


@pytest.mark.slow  # compiles two BiSSL alternations (about 30 s on a 2-core CPU)
def test_vit_cost_runs_tiny(tmp_path):
  doc = tmp_path / "benchmarks.md"
  table, alternation = vit_cost.main(["--tiny", "--no-record", "--repeats", "1", "--doc",
                                      str(doc)])
  assert isinstance(table, common.Table) and len(table.rows) == 4
  for t in (table, alternation):
    values = t.numeric_cells()
    assert values and all(math.isfinite(v) and v > 0 for v in values)
  assert table.rows[0][2] == 1.0  # the unit
  assert [row[0] for row in alternation.rows] == ["mfac", "layerwise_cg"]
  assert not doc.exists()
