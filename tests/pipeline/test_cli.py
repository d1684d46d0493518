"""The command line: messages instead of tracebacks, --help, subcommands, any directory.

Every subprocess runs from a fresh temporary directory (not the repository root) with
only the repository on PYTHONPATH, as a user's shell would after ``pip install``; each
stops before any compute, in a few seconds.
"""
import ast
import os
import subprocess
import sys

import pytest

from bissl_jax import cli
from bissl_jax.config_validation import ConfigError, check_field_names, config_fields
from bissl_jax.runtime.errors import NonFiniteError
from configs import common
from config_helpers import REPO_ROOT

REPO = REPO_ROOT


def _run(args, cwd, **env):
  environ = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
  environ.pop(cli.DEBUG_ENV, None)
  environ.update(env)
  return subprocess.run([sys.executable] + list(args), cwd=str(cwd), capture_output=True,
                        text=True, timeout=300, env=environ)


def _assert_user_error(proc):
  assert proc.returncode == cli.USER_ERROR_STATUS, (proc.stdout, proc.stderr)
  assert "Traceback" not in proc.stderr + proc.stdout
  assert "--debug" in proc.stderr  # says how to see the traceback


def test_typo_in_a_field_is_ours_with_did_you_mean(tmp_path):
  proc = _run(["-m", "bissl_jax", "run", f"--workdir={tmp_path / 'w'}",
               "--config.bissl.lamm=0.1"], tmp_path)
  _assert_user_error(proc)
  assert "config.bissl.lamm: unknown field; did you mean 'bissl.lam'" in proc.stderr
  assert "bissl-jax run --help" in proc.stderr
  assert not (tmp_path / "w").exists()


def test_field_in_the_wrong_group_is_found(tmp_path):
  proc = _run(["-m", "experiments.main", "--config.lam=0.1"], tmp_path)
  _assert_user_error(proc)
  assert "config.lam: unknown field; did you mean 'bissl.lam'" in proc.stderr


def test_invalid_value_names_field_and_fix_and_debug_shows_traceback(tmp_path):
  args = [os.path.join(REPO, "experiments", "main.py"), f"--workdir={tmp_path / 'w'}",
          "--config.bissl.lam=-1"]
  proc = _run(args, tmp_path)
  _assert_user_error(proc)
  assert "config.bissl.lam=-1.0: the regularisation weight λ must be >= 0" in proc.stderr
  assert not (tmp_path / "w").exists()
  for debug in (dict(args=args + ["--debug"]), dict(args=args, BISSL_JAX_DEBUG="1")):
    proc = _run(debug.pop("args"), tmp_path, **debug)
    assert proc.returncode != 0 and "Traceback" in proc.stderr and "ConfigError" in proc.stderr


def test_unparsable_value_is_a_message(tmp_path):
  proc = _run(["-m", "bissl_jax", "run", "--config.bissl.lam=abc"], tmp_path)
  _assert_user_error(proc)
  assert "--config.bissl.lam=abc" in proc.stderr


def test_every_missing_dataset_in_one_message(tmp_path):
  """Pretext and downstream both missing: both named, each with its command, no TFDS lines."""
  data_dir = tmp_path / "tfds"
  data_dir.mkdir()
  proc = _run(["-m", "bissl_jax", "run", "--config=configs/imagenet_simclr.py:downstream=dtd",
               f"--config.data.data_dir={data_dir}", f"--workdir={tmp_path / 'w'}"], tmp_path)
  _assert_user_error(proc)
  err = proc.stderr
  assert "2 datasets are not prepared" in err
  assert "'imagenet2012' (pretext" in err and "'dtd' (downstream" in err
  assert f"tfds build imagenet2012 --data_dir={data_dir}" in err
  assert f"tfds build dtd --data_dir={data_dir}" in err
  assert "ILSVRC2012_img_train.tar" in err and "config.data.data_dir" in err
  assert "already prepared" not in err and "dataset_info.json" not in err  # TFDS's lines
  assert not os.listdir(data_dir) and not (tmp_path / "w").exists()


def test_weights_that_do_not_load_are_a_message(tmp_path):
  (tmp_path / "nothing").mkdir()  # there, but no weights in it (a missing path stops earlier)
  proc = _run(["-m", "bissl_jax", "run", "--config=configs/digits_simclr.py:runlocal",
               "--config.stages=finetune",
               f"--config.finetune.init_checkpoint={tmp_path / 'nothing'}",
               f"--workdir={tmp_path / 'w'}"], tmp_path)
  _assert_user_error(proc)
  assert "the weights could not be loaded" in proc.stderr
  assert str(tmp_path / "nothing") in proc.stderr
  # The banner came first, once.
  assert proc.stdout.count("bissl-jax: backend cpu") == 1
  assert f"workdir  {tmp_path / 'w'} (fresh)" in proc.stdout
  # The run set the library's CPU kernels before the backend started, and says so.
  assert "kernels  XLA:CPU fast (config.model.cpu_kernels" in proc.stdout
  assert "not in effect" not in proc.stderr


def test_unknown_cpu_kernels_is_a_message_before_any_compute(tmp_path):
  proc = _run(["-m", "bissl_jax", "run", "--config.model.cpu_kernels=turbo",
               f"--workdir={tmp_path / 'w'}"], tmp_path)
  _assert_user_error(proc)
  assert "model.cpu_kernels='turbo' is not one of ('fast', 'default')" in proc.stderr
  assert not (tmp_path / "w").exists()


def test_error_boundary_messages_and_bugs(capsys):
  with pytest.raises(SystemExit) as stop:
    with cli.error_boundary():
      raise NonFiniteError("[bissl/seed0] alternation 3: lower loss is nan; lower "
                           "config.bissl.lower_lr")
  assert stop.value.code == cli.USER_ERROR_STATUS
  err = capsys.readouterr().err
  assert "training diverged" in err and "config.bissl.lower_lr" in err
  with pytest.raises(NonFiniteError):  # --debug: the exception itself
    with cli.error_boundary(debug=True):
      raise NonFiniteError("x")
  with pytest.raises(ValueError):  # a ValueError that is not the converter's is a bug
    with cli.error_boundary():
      raise ValueError("a bug")


def test_help_lists_every_config_field(tmp_path):
  proc = _run(["-m", "bissl_jax", "run", "--help"], tmp_path)
  assert proc.returncode == 0, proc.stderr
  lines = proc.stdout.splitlines()
  fields = config_fields(common.base_config())
  for name in fields:
    line = next((l for l in lines if l.split()[:1] == [name]), None)
    assert line is not None, f"{name} missing from --help"
    assert common.FIELD_HELP[name] in line
  assert set(common.FIELD_HELP) == set(fields)  # no stale descriptions either
  bissl_lam = next(l for l in lines if l.split()[:1] == ["bissl.solver"])
  assert "layerwise_cg" in bissl_lam and "minres" in bissl_lam  # from the registry
  # --helpfull of the old entry point prints the same listing.
  old = _run(["-m", "experiments.main", "--helpfull"], tmp_path)
  assert old.returncode == 0 and old.stdout == proc.stdout


def test_help_shows_the_chosen_config_values(tmp_path):
  proc = _run(["-m", "bissl_jax", "run", "--config=configs/stl10_simclr.py:runlocal",
               "--help"], tmp_path)
  assert proc.returncode == 0, proc.stderr
  row = next(l for l in proc.stdout.splitlines() if l.split()[:1] == ["data.image_size"])
  assert row.split()[1] == "8" and "[default: 96]" in row


def test_console_script_and_subcommands(tmp_path):
  tree = ast.parse(open(os.path.join(REPO, "setup.py")).read())
  scripts = [ast.literal_eval(kw.value) for node in ast.walk(tree)
             if isinstance(node, ast.Call) for kw in node.keywords
             if kw.arg == "entry_points"]
  assert scripts == [{"console_scripts": ["bissl-jax=bissl_jax.cli:main"]}]
  proc = _run(["-m", "bissl_jax"], tmp_path)
  assert proc.returncode == cli.USER_ERROR_STATUS
  for command in ("run", "visualize", "convert"):
    assert f"  {command} " in proc.stdout
  proc = _run(["-m", "bissl_jax", "convert", "--to-torch", str(tmp_path / "none"),
               "--arch", "resnet18", "--out", str(tmp_path / "x.pth")], tmp_path)
  assert proc.returncode == cli.USER_ERROR_STATUS and "Traceback" not in proc.stderr
  assert str(tmp_path / "none") in proc.stderr
  proc = _run(["-m", "bissl_jax", "visualize", "--help"], tmp_path)
  assert proc.returncode == 0 and "--backbone" in proc.stdout
  proc = _run(["-m", "bissl_jax", "runn"], tmp_path)
  assert proc.returncode == cli.USER_ERROR_STATUS and "Did you mean 'run'" in proc.stderr


def test_check_field_names_did_you_mean():
  config = common.base_config()
  check_field_names(config, ["bissl.lam", "data", "bissl_variants"])
  with pytest.raises(ConfigError) as err:
    check_field_names(config, ["bissl.lamm", "lam", "model.qxqxqxqxqxqx_w"], hint="see --help")
  lines = str(err.value).splitlines()
  assert lines[0].startswith("config.bissl.lamm: unknown field; did you mean 'bissl.lam'")
  assert lines[1].startswith("config.lam: unknown field; did you mean 'bissl.lam'")
  assert lines[2] == "config.model.qxqxqxqxqxqx_w: unknown field; no field of that name."
  assert lines[3] == "see --help"
