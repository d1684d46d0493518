"""Smoke test of the benchmark scripts: each main runs at --tiny and returns sane tables."""
import math

import pytest

from bench import accelerator_check
from bench import alternation_cost
from bench import cg_accuracy
from bench import common
from bench import hvp_cost
from bench import input_pipeline
from bench import loop_cliff
from bench import lower_step_parts
from bench import memory
from bench import solver_cost

# Order matters for speed only: later scripts reuse programs compiled by earlier ones.
# accelerator_check comes last: it reuses the plain step, the gradient and the solver
# pieces the others compiled (it is the prepared GPU/TPU check, run here at --tiny on CPU).
SCRIPTS = [hvp_cost, alternation_cost, memory, cg_accuracy, loop_cliff, solver_cost,
           input_pipeline, lower_step_parts, accelerator_check]
# solver_cost builds (and so validates) all its contenders but compiles and times one of
# each kind here: an operator solver, a gradient window, a preconditioned Krylov solve on
# a curvature model, and the first-order method (every branch of its table and notes).
# Every solver and preconditioner runs in tests/core and tests/implicit (and every
# accepted combination traces in tests/core/test_combinations.py); all twelve took 65 s.
EXTRA_ARGS = {solver_cost: ["--solvers", "layerwise_cg,mfac,minres+kfac,penalty"]}


def test_every_benchmark_runs_tiny_and_returns_finite_positive_tables(tmp_path):
  doc = tmp_path / "benchmarks.md"
  for script in SCRIPTS:
    tables = script.main(["--tiny", "--no-record", "--repeats", "1", "--doc", str(doc),
                          *EXTRA_ARGS.get(script, [])])
    name = script.__name__
    assert tables and all(isinstance(t, common.Table) for t in tables), name
    for table in tables:
      assert table.rows, f"{name}: empty table {table.title!r}"
      for row in table.rows:
        assert len(row) == len(table.columns), f"{name}: ragged row {row}"
      values = table.numeric_cells(include_signed=False)
      assert values, f"{name}: no numbers in {table.title!r}"
      bad = [v for v in values if not (math.isfinite(v) and v > 0)]
      assert not bad, f"{name}: non-finite or non-positive values {bad} in {table.title!r}"
      signed = table.numeric_cells(include_signed=True)
      assert all(math.isfinite(v) for v in signed), f"{name}: non-finite signed value"
  assert not doc.exists(), "--no-record must not write the markdown file"


def test_record_inserts_between_markers_and_appends_without_them(tmp_path):
  doc = tmp_path / "b.md"
  doc.write_text("# B\n\n## hvp\n\n<!-- records: hvp_cost -->\n<!-- end records: hvp_cost -->\n"
                 "\n## next\n")
  table = common.Table(title="T", columns=["a", "b"], rows=[["x", 1.5]])
  common.record("hvp_cost", [table], ["--small"], str(doc))
  common.record("hvp_cost", [table], ["--small", "--repeats", "3"], str(doc))
  common.record("memory", [table], [], str(doc))
  text = doc.read_text()
  start = text.index("<!-- records: hvp_cost -->")
  end = text.index("<!-- end records: hvp_cost -->")
  inside = text[start:end]
  assert inside.count("#### Run of") == 2
  assert inside.index("`python -m bench.hvp_cost --small`") < inside.index(
      "`python -m bench.hvp_cost --small --repeats 3`")  # oldest first
  assert "| x | 1.5 |" in inside
  assert text.index("## next") > end  # the following section is untouched
  assert text.rstrip().endswith("<!-- end records: memory -->")
  assert "## Recorded runs: memory" in text


@pytest.mark.parametrize("value, text", [(0.0123456, "0.0123"), (12345.0, "1.23e+04"),
                                         (2.0, "2"), (3, "3"), (True, "True"), ("–", "–")])
def test_format_cell(value, text):
  assert common.format_cell(value) == text
