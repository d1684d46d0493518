"""Smoke test of the GPT alternation benchmark at --tiny."""
import math

import pytest

from bench import gpt_alternation


@pytest.mark.slow
def test_gpt_alternation_tiny_tables(tmp_path):
  doc = tmp_path / "benchmarks.md"
  tables = gpt_alternation.main(["--tiny", "--no-record", "--repeats", "1", "--doc", str(doc)])
  assert len(tables) == 2 and not doc.exists()
  for table in tables:
    values = table.numeric_cells()
    assert values and all(math.isfinite(v) and v > 0 for v in values)
  assert [row[0] for row in tables[1].rows][0] == "layerwise_cg"
