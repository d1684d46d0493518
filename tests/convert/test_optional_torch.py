"""torch is an optional extra: without it every test file still imports, and torch tests skip."""
import ast
import os
import re
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
sys.exit(pytest.main(sys.argv[1:]))
"""


def _pytest_without_torch(*args):
  # -n 0: in this one process, where the import hook is (pytest-xdist's workers are fresh).
  return subprocess.run([sys.executable, "-c", _HIDE_TORCH, "-q", "-p", "no:cacheprovider",
                         "-n", "0", *args], cwd=REPO, capture_output=True, text=True, timeout=600,
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


# ------------------------------------------------------------------ static checks
# Without torch a test file must still import, and each test that needs torch must be
# marked ``torch`` (tests/conftest.py skips those, and CI's torch stage runs exactly
# them). Checked on the source, so a forgotten mark fails here even where torch is
# installed.

TESTS = os.path.join(REPO, "tests")
_TORCH_WORD = re.compile(r"(^|_)torch($|_)")


def _test_modules():
  found = 0
  for root, _, files in sorted(os.walk(TESTS)):
    for name in sorted(files):
      if name.startswith("test_") and name.endswith(".py") and name != "test_optional_torch.py":
        found += 1
        with open(os.path.join(root, name)) as f:
          yield os.path.relpath(os.path.join(root, name), TESTS), ast.parse(f.read())
  assert found > 50, f"only {found} test files found under {TESTS}"


def _is_torch_mark(node, aliases) -> bool:
  """``pytest.mark.torch``, a name bound to it, or a list/tuple holding one."""
  if isinstance(node, (ast.List, ast.Tuple)):
    return any(_is_torch_mark(e, aliases) for e in node.elts)
  if isinstance(node, ast.Name):
    return node.id in aliases
  return (isinstance(node, ast.Attribute) and node.attr == "torch"
          and isinstance(node.value, ast.Attribute) and node.value.attr == "mark")


def _mark_aliases(tree) -> set:
  return {t.id for node in tree.body if isinstance(node, ast.Assign)
          and _is_torch_mark(node.value, set()) for t in node.targets if isinstance(t, ast.Name)}


def _names(node):
  """Every identifier a node reads (names and attributes), not its strings."""
  for sub in ast.walk(node):
    if isinstance(sub, ast.Name):
      yield sub.id
    elif isinstance(sub, ast.Attribute):
      yield sub.attr


def _uses_torch(node, torch_helpers) -> bool:
  return any(_TORCH_WORD.search(n) or n in torch_helpers for n in _names(node))


def _marked(func, aliases) -> bool:
  """Marked directly, or one of its parametrize cases is ``pytest.param(..., marks=torch)``."""
  for deco in func.decorator_list:
    if _is_torch_mark(deco, aliases):
      return True
    for sub in ast.walk(deco):
      if isinstance(sub, ast.keyword) and sub.arg == "marks" and _is_torch_mark(sub.value, aliases):
        return True
  return False


def test_no_test_module_imports_torch_unguarded():
  offenders = []
  for name, tree in _test_modules():
    for node in tree.body:  # top level only: a Try that catches ImportError is fine
      if "importorskip('torch'" in ast.unparse(node).replace('"', "'"):
        break  # the module skips as a whole before any later import runs
      if isinstance(node, ast.Import) and any(a.name.split(".")[0] == "torch" for a in node.names):
        offenders.append(f"{name}:{node.lineno}")
      if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "torch":
        offenders.append(f"{name}:{node.lineno}")
  assert not offenders, ("import torch at the top of a test module fails without the "
                         f"extra; use pytest.importorskip('torch'): {offenders}")


def test_every_test_that_uses_torch_is_marked():
  unmarked = []
  for name, tree in _test_modules():
    aliases = _mark_aliases(tree)
    if any(isinstance(n, ast.Assign) and any(getattr(t, "id", "") == "pytestmark" for t in n.targets)
           and _is_torch_mark(n.value, aliases) for n in tree.body):
      continue
    funcs = [n for n in tree.body if isinstance(n, ast.FunctionDef)]
    helpers = set()  # module-level functions that reach torch, to a fixed point
    while True:
      found = {f.name for f in funcs if not f.name.startswith("test_")
               and _uses_torch(f, helpers)} - helpers
      if not found:
        break
      helpers |= found
    unmarked += [f"{name}::{f.name}" for f in funcs if f.name.startswith("test_")
                 and _uses_torch(f, helpers) and not _marked(f, aliases)]
  assert not unmarked, f"tests that use torch without @pytest.mark.torch: {unmarked}"
