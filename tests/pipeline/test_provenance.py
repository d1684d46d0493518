"""Provenance of finished artifacts, strict reuse, and branching a diverged run.

One tiny finished comparison (digits smoke size, one seed) is copied for each case:

* a rerun with changed ``bissl.lam``, ``finetune.lr`` and ``pretext.epochs``
  recomputes exactly the stages those fields (or their inputs) determine, and
  ``results.md`` shows the values that produced its numbers;
* ``reuse='strict'`` refuses, naming the field;
* ``bissl.lower_lr=1e30`` diverges, blamed on the lower level; the advised branch
  command (with a sane value) creates a new run directory that records its parent,
  reuses the unchanged stages and finishes.
"""
import contextlib
import io
import json
import os
import shutil

import pytest

from bissl_jax import cli
from bissl_jax.config_validation import ConfigError
from bissl_jax.runtime.errors import NonFiniteError
from bissl_jax.pipeline import run
from bissl_jax.pipeline.branch import BRANCH_FILE
from config_helpers import override
from configs import digits_simclr

pytestmark = pytest.mark.slow  # a tiny comparison and reruns of parts of it (~1-2 min)


def _config(**changes):
  config = override(digits_simclr.get_config("runlocal"), seeds=(0,))
  return override(config, **changes)


def _run(config, workdir, **kwargs):
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    try:
      results = run(config, workdir, **kwargs)
    except BaseException as e:
      e.stdout = out.getvalue()
      raise
  return results, out.getvalue()


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("parent") / "run")
  _run(_config(), workdir)
  return workdir


def _copy(source, tmp_path, name="run"):
  target = str(tmp_path / name)
  shutil.copytree(source, target)
  return target


def _meta(path):
  with open(os.path.join(path, "meta", "metadata")) as f:
    return json.load(f)


def test_a_changed_config_recomputes_the_stale_stages(finished, tmp_path):
  workdir = _copy(finished, tmp_path)
  changes = {"bissl.lam": 0.5, "finetune.lr": 0.5, "pretext.epochs": 3}
  results, out = _run(_config(**changes), workdir)
  seed = os.path.join(workdir, "seed0")
  for name, why in (("pretext/seed0", "['epochs'"), ("head_warmup/seed0", "input pretext"),
                    ("bissl/seed0", "'bissl.lam'"), ("finetune/baseline/seed0", "'lr'"),
                    ("finetune/bissl/seed0", "input backbone")):
    line = next((l for l in out.splitlines() if l.startswith(f"[{name}] the output")), "")
    assert why in line and "recomputing this stage" in line, (name, out)
  assert _meta(os.path.join(seed, "pretext", "output"))["epochs"] == 3
  fields = _meta(os.path.join(seed, "bissl", "bissl", "output"))["provenance"]["fields"]
  assert fields["bissl.lam"] == 0.5
  evaluation = json.load(open(os.path.join(seed, "baseline", "finetune", "evaluation.json")))
  assert evaluation["lr"] == 0.5
  assert results["pipelines"]["baseline"]["hyperparams"]["lr"] == 0.5
  assert results["pipelines"]["bissl"]["hyperparams"]["lr"] == 0.05  # bissl_lr, unchanged
  table = open(os.path.join(workdir, "results.md")).read()
  only_ft = next(l for l in table.splitlines() if l.startswith("| Only FT"))
  assert "| 0.5 |" in only_ft
  # The old outputs are kept aside, and a second rerun reuses everything.
  assert os.listdir(os.path.join(seed, "bissl", "bissl", "superseded"))
  _, again = _run(_config(**changes), workdir)
  assert "recomputing" not in again and "done:" not in again


def test_strict_reuse_refuses_naming_the_field(finished, tmp_path):
  workdir = _copy(finished, tmp_path)
  with pytest.raises(ConfigError, match=r"bissl/seed0.*'bissl.lam'.*--reuse=strict"):
    _run(_config(**{"bissl.lam": 0.5}), workdir, reuse="strict")
  # Nothing was recomputed or moved.
  assert not os.path.exists(os.path.join(workdir, "seed0", "bissl", "bissl", "superseded"))


def test_a_divergence_is_blamed_on_the_lower_level_and_branched(finished, tmp_path):
  parent = _copy(finished, tmp_path, "parent")
  config = _config(**{"bissl.lower_lr": 1e30})
  with pytest.raises(NonFiniteError) as err:
    _run(config, parent)
  assert err.value.field == "bissl.lower_lr"
  assert "lower-level" in str(err.value) and "upper_lr" not in str(err.value)
  argv = ["bissl-jax run", "--config=configs/digits_simclr.py:runlocal",
          f"--workdir={parent}", "--config.bissl.lower_lr=1e30"]
  advice = cli.branch_advice(err.value, argv, config)
  assert f"--branch_from={parent}" in advice and f"--workdir={parent}-branch1" in advice
  assert "--config.bissl.lower_lr=1e+29" in advice and "lower_lr=1e30" not in advice

  # The advised command, with a sane value.
  child = parent + "-branch1"
  results, out = _run(_config(**{"bissl.lower_lr": 0.5}), child, branch_from=parent)
  assert json.load(open(os.path.join(child, BRANCH_FILE)))["parent"] == parent
  assert "[pretext/seed0] done" not in out and "[head_warmup/seed0] done" not in out
  assert "[bissl/seed0] done: 4/4 alts" in out and results["pipelines"]["bissl"]["per_seed"]
  assert os.path.exists(os.path.join(child, "results.md"))
