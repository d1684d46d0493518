"""``:offline`` of the ImageNet configs: a labelled stand-in that needs no data at all."""
import importlib

import pytest

from bissl_jax.config_validation import validate_config
from bissl_jax.pipeline import context
from bissl_jax.pipeline import preflight
from configs import common

CONFIGS = ("imagenet_simclr", "imagenet_byol", "imagenet_mae_lora", "imagenet_gessl")


@pytest.mark.parametrize("name", CONFIGS)
def test_offline_runs_without_imagenet_and_builds(name, tmp_path):
  module = importlib.import_module(f"configs.{name}")
  real = module.get_config("runlocal")
  config = module.get_config("offline")
  config.data.data_dir = str(tmp_path / "empty")  # no ImageNet, no downstream set
  real.data.data_dir = config.data.data_dir
  with pytest.raises(preflight.InputsError, match="imagenet2012"):
    preflight.check(real, str(tmp_path / "run"))  # runlocal alone still needs ImageNet
  preflight.check(config, str(tmp_path / "run"))  # the stand-in needs nothing
  validate_config(config)
  assert (config.data.pretext_dataset, config.data.downstream_dataset) == (
      common.OFFLINE_STANDIN, common.OFFLINE_STANDIN)
  # Only the data differ from runlocal: same model, task, solver and stages.
  for field in ("model.arch", "pretext.task", "bissl.solver", "stages", "data.image_size"):
    group, key = field.split(".") if "." in field else (None, field)
    get = (lambda c: c[group][key]) if group else (lambda c: c[key])
    assert get(config) == get(real), field
  ctx = context.build_context(config, str(tmp_path / "run"))
  assert ctx.num_classes == 10


def test_offline_is_said_in_each_docstring():
  for name in CONFIGS:
    doc = importlib.import_module(f"configs.{name}").__doc__
    assert f"configs/{name}.py:offline" in doc and "STAND-IN" in doc, name
