"""The standalone example of docs/detection.md runs and prints what its comments say."""
import contextlib
import io
import os
import re

import numpy as np

from config_helpers import REPO_ROOT

_DOC = os.path.join(REPO_ROOT, "docs", "detection.md")
_NUMBER = r"-?\d+\.?\d*(?:e-?\d+)?"


def test_docs_example_prints_its_comments():
  text = open(_DOC, encoding="utf-8").read()
  code = re.search(r"```python\n(.*?)```", text, re.S).group(1)
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    exec(compile(code, _DOC, "exec"), {})  # pylint: disable=exec-used
  printed = [line for line in out.getvalue().splitlines() if line.strip()]
  expected = [line.split("# ", 1)[1] for line in code.splitlines()
              if "print(" in line and "# " in line]
  # Multi-line prints (numpy arrays) are joined before comparing their numbers.
  got = re.findall(_NUMBER + r"|True|False", " ".join(printed))
  want = re.findall(_NUMBER + r"|True|False", " ".join(expected))
  assert len(got) == len(want), (got, want)
  for g, w in zip(got, want):
    if w in ("True", "False"):
      assert g == w
    else:
      np.testing.assert_allclose(float(g), float(w), rtol=1e-6)
