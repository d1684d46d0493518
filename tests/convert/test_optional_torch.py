"""torch is an optional extra: without it every test file still imports, and torch tests skip."""
import os
import subprocess
import sys

from config_helpers import REPO_ROOT

REPO = REPO_ROOT

# Runs pytest with an import hook that makes `import torch` fail as if it were absent.
_HIDE_TORCH = r"""
import importlib.abc, sys

class HideTorch(importlib.abc.MetaPathFinder):
  def find_spec(self, name, path, target=None):
    if name == "torch" or name.startswith("torch."):
      raise ModuleNotFoundError(f"No module named {name!r}")
    return None

sys.meta_path.insert(0, HideTorch())
import pytest
from config_helpers import REPO_ROOT
sys.exit(pytest.main(sys.argv[1:]))
"""


def _pytest_without_torch(*args):
  return subprocess.run([sys.executable, "-c", _HIDE_TORCH, "-q", "-p", "no:cacheprovider",
                         *args], cwd=REPO, capture_output=True, text=True, timeout=600,
                        env=dict(os.environ, JAX_PLATFORMS="cpu"))


def test_every_test_file_imports_without_torch():
  proc = _pytest_without_torch("--collect-only", "tests")
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  assert "error" not in proc.stdout.lower().split("collected")[-1]


def test_torch_reference_tests_skip_with_a_reason():
  proc = _pytest_without_torch("-rs", "tests/tasks/test_augment.py", "tests/convert/test_convert_torch.py",
                               "-k", "torch or convert")
  assert proc.returncode == 0, proc.stdout[-3000:]
  assert "SKIPPED" in proc.stdout and "pip install -e '.[torch]'" in proc.stdout
