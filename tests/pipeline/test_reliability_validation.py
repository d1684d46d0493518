"""Every value the reliability review found accepted (or failing late) is rejected up front.

Each case is one ``config_validation.validate_config`` call on the digits smoke
config: it must raise :class:`ConfigError` naming the field, before any compute.
"""
import math

import pytest

from bissl_jax.config_validation import ConfigError, validate_config
from config_helpers import override
from configs import digits_simclr

CASES = [
    ({"bissl.lam": math.nan}, "bissl.lam"),
    ({"bissl.lam": math.inf}, "bissl.lam"),
    ({"bissl.lower_lr": math.inf}, "bissl.lower_lr"),
    ({"bissl.lower_lr": math.nan}, "bissl.lower_lr"),
    ({"bissl.upper_lr": math.inf}, "bissl.upper_lr"),
    ({"pretext.temperature": math.nan}, "pretext.temperature"),
    ({"pretext.temperature": math.inf}, "pretext.temperature"),
    ({"bissl.damping": math.nan}, "bissl.damping"),
    ({"bissl.damping": math.inf}, "bissl.damping"),
    ({"pretext.lr": math.nan}, "pretext.lr"),
    ({"finetune.lr": math.inf}, "finetune.lr"),
    ({"head_warmup.weight_decay": math.nan}, "head_warmup.weight_decay"),
    ({"bissl.lam": 0.0, "bissl.damping": 0.0}, "bissl.damping"),
    ({"bissl.solver": "layerwise_cg", "bissl.cg_tol": 1e-3}, "bissl.cg_tol"),
    ({"bissl.solver": "layerwise_cg", "bissl.warm_start": True}, "bissl.warm_start"),
    ({"bissl.lower_momentum": 1.5}, "bissl.lower_momentum"),
    ({"bissl.upper_momentum": -1.0}, "bissl.upper_momentum"),
    ({"pretext.momentum": 1.5}, "pretext.momentum"),
    ({"head_warmup.momentum": -1.0}, "head_warmup.momentum"),
    ({"finetune.momentum": 1.5}, "finetune.momentum"),
    ({"model.projector": "abc"}, "model.projector"),
    ({"model.projector": "16--16"}, "model.projector"),
    ({"model.predictor": "x-1"}, "model.predictor"),
    ({"reuse": "sometimes"}, "reuse"),
]


@pytest.mark.parametrize("changes,field", CASES, ids=[f for _, f in CASES])
def test_bad_value_is_rejected_naming_the_field(changes, field):
  config = override(digits_simclr.get_config("runlocal"), **changes)
  with pytest.raises(ConfigError, match=f"config.{field}"):
    validate_config(config, num_devices=1)


def test_the_smoke_config_itself_is_valid():
  # The cases above fail because of their one changed field, not the base config.
  resolved = validate_config(digits_simclr.get_config("runlocal"), num_devices=1)
  assert resolved.bissl.solver == digits_simclr.get_config("runlocal").bissl.solver


# ------------------------------------------------ input checkpoints vs. the model

def _export(path, width, cifar_stem, provenance_fields=True):
  """A finetune-ready stage output of a runlocal ResNet-18 at ``width``."""
  import jax
  from bissl_jax.models import resnet
  from bissl_jax.convert import stage_output
  model = resnet.build_model("resnet18", width_multiplier=width,
                             cifar_stem=cifar_stem, projector="16-16-16")
  params, stats = model.init(jax.random.key(0), 8)
  meta = {"stage": "pretext"}
  if provenance_fields:
    meta["provenance"] = {"fields": {"model.arch": "resnet18", "model.width_multiplier": width,
                                     "model.cifar_stem": cifar_stem}, "inputs": {},
                          "digest": "x"}
  stage_output.export(path, {"params": params, "batch_stats": stats}, meta)
  return path


@pytest.mark.parametrize("width,stem,recorded,field", [
    (0.125, True, True, "model.width_multiplier=0.125"),
    (0.0625, False, True, "model.cifar_stem=False"),
    (0.125, True, False, "model.width_multiplier=0.125"),
    (0.0625, False, False, "model.cifar_stem=False"),
])
def test_an_input_checkpoint_that_does_not_fit_is_rejected_before_compute(
    tmp_path, capsys, width, stem, recorded, field):
  from bissl_jax.pipeline import run
  path = _export(str(tmp_path / "ckpt"), width, stem, recorded)
  config = override(digits_simclr.get_config("runlocal"), **{
      "stages": "finetune", "finetune.init_checkpoint": path})
  with pytest.raises(ConfigError, match=rf"(?s)does not fit the model.*--config\.{field}"):
    run(config, str(tmp_path / "run"))
  assert "finetune" not in capsys.readouterr().out  # no stage started
