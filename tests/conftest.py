"""Test-session settings: small CPU compile times and float32 everywhere; torch is optional."""
import gc
import importlib.util
import os
import shutil
import sys
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One persistent compilation cache for this test run, shared with the subprocesses the
# tests start (command-line runs, multi-device checks inherit the environment): a
# program compiled once is loaded, not recompiled, by every later process that needs
# it. A cache hit is the same executable, so results are unchanged. The pytest-xdist
# workers inherit the directory from the main process, so they share it too (a read that
# races a write only warns and recompiles). Set the variable yourself to keep a cache
# across runs.
_OWN_CACHE = "JAX_COMPILATION_CACHE_DIR" not in os.environ
if _OWN_CACHE:
  os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="bissl-jax-tests-xla-")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Tiny models: compile time dominates, so cut XLA's optimisation passes, here and (through
# the environment) in every subprocess the tests start: a command-line run compiles its
# steps in a fraction of the time. Tests that must compile as a user's process does
# (the CPU kernel probes, tests/runtime/test_cpu_defaults.py) remove the variable.
os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_disable_most_optimizations", True)
# Start the backend now, with the environment above, so that every test in this process
# computes with the same XLA:CPU kernels: a command run in-process (`bissl-jax run`'s
# main) would otherwise add the fast-kernel flag if it happened to run first, and the
# rest of the suite would round differently depending on test order.
jax.devices()


def pytest_xdist_auto_num_workers(config):
  """``-n auto``: one worker per core, at most 4.

  Each worker is a JAX process of its own (1-3 GB with the subprocesses its tests start);
  past a few workers the file with the longest tests sets the wall time anyway.
  """
  del config
  return max(1, min(os.cpu_count() or 1, 4))


def pytest_sessionfinish(session, exitstatus):
  del session, exitstatus
  if _OWN_CACHE:
    shutil.rmtree(os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)


TORCH_SKIP_REASON = "needs PyTorch, an optional extra: pip install -e '.[torch]'"


def torch_available() -> bool:
  """Whether ``import torch`` would work, without importing it (seconds, and memory)."""
  try:
    return importlib.util.find_spec("torch") is not None
  except ImportError:  # an import hook that hides torch (tests/convert/test_optional_torch.py)
    return False


def pytest_configure(config):
  config.addinivalue_line(
      "markers", "slow: takes more than ~20 s (end-to-end runs); skip with -m 'not slow'")
  config.addinivalue_line(
      "markers", "torch: needs PyTorch (the [torch] extra); skipped without it, and "
      "CI's second stage runs exactly these with -m torch")


# The longest files of the last clean-clone CI runs, longest first (a file's tests and
# module fixtures together, 3 to 9 minutes each on the 2-core machine). A file not listed
# that holds a `slow` test comes next, then the rest; a stale entry only costs balance.
LONGEST_FILES = (
    "tests/pipeline/test_multiprocess_run.py",
    "tests/pipeline/test_voc_detection_runlocal.py",
    "tests/pipeline/test_interrupt_cli.py",
    "tests/pipeline/test_detection_pipeline.py",
    "tests/pipeline/test_study.py",
    "tests/runtime/test_signals.py",
    "tests/bench/test_bench_smoke.py",
    "tests/pipeline/test_notebook.py",
    "tests/pipeline/test_multiprocess_gessl.py",
    "tests/bench/test_solver_accuracy_bench.py",
)


def _file_of(item) -> str:
  return item.nodeid.split("::")[0]


def pytest_collection_modifyitems(config, items):
  """Files with slow tests run first; without torch, tests marked ``torch`` skip.

  The order: pytest-xdist (``--dist loadfile``) hands out whole files in collection
  order, so a long file collected last would run alone on one worker while the others
  sit idle. Starting the files that hold a ``slow`` test first (longest work first) and
  the many short files after them lets the workers finish together
  (:data:`LONGEST_FILES` first, then the other files with a slow test). The order within
  a file is kept; files do not depend on each other (each drops its compiled programs).
  """
  del config
  slow_files = {_file_of(item) for item in items if item.get_closest_marker("slow") is not None}

  def rank(item):
    name = _file_of(item)
    if name in LONGEST_FILES:
      return LONGEST_FILES.index(name)
    return len(LONGEST_FILES) + (name not in slow_files)
  items.sort(key=rank)  # stable: the order within a rank and within a file is kept
  if torch_available():
    return
  skip = pytest.mark.skip(reason=TORCH_SKIP_REASON)
  for item in items:
    if item.get_closest_marker("torch") is not None:
      item.add_marker(skip)


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
  """Drops every compiled program after each test file.

  Each XLA:CPU executable keeps a few memory mappings for its code; one process that
  compiles the whole suite's programs approaches the kernel's per-process limit
  (vm.max_map_count, 65530 by default), and the next compile then crashes inside the
  compiler. Test files share no compiled programs worth keeping, so clearing JAX's
  caches between them costs little and keeps the count flat.
  """
  yield
  jax.clear_caches()
  gc.collect()
