"""CI runs the README's Quick start exactly as written, before anything else."""
import os
import re

from config_helpers import REPO_ROOT  # noqa: E402

REPO = REPO_ROOT


def _read(*parts):
  with open(os.path.join(REPO, *parts)) as f:
    return f.read()


def _quick_start_commands():
  readme = _read("README.md")
  section = readme.split("## Quick start", 1)[1].split("\n## ", 1)[0]
  return [block.strip() for block in re.findall(r"```bash\n(.*?)```", section, re.S)]


def _ci_commands():
  return [line.strip() for line in _read(".ci", "run").splitlines()
          if line.strip() and not line.lstrip().startswith("#")]


def test_ci_starts_with_the_readme_commands_verbatim():
  readme = _quick_start_commands()
  assert len(readme) == 2 and "pip install" in readme[0] and "pytest" in readme[1]
  assert "torch" not in readme[0], "the README's install must be the one without torch"
  ci = _ci_commands()
  positions = [ci.index(command) for command in readme]  # ValueError: not verbatim
  assert positions == sorted(positions)
  extra_stage = next(i for i, line in enumerate(ci) if "pip install" in line and "torch" in line)
  assert positions[-1] < extra_stage, "the torch extra must come after the README's tests"
  assert ci[extra_stage + 1:] and "-m torch" in " ".join(ci[extra_stage + 1:])
