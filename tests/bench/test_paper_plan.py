"""Checks of bench/paper_plan.py and bench/reference_flops.py at tiny sizes.

The full plan compiles ResNet-50 programs for many minutes; here the same code runs
on a one-block network, compiled (never run) for a one-device mesh in this process.
"""
import math

import pytest

from bench import paper_plan
from bench import reference_flops

TINY = ["--tiny", "--pretext-batch", "8", "--downstream-batch", "8", "--lower-steps", "2",
        "--upper-steps", "8", "--cg-iters", "2", "--dtypes", "float32", "--no-fused",
        "--devices", "1", "--no-record"]


@pytest.mark.slow
def test_tiny_plan_compiles_every_program_and_sums_the_alternation():
  memory_table, state_table, flop_table = paper_plan.main(TINY)
  names = [row[0] for row in memory_table.rows]
  assert names == ["float32: pretext gradient (the unit)", "float32: lower step",
                   "float32: operator build (linearize)", "float32: upper step (2 CG iterations)",
                   "float32: residual check (one product)"]
  for table in (memory_table, state_table, flop_table):
    values = table.numeric_cells()
    assert values and all(math.isfinite(v) and v > 0 for v in values), table.title
  rows = {row[0].split(": ", 1)[1]: row for row in flop_table.rows}
  assert rows["pretext gradient (the unit)"][4] == 1.0
  # The alternation is N_L lower steps, one build, N_U upper steps and 2 residual checks
  # (residual_every=4 over 8 steps), in the unit's gradients.
  parts = [rows[name][5] for name in ("lower step", "operator build (linearize)",
                                      "upper step (2 CG iterations)",
                                      "residual check (one product)")]
  assert [rows[name][1] for name in ("lower step", "upper step (2 CG iterations)",
                                     "residual check (one product)")] == [2, 8, 2]
  total = rows["one alternation (sum of the above)"]
  assert total[5] == pytest.approx(sum(parts))
  assert total[2] == pytest.approx(total[5] * rows["pretext gradient (the unit)"][2])
  # An upper step does more than one gradient's work (two downstream gradients and two
  # products), a lower step at least one gradient's.
  assert rows["upper step (2 CG iterations)"][4] > 1.0
  assert rows["lower step"][4] >= 1.0
  # The state: θ and its LARS momentum have the same size; the whole is the sum of parts.
  state = {row[0]: row[1] for row in state_table.rows}
  assert state["lower optimizer state (LARS)"] == pytest.approx(
      state["lower params θ_P, φ_P"], rel=0.01)
  assert state["whole state"] == pytest.approx(
      sum(v for k, v in state.items() if k != "whole state"))


def test_batches_that_do_not_split_over_the_devices_stop_before_compiling():
  with pytest.raises(SystemExit, match="pretext batch 4 does not split over 8 devices"):
    paper_plan.main(["--tiny", "--devices", "8", "--no-record"])


@pytest.mark.torch  # reference_flops counts with PyTorch's FlopCounterMode
def test_reference_flops_needs_a_checkout_and_full_width(tmp_path):
  small = paper_plan.common.parse_args(["--small"], "", None).size
  with pytest.raises(SystemExit, match="full-width ResNets"):
    reference_flops.count(str(tmp_path), small, 2, 2, 2)
  full_width = paper_plan.common.parse_args(["--small", "--width", "1"], "", None).size
  with pytest.raises(SystemExit, match="not a checkout of the reference BiSSL"):
    reference_flops.count(str(tmp_path), full_width, 2, 2, 2)


@pytest.mark.torch
@pytest.mark.parametrize("arch, parameters", [("resnet18", 11_689_512),
                                              ("resnet50", 25_557_032)])
def test_timm_stand_in_has_the_published_parameter_counts(arch, parameters):
  import torch  # pylint: disable=import-outside-toplevel
  net = reference_flops._resnet(torch, arch)  # pylint: disable=protected-access
  assert sum(p.numel() for p in net.parameters()) == parameters  # timm/torchvision's
  assert net.fc.in_features == (2048 if arch == "resnet50" else 512)
