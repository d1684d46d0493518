"""Bad configs are rejected before any compute, with the offending field named."""
import os
import subprocess
import sys

import pytest
from absl import flags

from bissl_jax import data as data_lib
from bissl_jax.config_validation import ConfigError, validate_config
from bissl_jax.pipeline import run
from config_helpers import override
from configs import common, digits_simclr, imagenet_byol, imagenet_simclr, stl10_simclr
from config_helpers import REPO_ROOT


def _config(as_dict=False, **changes):
  config = digits_simclr.get_config()
  if as_dict:  # plain dicts accept values of any type (ConfigDicts refuse wrong types)
    config = config.to_dict()
  return override(config, **changes)


@pytest.mark.parametrize("config", [
    digits_simclr.get_config(), digits_simclr.get_config("runlocal"),
    stl10_simclr.get_config(), stl10_simclr.get_config("runlocal"),
    imagenet_simclr.get_config(), imagenet_byol.get_config("downstream=dtd"),
    imagenet_simclr.get_config("downstream=voc2007,runlocal"),
], ids=["digits", "digits-runlocal", "stl10", "stl10-runlocal", "imagenet-simclr",
        "imagenet-byol-dtd", "imagenet-voc-runlocal"])
def test_shipped_configs_are_valid(config):
  # validate_config raises ConfigError naming every bad field, else returns the
  # resolved config: the placeholders filled, the input untouched.
  resolved = validate_config(config, num_devices=1)
  assert config.bissl.upper_lr is None
  assert resolved.bissl.upper_lr == config.head_warmup.lr
  assert resolved.bissl.upper_weight_decay == config.head_warmup.weight_decay
  assert validate_config(resolved, num_devices=1).to_dict() == resolved.to_dict()


def test_an_explicit_upper_lr_is_kept():
  resolved = validate_config(_config(**{"bissl.upper_lr": 0.123}), num_devices=1)
  assert resolved.bissl.upper_lr == 0.123


def test_choices_come_from_the_registries(monkeypatch):
  from bissl_jax.implicit import solvers
  config = _config(**{"bissl.solver": "my_solver"})
  with pytest.raises(ConfigError, match="bissl.solver"):
    validate_config(config, num_devices=1)
  spec = solvers.SolverSpec(name="my_solver", solve=solvers.SOLVERS["cg"])
  monkeypatch.setitem(solvers.REGISTRY, "my_solver", spec)
  validate_config(config, num_devices=1)  # registered: now valid


def test_configs_hold_every_bissl_setup_field():
  """The configs are the one source of defaults: every BisslSetup field is in them."""
  from bissl_jax.core import state as bilevel
  missing = sorted(set(bilevel.BisslSetup.field_names()) - set(common.base_config().bissl))
  assert not missing, f"add these fields to configs/common.py:base_config().bissl: {missing}"


@pytest.mark.parametrize("field, value, words", [
    ("bissl.lam", -0.1, ">= 0"),
    ("bissl.damping", -1.0, ">= 0"),
    ("data.downstream_dataset", "mnist_typo", "unknown dataset"),
    ("data.pretext_dataset", "imagenet21k", "unknown dataset"),
    ("bissl.solver", "newton", "unknown value"),
    ("pretext.task", "no_such_task", "unknown value"),
    ("stages", "train", "unknown value"),
    ("bissl.hessian_mode", "exact", "unknown value"),
    ("bissl.stage_driver", "threaded", "unknown value"),
    ("bissl.upper_momentum", 1.0, "[0, 1)"),
    ("bissl.grad_clip", 0.0, "> 0"),
    ("bissl.unroll", "yes", "True, False or None"),
    ("bissl.lam_schedule", "linear", "unknown value"),
    ("model.arch", "resnet1001", "unknown value"),
    ("bissl.lower_steps", 0, "> 0"),
    ("bissl.upper_steps", -2, "> 0"),
    ("bissl.alternations", 0, "> 0"),
    ("bissl.cg_iters", 0, "> 0"),
    ("bissl.checkpoint_every", 0, "> 0"),
    ("finetune.epochs", 0, "> 0"),
    ("head_warmup.epochs", -1, "> 0"),
    ("pretext.epochs", -1, ">= 0"),
    ("finetune.lr", 0.0, "> 0"),
    ("finetune.weight_decay", -1e-4, ">= 0"),
    ("bissl.lower_steps", 2.5, "integer"),
    ("bissl.lower_steps", "20", "integer"),
    ("data.val_fraction", 1.0, "between 0 and 1"),
    ("pretext.ema_decay", 1.0, "[0, 1)"),
    ("finetune.momentum", 1.5, "[0, 1)"),
    ("seeds", (), "non-empty"),
    ("seeds", (0, 0), "duplicates"),
    ("data.image_size", 0, "> 0"),
    ("log_every", 0, "> 0"),
])
def test_bad_field_is_named(field, value, words):
  with pytest.raises(ConfigError) as err:
    validate_config(_config(as_dict=True, **{field: value}), num_devices=1)
  message = str(err.value)
  assert f"config.{field}=" in message
  assert words in message


def test_search_ranges_checked_only_when_enabled():
  validate_config(_config(**{"search.lr_range": (1.0, 1e-4)}), num_devices=1)
  with pytest.raises(ConfigError, match=r"config\.search\.lr_range"):
    validate_config(_config(**{"search.enabled": True, "search.lr_range": (1.0, 1e-4)}),
                    num_devices=1)


def test_batches_must_split_over_devices():
  config = _config(**{"finetune.batch_size": 60, "bissl.pretext_batch_size": 64})
  validate_config(_config(), num_devices=8)  # the default batch of 64 splits over 8
  with pytest.raises(ConfigError) as err:
    validate_config(config, num_devices=8)
  assert "config.finetune.batch_size=60" in str(err.value)
  assert "device count (8)" in str(err.value) and "use 56" in str(err.value)
  assert "pretext_batch_size" not in str(err.value)


def test_every_problem_is_reported_at_once():
  with pytest.raises(ConfigError) as err:
    validate_config(_config(**{"bissl.lam": -1.0, "bissl.solver": "x", "stages": "y"}),
                    num_devices=1)
  message = str(err.value)
  for field in ("bissl.lam", "bissl.solver", "stages"):
    assert f"config.{field}=" in message


def test_single_stage_needs_its_input_checkpoint():
  for stage, field in [("head_warmup", "pretext.checkpoint"), ("bissl", "bissl.init_checkpoint"),
                       ("finetune", "finetune.init_checkpoint"),
                       ("evaluate", "evaluate.checkpoint")]:
    with pytest.raises(ConfigError, match=rf"config\.{field}=None"):
      validate_config(_config(stages=stage), num_devices=1)
  validate_config(_config(stages="pretext"), num_devices=1)


def test_run_rejects_before_creating_anything(tmp_path):
  workdir = tmp_path / "run"
  with pytest.raises(ConfigError, match="bissl.lam"):
    run(_config(**{"bissl.lam": -1.0}), str(workdir))
  assert not workdir.exists()


def test_missing_dataset_fails_before_compute(tmp_path):
  config = _config(**{"data.downstream_dataset": "cifar10", "data.pretext_dataset": "cifar10",
                      "data.data_dir": str(tmp_path / "no_data")})
  with pytest.raises(ConfigError, match="(?s)cannot start.*cifar10"):  # preflight.InputsError
    run(config, str(tmp_path / "run"))
  assert not (tmp_path / "run").exists()


def test_paper_tables_fill_the_configs():
  config = imagenet_simclr.get_config("downstream=oxford_iiit_pet")
  assert (config.finetune.lr, config.finetune.weight_decay) == (0.0378, 0.00114)      # Table 3
  assert (config.head_warmup.lr, config.head_warmup.weight_decay) == (0.03, 0.001)    # Table 4
  assert (config.finetune.bissl_lr, config.finetune.bissl_weight_decay) == (0.0014, 0.00005)
  assert imagenet_simclr.get_config("downstream=pets").finetune.lr == 0.0378  # alias
  byol = imagenet_byol.get_config("downstream=caltech_birds2011")
  assert (byol.finetune.lr, byol.head_warmup.lr, byol.finetune.bissl_lr) == (0.0095, 0.015, 0.0007)
  assert byol.pretext.task == "byol"
  with pytest.raises(ValueError, match="downstream_dataset"):
    common.paper_hyperparams("simclr", "digits")
  assert set(common.PAPER_DOWNSTREAM_DATASETS) <= set(data_lib.CATALOGUE)


def test_command_line_flags(monkeypatch):
  from experiments import main as main_lib
  import bissl_jax.pipeline
  calls = []
  monkeypatch.setattr(bissl_jax.pipeline, "run", lambda config, workdir, **_: calls.append(
      (config, workdir)))
  monkeypatch.setattr(main_lib.signal, "signal", lambda *args: None)

  def parse(argv):  # config_flags reads the override flags from sys.argv
    monkeypatch.setattr(sys, "argv", argv)
    flags.FLAGS(argv)

  try:
    parse(["main", "--workdir=/tmp/x"])
    main_lib.main(["main"])
    config, workdir = calls[-1]
    assert workdir == "/tmp/x"
    assert config.data.downstream_dataset == "digits"  # the offline default config
    assert config.to_dict() == digits_simclr.get_config().to_dict()
    flags.FLAGS.unparse_flags()
    path = os.path.join(os.path.dirname(main_lib._DEFAULT_CONFIG), "imagenet_simclr.py")
    parse(["main", f"--config={path}:downstream=dtd,runlocal", "--config.bissl.lam=0.01"])
    main_lib.main(["main"])
    config = calls[-1][0]
    assert config.data.downstream_dataset == "dtd" and config.finetune.lr == 0.0514
    assert config.bissl.lam == 0.01
  finally:
    flags.FLAGS.unparse_flags()


def test_command_line_rejects_bad_override(tmp_path):
  """The real entry point: default config + an override, refused before any compute."""
  repo = REPO_ROOT
  proc = subprocess.run(
      [sys.executable, "-m", "experiments.main", f"--workdir={tmp_path / 'w'}",
       "--config.bissl.lam=-0.5"], cwd=repo, capture_output=True, text=True, timeout=300,
      env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert proc.returncode != 0
  assert "config.bissl.lam=-0.5" in proc.stderr
  assert not (tmp_path / "w").exists()


def test_config_file_loads_by_path_from_another_directory(tmp_path):
  """experiments/main.py started elsewhere, with a config given by absolute path."""
  repo = REPO_ROOT
  env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
  proc = subprocess.run(
      [sys.executable, os.path.join(repo, "experiments", "main.py"),
       f"--config={os.path.join(repo, 'configs', 'stl10_simclr.py')}:runlocal",
       f"--workdir={tmp_path / 'w'}", "--config.bissl.lam=-0.25"],
      cwd=str(tmp_path), capture_output=True, text=True, timeout=300,
      env=dict(env, JAX_PLATFORMS="cpu"))
  assert proc.returncode != 0
  assert "config.bissl.lam=-0.25" in proc.stderr  # the config loaded; validation spoke
  assert not (tmp_path / "w").exists()


def test_one_runlocal_shrink():
  """Every config's runlocal is common.apply_runlocal (only the pretext epochs differ)."""
  shrunk = [digits_simclr.get_config("runlocal"), stl10_simclr.get_config("runlocal"),
            imagenet_simclr.get_config("downstream=dtd,runlocal")]
  for config in shrunk:
    again = common.apply_runlocal(config.copy_and_resolve_references(),
                                  pretext_epochs=config.pretext.epochs)
    assert again.to_dict() == config.to_dict()
  assert [c.pretext.epochs for c in shrunk] == [2, 0, 0]
  assert {c.data.image_size for c in shrunk} == {8}
