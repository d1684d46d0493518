"""The Colab quickstart notebook: structure, and a full execution at a tiny budget.

The execution test replaces the cell tagged ``parameters`` with a tiny budget (no
install, a temporary workdir, one seed, a ResNet-18 of width 4 at 16 px, one epoch
per stage, two BiSSL alternations of one lower and one upper step) and runs every
cell with nbclient; any cell that raises fails the test.
"""
import ast
import os
import shutil
import subprocess
import sys

import pytest
from config_helpers import REPO_ROOT

nbformat = pytest.importorskip("nbformat")

NOTEBOOK = os.path.join(REPO_ROOT, "notebooks", "quickstart.ipynb")

sys.path.insert(0, os.path.join(REPO_ROOT, "notebooks"))
import record_outputs  # noqa: E402  (the tiny budget of the saved outputs, one definition)

_tiny_parameters = record_outputs.tiny_parameters


def _assigned_names(source: str) -> set:
  return {target.id for node in ast.parse(source).body if isinstance(node, ast.Assign)
          for target in node.targets if isinstance(target, ast.Name)}


def _read():
  return nbformat.read(NOTEBOOK, as_version=4)


def _parameter_cell(nb):
  cells = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
  assert len(cells) == 1, "the notebook needs exactly one cell tagged 'parameters'"
  return cells[0]


def test_notebook_structure():
  nb = _read()
  nbformat.validate(nb)
  cell = _parameter_cell(nb)
  assert cell.cell_type == "code"
  # The injected cell sets exactly the knobs the notebook declares.
  assert _assigned_names(cell.source) == _assigned_names(_tiny_parameters("w"))
  assert not cell.outputs and cell.execution_count is None  # its source is not what ran
  for c in nb.cells:
    if c.cell_type == "code":
      compile(c.source, "<cell>", "exec")  # every cell is valid Python
  assert "<owner>" not in "\n".join(c.source for c in nb.cells)  # no placeholder to edit
  sources = "\n".join(c.source for c in nb.cells)
  for needle in ("pipeline.run(config, WORKDIR)", "implicit_grad", "jax.default_backend()",
                 "plots.plot_run", "visualize_run.visualize_run", "imagenet_simclr.py",
                 "if INSTALL"):
    assert needle in sources, needle


def test_saved_outputs_are_those_of_a_run_of_every_cell():
  """Readers see what each cell does: the outputs of notebooks/record_outputs.py's run."""
  nb = _read()
  code = [c for c in nb.cells if c.cell_type == "code"]
  ran = [c for c in code if c is not _parameter_cell(nb)]
  assert all(c.outputs and c.execution_count for c in ran), "run notebooks/record_outputs.py"
  counts = [c.execution_count for c in ran]
  assert counts == sorted(counts) and len(set(counts)) == len(counts)  # one run, in order
  outputs = [o for c in ran for o in c.outputs]
  assert not [o for o in outputs if o.output_type == "error"]
  text = "".join(o.get("text", "") for o in outputs)
  assert "backend 'cpu'" in text and "pipeline finished" in text
  assert len([o for o in outputs if "image/png" in o.get("data", {})]) >= 5
  assert "record_outputs.py" in nb.cells[0].source  # the first cell says where they come from


def _cell_with(nb, needle):
  cells = [c for c in nb.cells if c.cell_type == "code" and needle in c.source]
  assert len(cells) == 1, needle
  return cells[0]


def _install_helpers(nb) -> dict:
  """The functions of the install cell, defined in a namespace of their own."""
  tree = ast.parse(_cell_with(nb, "def jax_constraints").source)
  defs = [n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.Import, ast.ImportFrom))]
  namespace = {}
  code = compile(ast.Module(body=defs, type_ignores=[]), "<install>", "exec")
  exec(code, namespace)  # pylint: disable=exec-used
  return namespace


def test_install_keeps_the_runtimes_jax(tmp_path):
  from importlib import metadata
  helpers = _install_helpers(_read())
  pins = helpers["jax_constraints"](REPO_ROOT)
  assert pins.splitlines() == [f"jax=={metadata.version('jax')}",
                               f"jaxlib=={metadata.version('jaxlib')}"]
  # A JAX outside setup.py's range stops with the command that fixes it.
  (tmp_path / "setup.py").write_text('INSTALL_REQUIRES = ["jax>=0.1,<0.2"]')
  with pytest.raises(RuntimeError, match=r"jax\[tpu\]>=0.1,<0.2.*restart the runtime"):
    helpers["jax_constraints"](str(tmp_path))
  # The pins reach pip: the install command carries the constraints file.
  source = _cell_with(_read(), "def jax_constraints").source
  assert 'pip += ["-c", "jax_constraints.txt"]' in source


def test_colab_link_from_the_repository_url():
  nb = _read()
  colab_link = _install_helpers(nb)["colab_link"]
  want = ("https://colab.research.google.com/github/someone/bissl_jax/blob/main/notebooks/"
          "quickstart.ipynb")
  assert colab_link("https://github.com/someone/bissl_jax.git") == want
  assert colab_link("https://github.com/someone/bissl_jax/") == want
  assert "Open in Colab" in nb.cells[0].source
  assert "REPO_URL" in _parameter_cell(nb).source


def test_float32_checks_run_at_highest_precision_and_text_matches_config():
  nb = _read()
  cell = _cell_with(nb, "< 1e-4")
  assert 'with jax.default_matmul_precision("highest"):' in cell.source
  assert cell.source.index("default_matmul_precision") < cell.source.index("implicit_grad(")
  from configs import digits_simclr  # pylint: disable=g-import-not-at-top
  config = digits_simclr.get_config()
  text = "\n".join(c.source for c in nb.cells if c.cell_type == "markdown")
  assert f"upscaled to {config.data.image_size} px" in text
  width = {0.125: "width 1/8"}[config.model.width_multiplier]
  assert width in text and "ResNet-18" in text and config.model.arch == "resnet18"


@pytest.mark.slow  # runs the whole notebook (minutes)
def test_notebook_executes_at_tiny_budget(tmp_path, monkeypatch):
  pytest.importorskip("bissl_jax.pipeline")
  nbclient = pytest.importorskip("nbclient")
  nb = _read()
  workdir = str(tmp_path / "run")
  _parameter_cell(nb).source = _tiny_parameters(workdir)
  # The kernel inherits this environment: CPU only, fast compiles, and this interpreter.
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  monkeypatch.setenv("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")
  monkeypatch.setenv("MPLBACKEND", "Agg")
  client = nbclient.NotebookClient(
      nb, timeout=600, kernel_name="python3", allow_errors=False,
      resources={"metadata": {"path": os.path.join(REPO_ROOT, "notebooks")}})
  client.execute()  # raises CellExecutionError on the first cell that raises

  for name in ("results.md", "results.json", "metrics.jsonl", os.path.join("plots", "validation.png"),
               os.path.join("plots", "seed0", "tsne.png"),
               os.path.join("plots", "seed0", "bissl_losses.png")):
    assert os.path.isfile(os.path.join(workdir, name)), name
  outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
  images = [o for o in outputs if "image/png" in o.get("data", {})]
  assert len(images) >= 5  # 3 BiSSL panels, validation curves, t-SNE
  text = "".join(o.get("text", "") for o in outputs)
  assert "pipeline finished" in text
  assert "backend 'cpu'" in text


def _copy_of_the_repository(target: str) -> str:
  shutil.copytree(REPO_ROOT, target, ignore=shutil.ignore_patterns(
      ".git", ".venv", "__pycache__", "runs", "workdir*", "*.egg-info", ".pytest_cache",
      ".ipynb_checkpoints"))
  return target


@pytest.mark.slow  # a new virtual environment and a pip install (about a minute)
def test_notebook_installs_into_a_fresh_venv(tmp_path):
  """The install cell with INSTALL=True in a new venv, then the device and §3 cells.

  The venv sees this interpreter's packages through a ``.pth`` file (so JAX is
  "preinstalled", as on Colab, and nothing heavy is downloaded) but not bissl_jax:
  the cell must install it from the checkout, keep the installed JAX version, and
  install the ``bissl-jax`` console script. pip fetches only the build backend.
  """
  import sysconfig  # pylint: disable=g-import-not-at-top
  from importlib import metadata  # pylint: disable=g-import-not-at-top
  repo = _copy_of_the_repository(str(tmp_path / "checkout"))
  venv = str(tmp_path / "venv")
  subprocess.run([sys.executable, "-m", "venv", venv], check=True, timeout=300)
  python = os.path.join(venv, "bin", "python")
  purelib = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()"
                            "['purelib'])"], check=True, capture_output=True, text=True
                           ).stdout.strip()
  with open(os.path.join(purelib, "test_interpreter_packages.pth"), "w") as f:
    f.write(sysconfig.get_paths()["purelib"] + "\n")

  nb = _read()
  code = [c.source for c in nb.cells if c.cell_type == "code"]
  params = _tiny_parameters(str(tmp_path / "run")).replace("INSTALL = False",
                                                           "INSTALL = True")
  cells = [params] + [c for c in code[1:] if "def jax_constraints" in c or
                      "jax.default_backend()" in c or "implicit_grad(" in c]
  assert len(cells) == 4
  script = tmp_path / "first_cells.py"
  script.write_text("\n\n".join(cells))
  env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH",)}
  env.update(JAX_PLATFORMS="cpu", PIP_DISABLE_PIP_VERSION_CHECK="1")
  proc = subprocess.run([python, str(script)], cwd=os.path.join(repo, "notebooks"),
                        capture_output=True, text=True, timeout=900, env=env)
  assert proc.returncode == 0, (proc.stdout, proc.stderr)
  jax_version = metadata.version("jax")
  assert f"keeping the installed jax=={jax_version}" in proc.stdout
  assert f"from {os.path.join(repo, 'bissl_jax')}" in proc.stdout
  assert f"JAX {jax_version}: backend 'cpu'" in proc.stdout
  after = subprocess.run([python, "-c", "import jax; print(jax.__version__)"],
                         capture_output=True, text=True, cwd=str(tmp_path), env=env)
  assert after.stdout.strip() == jax_version
  helped = subprocess.run([os.path.join(venv, "bin", "bissl-jax"), "run", "--help"],
                          capture_output=True, text=True, cwd=str(tmp_path), env=env,
                          timeout=300)
  assert helped.returncode == 0 and "bissl.lam" in helped.stdout, helped.stderr
