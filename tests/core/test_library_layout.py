"""The library stays readable: short functions, modules of one job, few top-level modules."""
import ast
import os

from config_helpers import REPO_ROOT

PACKAGE = os.path.join(REPO_ROOT, "bissl_jax")
MAX_FUNCTION_LINES = 120
MAX_MODULE_LINES = 500
MAX_TOP_LEVEL_MODULES = 8


def _modules():
  for root, _, files in os.walk(PACKAGE):
    for name in sorted(files):
      if name.endswith(".py"):
        yield os.path.join(root, name)


def test_no_function_is_longer_than_the_limit():
  long = []
  for path in _modules():
    for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
      if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        lines = node.end_lineno - node.lineno + 1
        if lines > MAX_FUNCTION_LINES:
          long.append(f"{os.path.relpath(path, REPO_ROOT)}:{node.lineno} {node.name} ({lines})")
  assert not long, f"functions over {MAX_FUNCTION_LINES} lines: {long}"


def test_no_module_is_longer_than_the_limit():
  long = [f"{os.path.relpath(p, REPO_ROOT)} ({n})" for p in _modules()
          if (n := sum(1 for _ in open(p, encoding="utf-8"))) > MAX_MODULE_LINES]
  assert not long, f"modules over {MAX_MODULE_LINES} lines: {long}"


def test_the_package_shows_its_layers():
  top = sorted(n for n in os.listdir(PACKAGE) if n.endswith(".py"))
  assert len(top) <= MAX_TOP_LEVEL_MODULES, f"top-level modules: {top}"
  for package in ("implicit", "core", "models", "tasks", "evaluation", "runtime", "pipeline",
                  "data", "convert"):
    assert os.path.isfile(os.path.join(PACKAGE, package, "__init__.py")), package
