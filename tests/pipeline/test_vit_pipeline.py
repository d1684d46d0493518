"""The ViT + MAE + LoRA pipeline end to end: frozen base weights never move."""
import contextlib
import io
import os

import jax
import numpy as np
import pytest

from bissl_jax.models import vit_bundle
from bissl_jax.config_validation import ConfigError, validate_config
from bissl_jax.convert import stage_output
from bissl_jax.pipeline import build_context, run
from bissl_jax.pipeline import context as context_lib
from config_helpers import override
from configs import digits_mae_lora, imagenet_mae_lora


def tiny_config(**changes):
  # One seed, no variant rows: the smallest comparison that runs every stage.
  return override(digits_mae_lora.get_config("runlocal"), seeds=(0,), **changes)


def _load(workdir, *parts):
  return stage_output.load_export(os.path.join(workdir, *parts, "output"))[0]["params"]


def _flat(tree):
  return {jax.tree_util.keystr(p): np.asarray(x)
          for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


@pytest.fixture(scope="module")
def vit_run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("vit"))
  with contextlib.redirect_stdout(io.StringIO()):
    results = run(tiny_config(), workdir)
  return workdir, results


@pytest.mark.slow  # shares one runlocal comparison (about 20 s on a 2-core CPU)
def test_runlocal_comparison_keeps_the_frozen_base_bit_for_bit(vit_run):
  workdir, results = vit_run
  assert set(results["pipelines"]) == {"baseline", "bissl"}
  # Stage 1 trained the base model without adapters (every base weight is in it).
  pretext = _flat(_load(workdir, "seed0", "pretext")["backbone"])
  assert not any("lora_" in k for k in pretext)
  outputs = {"BiSSL θ_P": _load(workdir, "seed0", "bissl", "bissl")["backbone"],
             "BiSSL+FT": _load(workdir, "seed0", "bissl", "finetune")["backbone"],
             "Only FT": _load(workdir, "seed0", "baseline", "finetune")["backbone"]}
  for name, backbone in outputs.items():
    flat = _flat(backbone)
    lora = {k: v for k, v in flat.items() if "lora_" in k}
    assert lora, name
    base = {k: v for k, v in flat.items() if "lora_" not in k}
    assert base.keys() == pretext.keys(), name
    for k, v in base.items():
      np.testing.assert_array_equal(v, pretext[k], err_msg=f"{name}: {k} moved")
    # The adapters moved: fresh ones have B = 0.
    b = [v for k, v in lora.items() if k.endswith("['lora_b']")]
    assert max(float(np.max(np.abs(x))) for x in b) > 0, name


@pytest.mark.slow  # shares one runlocal comparison (about 20 s on a 2-core CPU)
def test_pretraining_trained_the_base_weights(vit_run, tmp_path):
  workdir, _ = vit_run
  config = validate_config(tiny_config())
  ctx = build_context(config, str(tmp_path))
  fresh = context_lib.pretraining_context(ctx).init_variables(jax.random.key(0))[0]
  pretext = _flat(_load(workdir, "seed0", "pretext")["backbone"])
  moved = [k for k, v in _flat(fresh["backbone"]).items()
           if k.endswith("['kernel']") and not np.array_equal(v, pretext[k])]
  assert any("qkv" in k for k in moved) and any("fc1" in k for k in moved)


def test_lora_model_masks_the_base_and_the_pretraining_model_does_not(tmp_path):
  ctx = build_context(validate_config(tiny_config()), str(tmp_path))
  assert ctx.model.encoder.lora.rank == 2
  params = ctx.init_variables(jax.random.key(0))[0]
  mask = _flat(ctx.model.trainable(params)["backbone"])
  assert mask and all(bool(t) == ("lora_" in k) for k, t in mask.items())
  pre = context_lib.pretraining_context(ctx)
  assert pre.model.encoder.lora is None


def test_vit_fields_are_checked_before_compute(tmp_path):
  config = validate_config(tiny_config(**{"pretext.task": "simclr"}))
  with pytest.raises(ConfigError, match="pretext.task"):
    build_context(config, str(tmp_path))
  with pytest.raises(ConfigError, match="model.pool"):
    validate_config(tiny_config(**{"model.pool": "max"}))
  assert "vit_base_patch16" in vit_bundle.ARCHITECTURES


def test_imagenet_config_has_bisslight_defaults():
  c = imagenet_mae_lora.get_config("downstream=dtd")
  assert (c.bissl.alternations, c.bissl.lower_steps, c.bissl.upper_steps) == (500, 20, 8)
  assert (c.bissl.lam, c.bissl.solver, c.bissl.mfac_blocks) == (0.001, "mfac", "per_layer")
  assert (c.model.lora_rank, tuple(c.model.lora_targets)) == (64, ("q", "v"))
  assert (c.pretext.batch_size, c.bissl.downstream_batch_size) == (256, 64)
  small = imagenet_mae_lora.get_config("downstream=dtd,runlocal")
  assert small.model.arch == "vit_test_patch4" and small.pretext.task == "mae"
  validate_config(small)


@pytest.mark.parametrize("fmt", [pytest.param("pth", marks=pytest.mark.torch), "stage_output"])
def test_pretext_checkpoint_loads_into_the_lora_model(tmp_path, fmt):
  """``pretext.checkpoint``: base weights as saved, fresh adapters (B = 0)."""
  from bissl_jax.convert import mae as convert_mae
  from bissl_jax.pipeline import comparison
  ctx = build_context(validate_config(tiny_config()), str(tmp_path))
  base = context_lib.pretraining_context(ctx).init_variables(jax.random.key(7))[0]
  groups = {"backbone": base["backbone"], "pretext_head": base["pretext_head"]}
  if fmt == "pth":
    path = str(tmp_path / "mae_pretrain_vit_test_full.pth")
    convert_mae.save_mae_torch(groups, path)
  else:
    path = str(tmp_path / "pretext" / "output")
    stage_output.export(path, {"params": groups,
                               "batch_stats": {"backbone": {}, "pretext_head": {}}},
                        {"stage": "pretext"})
  params, stats = comparison.load_pretext_model(ctx, path, seed=3)
  assert stats == {"backbone": {}, "pretext_head": {}}
  flat, saved = _flat(params), _flat({g: base[g] for g in ("backbone", "pretext_head")})
  assert set(saved) < set(flat)
  for k, v in saved.items():
    np.testing.assert_allclose(flat[k], v, rtol=0, atol=1e-7, err_msg=k)
  added = [k for k in flat if k not in saved]
  assert added and all("lora_" in k for k in added)
  assert all(not np.any(flat[k]) for k in added if k.endswith("['lora_b']"))
