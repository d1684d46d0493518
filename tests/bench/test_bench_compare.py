"""Fast checks of bench/compare_reference.py and bench/cpu_conv.py: flags, skipping, workers.

The benches themselves take many minutes; these tests only parse arguments, check
that the comparison skips (and says so) without a reference checkout, and run the
worker protocol against a tiny worker process.
"""
import sys

import pytest

from bench import compare_reference
from bench import conv_layers
from bench import cpu_conv
from bench import worker_protocol


def test_compare_reference_skips_without_a_reference_and_records_nothing(tmp_path, capsys):
  doc = tmp_path / "benchmarks.md"
  assert compare_reference.main(["--small", "--doc", str(doc)]) == []
  assert "no reference checkout given; skipped" in capsys.readouterr().out
  assert not doc.exists()


def test_compare_reference_refuses_a_path_that_is_not_the_reference(tmp_path):
  with pytest.raises(SystemExit, match="not a checkout of the reference BiSSL"):
    compare_reference.main(["--small", "--reference", str(tmp_path), "--no-record"])


def test_compare_reference_flags_and_sizes():
  args = compare_reference.common.parse_args(
      ["--small", "--reference_python", "/x/python", "--lower-steps", "3"], "",
      compare_reference.add_arguments)
  assert args.reference_python == "/x/python"
  size = compare_reference.compare_size(args)
  assert (size.arch, size.width, size.image_size, size.pretext_batch) == ("resnet18", 1.0, 32, 16)
  assert compare_reference.uses_cifar_stem(args, size)
  assert args.cpu_kernels is None  # the library's own choice unless given
  kernels = compare_reference.common.parse_args(["--small", "--cpu-kernels", "default"], "",
                                                compare_reference.add_arguments)
  assert kernels.cpu_kernels == "default"
  assert compare_reference.alternation_cost.stage_sizes(args) == (3, 8, 5)
  narrow = compare_reference.common.parse_args(["--small", "--width", "0.5"], "",
                                               compare_reference.add_arguments)
  assert compare_reference.compare_size(narrow).width == 0.5
  full = compare_reference.common.parse_args([], "", compare_reference.add_arguments)
  assert not compare_reference.uses_cifar_stem(full, compare_reference.compare_size(full))


def test_cpu_conv_option_selection():
  names = [o.name for o in cpu_conv.selected_options("fast math,one core")]
  assert names == ["default", "fast math", "one core (taskset -c 0)", "PyTorch"]
  fast = [o.name for o in cpu_conv.selected_options("fast")]  # a prefix selects them all
  assert fast[1:] == ["fast kernels + oneDNN convolutions",
                      "fast kernels + XNNPACK convolutions", "fast math", "PyTorch"]
  assert len(cpu_conv.selected_options("")) == len(cpu_conv.OPTIONS)
  with pytest.raises(SystemExit, match="no option named 'nonsense'"):
    cpu_conv.selected_options("nonsense")


def test_cpu_conv_network_layers_are_resnet18s_convolutions_and_sum_up():
  size = compare_reference.compare_size(compare_reference.common.parse_args(
      ["--small"], "", cpu_conv.add_arguments))
  layers = conv_layers.network_layers(size)
  # ResNet-18: the stem, 16 block convolutions and 3 downsampling 1×1s, 20 in all;
  # the channel widths double from 64 to 512 while the resolution halves from 32 px.
  assert sum(count for *_, count in layers) == 20
  assert [(cin, cout, px) for _, cin, cout, px, _, _, _ in layers][-1] == (512, 512, 4)
  fast = "YNN fusions dot,eltwise,reduce"
  block = {}
  for name, *_ in layers:  # default 3 s, fast 2 s, PyTorch 1 s for every layer
    for worker, seconds in (("default", 3.0), (fast, 2.0), ("PyTorch", 1.0)):
      block[(worker, f"layer {name}")] = [seconds, seconds]
  table = conv_layers.table(block, fast, size)
  total = table.rows[-1]
  assert total[1:] == pytest.approx([20, 60e3 / conv_layers.LAYER_CALLS, 40e3 / conv_layers.LAYER_CALLS,
                                    20e3 / conv_layers.LAYER_CALLS, 2.0])


def test_cpu_conv_numerics_flags_bit_identity_and_relative_difference():
  import numpy as np  # pylint: disable=import-outside-toplevel
  ref = np.array([1.0, -2.0, 4.0], np.float32)
  assert cpu_conv.numerics(ref.copy(), ref) == (True, 0.0)
  same, rel = cpu_conv.numerics(ref + np.float32(1e-3), ref)
  assert not same and rel == pytest.approx(1e-3 / 4, rel=1e-3)


WORKER = """
import sys, time
from bench import worker_protocol
worker_protocol.redirect_prints()
print("setup noise that must not reach the protocol")
worker_protocol.serve({"nap": lambda: time.sleep(0.01), "boom": lambda: 1 / 0},
                      extra={"echo": lambda r: {"echo": r["x"]}}, info={"contenders": ["nap"]})
"""


def test_worker_protocol_round_trip_errors_and_interleaving(tmp_path):
  script = tmp_path / "w.py"
  script.write_text(WORKER)
  worker = worker_protocol.Worker([sys.executable, str(script)])
  try:
    assert worker.info == {"status": "ready", "contenders": ["nap"]}
    assert 0.005 < worker.seconds("nap") < 5
    assert worker.call("echo", x=[1, 2]) == {"echo": [1, 2]}
    with pytest.raises(worker_protocol.WorkerError, match="ZeroDivisionError"):
      worker.seconds("boom")
    calls = []
    times = worker_protocol.interleaved_seconds(
        {"a": lambda: calls.append("a") or 1.0, "b": lambda: calls.append("b") or 2.0},
        rounds=2, warmup=1)
    assert calls == ["a", "b"] * 3 and times == {"a": [1.0, 1.0], "b": [2.0, 2.0]}
  finally:
    worker.close()


def test_worker_that_fails_at_setup_reports_why(tmp_path):
  script = tmp_path / "bad.py"
  script.write_text("from bench import worker_protocol\n"
                    "worker_protocol.fail('no torchvision here')\n")
  with pytest.raises(worker_protocol.WorkerError, match="no torchvision here"):
    worker_protocol.Worker([sys.executable, str(script)])
