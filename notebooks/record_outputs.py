"""Runs every cell of quickstart.ipynb on the CPU at a tiny budget and saves the outputs.

::

  python notebooks/record_outputs.py [--workdir DIR]

The parameters cell is replaced by :func:`tiny_parameters` for the run (no install, one
seed, a ResNet-18 of width 1/16 at 16 px, one epoch per stage, two BiSSL alternations of
one lower and one upper step), then put back as written, so the saved notebook keeps its
real parameters and shows what every other cell prints and draws. The run's numbers mean
nothing. Needs nbclient and ipykernel.
"""
import argparse
import os
import tempfile

NOTEBOOK = os.path.join(os.path.dirname(os.path.abspath(__file__)), "quickstart.ipynb")

TINY_BUDGET = {
    "data.image_size": 16,
    "model.width_multiplier": 0.0625,
    "model.projector": "32-32-32",
    "pretext.epochs": 1,
    "pretext.warmup_epochs": 0,
    "head_warmup.epochs": 1,
    "bissl.alternations": 2,
    "bissl.lower_steps": 1,
    "bissl.upper_steps": 1,
    "bissl.residual_every": 1,  # 2 upper steps in all: check both, for the residual panel
    "bissl.cg_iters": 1,
    "bissl.pretext_batch_size": 64,
    "bissl.downstream_batch_size": 64,
    "finetune.epochs": 1,
    "log_every": 1,
}


def tiny_parameters(workdir: str) -> str:
  """The parameters cell of the tiny run (the names of the notebook's own cell)."""
  return "\n".join([
      "INSTALL = False",
      'REPO_URL = ""',
      f"WORKDIR = {workdir!r}",
      "SEEDS = (0,)",
      f"BUDGET = {TINY_BUDGET!r}",
      "TSNE_BATCHES = 2",
      "TSNE_POINTS = 200",
  ])


def parameter_cell(nb):
  cells = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
  if len(cells) != 1:
    raise ValueError("the notebook needs exactly one cell tagged 'parameters'")
  return cells[0]


def execute_tiny(nb, workdir: str, timeout: int = 600):
  """Executes ``nb`` in place on the CPU with the tiny parameters (outputs in its cells)."""
  import nbclient  # pylint: disable=g-import-not-at-top  (optional dependency)
  cell = parameter_cell(nb)
  written = cell.source
  cell.source = tiny_parameters(workdir)
  # The kernel inherits this environment: CPU only, fast compiles, no display.
  os.environ.update(JAX_PLATFORMS="cpu", JAX_DISABLE_MOST_OPTIMIZATIONS="1",
                    MPLBACKEND="Agg")
  client = nbclient.NotebookClient(
      nb, timeout=timeout, kernel_name="python3", allow_errors=False,
      resources={"metadata": {"path": os.path.dirname(NOTEBOOK)}})
  try:
    client.execute()  # raises CellExecutionError on the first cell that raises
  finally:
    cell.source = written
  return nb


def main() -> None:
  import nbformat  # pylint: disable=g-import-not-at-top
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--workdir", default=None, help="run directory (default: a temporary one)")
  args = parser.parse_args()
  nb = nbformat.read(NOTEBOOK, as_version=4)
  with tempfile.TemporaryDirectory() as tmp:
    execute_tiny(nb, os.path.abspath(args.workdir or os.path.join(tmp, "run")))
  cell = parameter_cell(nb)
  cell.outputs, cell.execution_count = [], None  # its outputs: none; its source: as written
  nbformat.write(nb, NOTEBOOK)
  print(f"saved the outputs of a tiny CPU run into {NOTEBOOK}")


if __name__ == "__main__":
  main()
