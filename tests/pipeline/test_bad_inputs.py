"""Bad inputs stop with one message (exit 2, no traceback) before compute; prompt stops.

Config-level cases call ``validate_config``; command-line cases run the entry point
(a config file that raises or does not parse, a repeated tuple override), and one
runs a stage whose first step "compiles" for a minute and is sent SIGTERM.
"""
import os
import signal
import subprocess
import sys
import time

import pytest

from bissl_jax import cli
from bissl_jax import config_bounds
from bissl_jax.config_validation import ConfigError, validate_config
from config_helpers import override
from configs import digits_simclr

from config_helpers import REPO_ROOT  # noqa: E402

ROOT = REPO_ROOT
ENV = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")

CASES = [
    ({"data.split_seed": -1}, "data.split_seed"),
    ({"model.dtype": "foo"}, "model.dtype"),
    ({"bissl.cg_iters": 100000}, "bissl.cg_iters"),
    ({"bissl.cg_iters": 100000, "bissl.unroll": True}, "bissl.cg_iters"),
    ({"model.width_multiplier": 0.001}, "model.width_multiplier"),
]


@pytest.mark.parametrize("changes,field", CASES, ids=[str(c) for c, _ in CASES])
def test_bad_value_is_refused_before_compute(changes, field):
  config = override(digits_simclr.get_config("runlocal"), **changes)
  with pytest.raises(ConfigError, match=f"config.{field}"):
    validate_config(config, num_devices=1)


def test_bounds_accept_what_runs():
  config = override(digits_simclr.get_config("runlocal"), **{
      "bissl.cg_iters": config_bounds.MAX_UNROLLED_SOLVER_ITERS})
  validate_config(config, num_devices=1)
  # A lax loop compiles once for any count: no bound there.
  validate_config(override(config, **{"bissl.cg_iters": 100000, "bissl.unroll": False}),
                  num_devices=1)
  vit = override(digits_simclr.get_config("runlocal"), **{
      "model.arch": "vit_test_patch4", "model.dtype": "bfloat16", "pretext.task": "mae"})
  assert not [p for p in config_bounds.problems(
      vit, lambda c, f: c[f.split(".")[0]][f.split(".")[1]], "cpu") if "dtype" in p]


def test_cg_iters_message_names_the_fix():
  config = override(digits_simclr.get_config("runlocal"), **{"bissl.cg_iters": 100000})
  with pytest.raises(ConfigError, match="bissl.unroll=False"):
    validate_config(config, num_devices=1)


def _cli(*args, timeout=300):
  return subprocess.run([sys.executable, "-m", "experiments.main", *args], cwd=ROOT, env=ENV,
                        capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("body,shown", [
    ('def get_config(arg=""):\n  raise RuntimeError("boom")\n', "line 2: RuntimeError: boom"),
    ('def get_config(arg=""):\n  return {\n', "SyntaxError"),
])
def test_a_config_file_that_fails_is_one_message(tmp_path, body, shown):
  path = tmp_path / "broken.py"
  path.write_text(body)
  result = _cli(f"--config={path}", f"--workdir={tmp_path / 'w'}")
  assert result.returncode == 2, result.stderr[-2000:]
  assert "the config file failed to load" in result.stderr and shown in result.stderr
  assert "Traceback" not in result.stderr


def test_a_repeated_override_replaces_the_earlier_one():
  argv = ["prog", "--config=x.py", "--config.seeds=(0,)", "--config.bissl.lam=0.1",
          "--config.seeds=(1,)", "--noconfig.search.enabled", "--config.search.enabled"]
  assert cli._last_override_wins(argv) == [
      "prog", "--config=x.py", "--config.bissl.lam=0.1", "--config.seeds=(1,)",
      "--config.search.enabled"]


def test_a_repeated_tuple_override_runs_only_the_last_value(tmp_path):
  # --help would not parse the overrides; an invalid stage stops right after parsing
  # and its message shows the parsed seeds.
  result = _cli("--config=configs/digits_simclr.py:runlocal", f"--workdir={tmp_path / 'w'}",
                "--config.seeds=(0,)", "--config.seeds=(1,)", "--config.seeds=(0, 0)")
  assert result.returncode == 2 and "config.seeds=(0, 0)" in result.stderr, result.stderr


STALLED = r"""
import sys, time
import jax.numpy as jnp
from bissl_jax.core.state import LevelState
from bissl_jax.pipeline import stage_loop

class Data:
  def __len__(self): return 8
  def batch(self, rows): return {"x": rows}

stage_loop.install_stop_handlers()
def step(state, i, batch):
  print("compiling", flush=True)
  time.sleep(120)  # stands in for a compilation that holds the main thread
  return state, {"loss": 0.0}
stage = stage_loop.Stage(name="slow/seed0", total_steps=4, step=step,
                         data=stage_loop.EpochData(Data(), 4, seed=0, steps_per_epoch=2),
                         steps_per_epoch=2, checkpoint_dir=sys.argv[1], checkpoint_every=1)
stage_loop.run_stage(stage, LevelState(jnp.zeros(2), {}, {}, jnp.zeros((), jnp.int32)))
"""


def test_sigterm_during_compilation_exits_promptly(tmp_path):
  proc = subprocess.Popen([sys.executable, "-c", STALLED, str(tmp_path / "ckpt")], cwd=ROOT,
                          env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  for line in proc.stdout:
    if line.strip() == "compiling":
      break
  sent = time.time()
  proc.send_signal(signal.SIGTERM)
  out, err = proc.communicate(timeout=60)
  assert proc.returncode == 130, err[-2000:]
  assert time.time() - sent < 20  # not the 120 s "compilation"
  assert "SIGTERM received while slow/seed0 compiles its first step" in out
  assert "Traceback" not in err


@pytest.mark.parametrize("field,value", [
    ("pretext.batch_size", 1000000), ("data.max_train_examples", 1),
    ("data.val_fraction", 0.999)])
def test_a_split_smaller_than_a_batch_is_a_config_error(field, value):
  # The sizes are known only once the data is loaded; the stage's own check must
  # still be a user error (exit 2 without a traceback), not a bare ValueError.
  from bissl_jax.pipeline import context, load_data
  config = override(digits_simclr.get_config("runlocal"), **{field: value})
  _, pretext_set = load_data(config, need_pretext=True, need_downstream=False)
  with pytest.raises(ConfigError, match="config.pretext.batch_size") as err:
    context.check_size(len(pretext_set), config.pretext.batch_size, "pretext.batch_size",
                       "the pretext set")
  assert cli.user_error_message(err.value).startswith("error: config.pretext.batch_size")


def test_a_full_disk_is_one_message(tmp_path, monkeypatch, capsys):
  import errno
  from bissl_jax.pipeline import comparison, runner
  from bissl_jax.pipeline import results as results_lib
  from test_run_records import _fake_comparison
  monkeypatch.setattr(comparison, "run_comparison", _fake_comparison)
  monkeypatch.setattr(results_lib, "plot_curves", lambda workdir: [])

  def full(path, record):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)
  monkeypatch.setattr(results_lib, "write_json", full)
  with pytest.raises(SystemExit) as exit_:
    with cli.error_boundary():
      runner.run(digits_simclr.get_config("runlocal"), str(tmp_path / "run"))
  assert exit_.value.code == 2
  err = capsys.readouterr().err
  assert err.startswith("error: the disk is full (No space left on device while writing ")
  assert "wall_times.json" in err and "rerun the same command" in err
  assert "Traceback" not in err
